"""Causal checks on attention heads: knock out chosen heads' outputs and see what ICL loses.

A head's output is its ``z`` (the attention-weighted values, before W_O), hook point
``blocks.{l}.attn.hook_z`` with shape [batch, pos, head, d_head] (on the TransformerBridge an
alias of ``blocks.{l}.attn.o.hook_in``). Ablation replaces a head's slice of it:

    with ablate_heads(model, heads):                 # zero ablation
        predictions = predict(model, prompts)
    means = head_output_means(model, reference, heads)
    with ablate_heads(model, heads, means=means):    # mean ablation
        ...

The hooks live only inside the ``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from abft_lens.prompts import PromptSet

Head = tuple[int, int]


def z_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for layer, head in heads:
        layers.setdefault(int(layer), []).append(int(head))
    return layers


def _check_heads(model, heads: Sequence[Head]) -> None:
    for layer, head in heads:
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
            raise ValueError(f"No head L{layer}H{head}: the model has {model.cfg.n_layers} layers of "
                             f"{model.cfg.n_heads} heads.")


def head_output_means(model, prompts: PromptSet, heads: Sequence[Head],
                      batch_size: int = 8) -> dict[Head, Float[Tensor, "d_head"]]:
    """Each head's mean ``z`` over every real (non-padding) token of ``prompts``: the values mean
    ablation puts in its place."""
    _check_heads(model, heads)
    by_layer = _by_layer(heads)
    sums: dict[Head, Tensor] = {}
    count = 0
    mask_holder: dict[str, Tensor] = {}

    def accumulate(z: Float[Tensor, "batch pos head d_head"], hook) -> None:
        layer = int(hook.name.split(".")[1])
        mask = mask_holder["mask"].to(z.dtype)[:, :, None]  # batch pos 1
        for head in by_layer[layer]:
            total = (z[:, :, head, :] * mask).sum(dim=(0, 1))
            sums[(layer, head)] = sums.get((layer, head), 0) + total.detach().double().cpu()

    device = next(model.parameters()).device
    hooks = [(z_hook_name(layer), accumulate) for layer in by_layer]
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        for batch in prompts.batches(batch_size, prompts.by_length()):  # sums: order only sets the padding
            batch = batch.to(device)
            mask_holder["mask"] = batch.attention_mask
            count += int(batch.attention_mask.sum())
            model(batch.tokens, attention_mask=batch.attention_mask)
    return {head: (sums[head] / count).float() for head in heads}


@contextmanager
def ablate_heads(model, heads: Sequence[Head],
                 means: dict[Head, Float[Tensor, "d_head"]] | None = None) -> Iterator[None]:
    """Within the block, the output ``z`` of each head in ``heads`` is zero at every position, or
    ``means[head]`` (mean ablation, see ``head_output_means``)."""
    _check_heads(model, heads)
    if means is not None:
        missing = [head for head in heads if head not in means]
        if missing:
            raise ValueError(f"No mean for heads {missing}.")
    by_layer = _by_layer(heads)

    def replace(z: Float[Tensor, "batch pos head d_head"], hook) -> Float[Tensor, "batch pos head d_head"]:
        layer = int(hook.name.split(".")[1])
        z = z.clone()
        for head in by_layer[layer]:
            z[:, :, head, :] = 0.0 if means is None else means[(layer, head)].to(z.device, z.dtype)
        return z

    with model.hooks(fwd_hooks=[(z_hook_name(layer), replace) for layer in by_layer]):
        yield


def random_heads(n_layers: int, n_heads: int, count: int, exclude: Sequence[Head] = (),
                 seed: int = 0) -> list[Head]:
    """``count`` distinct heads drawn uniformly from those not in ``exclude`` (the control for an
    ablation of chosen heads)."""
    excluded = {(int(layer), int(head)) for layer, head in exclude}
    candidates = [(layer, head) for layer in range(n_layers) for head in range(n_heads)
                  if (layer, head) not in excluded]
    if count > len(candidates):
        raise ValueError(f"Asked for {count} random heads but only {len(candidates)} are left.")
    picked = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return sorted(candidates[i] for i in picked)
