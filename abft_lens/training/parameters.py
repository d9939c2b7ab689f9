"""Which tensors are trained: W_Q and W_K of every layer (or every parameter), frozen and unfrozen
around a run, and copied out for saving. ``apply_tensors`` (copying saved tensors back in) belongs
to the run-folder format and lives in ``abft_lens.runs``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from abft_lens.errors import AbftLensError
from abft_lens.runs import apply_tensors
from abft_lens.training.config import Trainable

__all__ = ["apply_tensors", "only_these_require_grad", "snapshot", "trainable_parameters", "trainable_qk_parameters"]


def trainable_qk_parameters(model) -> dict[str, torch.nn.Parameter]:
    """W_Q and W_K of every layer, by parameter name, in layer order.

    The bridge exposes every architecture's query and key projections as ``blocks.{l}.attn.q`` and
    ``.k`` (Llama's ``q_proj``/``k_proj``; GPT-2's ``attn.q``/``attn.k``, whose weights are views of
    the fused ``c_attn``). Only weights are returned, not biases."""
    names = {id(param): name for name, param in model.named_parameters()}
    chosen: dict[str, torch.nn.Parameter] = {}
    for layer, block in enumerate(model.blocks):
        attention = getattr(block, "attn", None)
        for part in ("q", "k"):
            module = getattr(attention, part, None) if attention is not None else None
            weights = [p for n, p in module.named_parameters() if n.endswith("weight")] if module is not None else []
            if len(weights) != 1:
                raise AbftLensError(
                    f"Cannot find the {part.upper()} projection weight of layer {layer}: expected one weight "
                    f"under blocks.{layer}.attn.{part}, found {len(weights)}. This architecture's bridge does "
                    "not expose separate q/k modules; use trainable='all' or add support for it."
                )
            chosen[names[id(weights[0])]] = weights[0]
    return chosen


def trainable_parameters(model, which: Trainable = "qk") -> dict[str, torch.nn.Parameter]:
    if which == "qk":
        return trainable_qk_parameters(model)
    if which == "all":
        return dict(model.named_parameters())
    raise ValueError(f"trainable must be 'qk' or 'all', got {which!r}")


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
