"""Which tensors are trained: W_Q and W_K of every layer (or every parameter, or LoRA adapters on the
q/k projections), frozen and unfrozen around a run, copied out for saving, and how many parameters the
objective needs in full precision. ``apply_tensors`` (copying saved tensors back in) belongs to the
run-folder format and lives in ``abft_lens.runs``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from abft_lens.errors import AbftLensError
from abft_lens.lora import lora_parameters, qk_projections
from abft_lens.runs import apply_tensors
from abft_lens.training.config import FinetuneConfig, Objective, Trainable

__all__ = ["apply_tensors", "full_precision_parameter_count", "only_these_require_grad", "parameters_to_train",
           "snapshot", "trainable_parameters", "trainable_qk_parameters"]


def trainable_qk_parameters(model) -> dict[str, torch.nn.Parameter]:
    """W_Q and W_K of every layer, by parameter name, in layer order.

    The bridge exposes every architecture's query and key projections as ``blocks.{l}.attn.q`` and
    ``.k`` (Llama's ``q_proj``/``k_proj``; GPT-2's ``attn.q``/``attn.k``, whose weights are views of
    the fused ``c_attn``; see ``abft_lens.lora.qk_projections``). Only weights are returned, not biases."""
    names = {id(param): name for name, param in model.named_parameters()}
    chosen: dict[str, torch.nn.Parameter] = {}
    for layer, part, module in qk_projections(model):
        weights = [p for n, p in module.named_parameters() if n.endswith("weight")]
        if len(weights) != 1:
            raise AbftLensError(
                f"Cannot find the {part.upper()} projection weight of layer {layer}: expected one weight "
                f"under blocks.{layer}.attn.{part}, found {len(weights)} (a model with LoRA adapters: train "
                "those, lora_parameters).")
        chosen[names[id(weights[0])]] = weights[0]
    return chosen


def trainable_parameters(model, which: Trainable = "qk") -> dict[str, torch.nn.Parameter]:
    if which == "qk":
        return trainable_qk_parameters(model)
    if which == "all":
        return dict(model.named_parameters())
    raise ValueError(f"trainable must be 'qk' or 'all', got {which!r}")


def parameters_to_train(model, config: FinetuneConfig) -> dict[str, torch.nn.Parameter]:
    """What a run trains: the LoRA adapters for the LoRA methods (attach them first), else
    ``config.trainable`` (W_Q/W_K, or everything)."""
    return lora_parameters(model) if config.uses_lora else trainable_parameters(model, config.trainable)


def full_precision_parameter_count(model, params: dict[str, torch.nn.Parameter], objective: Objective) -> int:
    """The paper's Param.* column: how many parameters must be held in full precision *because of the
    training objective*, with gradients flowing in or through them. Two parts, each parameter counted once:

    - the trained parameters (``params``): they get gradients and Adam moments, kept as float32 masters
      (W_Q/W_K for the full-rank methods, the adapters' A and B for the LoRA ones);
    - for a loss on the logits (``objective == "e2e"``), the unembedding (LM head) weight: the gradient
      starts at the logits and flows back through it, and 4-bit loading keeps it in full precision
      (transformers' bitsandbytes loading never quantises the output head). With tied embeddings it is
      the embedding matrix. ABFT's loss is read from attention rows; its forward stops before the LM head.

    Not counted: the frozen weights the gradient only passes through (V, O, MLPs, norms), which the
    paper's 4-bit setting holds quantised (norms are a negligible, architecture-dependent extra), and the
    embeddings, which no gradient reaches. Read from the model, so it is right for every architecture."""
    counted = {id(p): p.numel() for p in params.values()}
    if objective == "e2e":
        counted.update({id(p): p.numel() for p in model.unembed.parameters()})
    elif objective != "abft":
        raise ValueError(f"objective must be 'abft' or 'e2e', got {objective!r}")
    return sum(counted.values())


@contextmanager
def only_these_require_grad(model, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Freeze every other parameter for the duration (so no gradient is even computed for them);
    restore the flags afterwards."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    chosen = {id(p) for p in params.values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, Tensor]:
    """Detached contiguous copies (safe to save with safetensors, also for views of c_attn)."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}
