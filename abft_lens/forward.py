"""The model forwards every job runs, each keeping only what it needs.

- ``query_attention_rows``: the query rows (last position) of ``hook_pattern`` for some layers; the
  forward stops as soon as the deepest one is computed (no later layer, no unembedding).
- ``query_logits``: the logits at the query's last position only. The unembedding (d_model x
  vocabulary) runs on one position instead of all of them, outside any autocast region, so logits
  are float32 under bf16 mixed precision too (bf16 logits near 12 are spaced 0.06 apart, enough
  to flip an argmax between two labels).
- ``query_logits_and_rows``: both from one full forward (evaluation, E2E training).
- ``keeping_patterns``: the whole patterns of some layers, in the autograd graph (the gradient
  analysis differentiates through every row, not only the query's).

All rows are float32 copies (not views: a view would keep each layer's whole pattern alive),
differentiable unless ``detach``. This is the one place where hooks capture attention patterns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor

from abft_lens.prompts import PromptBatch


class _ForwardDone(Exception):
    """Raised from the last hook a forward needs: nothing after it is computed."""


def pattern_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


UNEMBED_INPUT = "unembed.hook_in"


@contextmanager
def keeping_query_rows(model, layers: Sequence[int], detach: bool = False,
                       stop_after_deepest: bool = False) -> Iterator[dict[int, Tensor]]:
    """Hooks on ``layers``' patterns that store each layer's query row (float32) in the yielded dict;
    with ``stop_after_deepest`` the forward ends (``_ForwardDone``) after the deepest layer's row."""
    rows: dict[int, Tensor] = {}
    deepest = max(layers)

    def keep_query_row(pattern: Float[Tensor, "batch head query_pos key_pos"], hook) -> None:
        layer = int(hook.name.split(".")[1])
        row = pattern[:, :, -1, :].to(torch.float32, copy=True)
        rows[layer] = row.detach() if detach else row
        if stop_after_deepest and layer == deepest:
            raise _ForwardDone

    with model.hooks(fwd_hooks=[(pattern_hook_name(layer), keep_query_row) for layer in layers]):
        yield rows


@contextmanager
def keeping_patterns(model, layers: Sequence[int]) -> Iterator[dict[int, Float[Tensor, "batch head query_pos key_pos"]]]:
    """Hooks on ``layers``' patterns that store each layer's whole pattern, the tensor itself (so that
    gradients flow through it), in the yielded dict."""
    patterns: dict[int, Tensor] = {}

    def keep_pattern(pattern: Float[Tensor, "batch head query_pos key_pos"], hook) -> None:
        patterns[int(hook.name.split(".")[1])] = pattern

    with model.hooks(fwd_hooks=[(pattern_hook_name(layer), keep_pattern) for layer in layers]):
        yield patterns


def query_rows(patterns: dict[int, Tensor], layers: Sequence[int]) -> Float[Tensor, "batch layer head key_pos"]:
    """The query rows (last position) of kept patterns, stacked over ``layers`` (views, differentiable)."""
    return torch.stack([patterns[layer][:, :, -1, :] for layer in layers], dim=1)


def _stacked(rows: dict[int, Tensor], layers: Sequence[int]) -> Float[Tensor, "batch layer head key_pos"]:
    return torch.stack([rows[layer] for layer in layers], dim=1)


def query_attention_rows(
    model, batch: PromptBatch, layers: Sequence[int]
) -> Float[Tensor, "batch layer head key_pos"]:
    """Attention of every head of ``layers`` from the last position. Differentiable when grad is
    enabled. The forward stops as soon as the deepest layer's pattern is computed (the bridge's
    ``stop_at_layer`` would still run that layer's MLP and, at the last layer, the unembedding)."""
    with keeping_query_rows(model, layers, stop_after_deepest=True) as rows:
        try:
            model(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=max(layers) + 1)
        except _ForwardDone:
            pass
    return _stacked(rows, layers)


def query_logits(model, batch: PromptBatch) -> Float[Tensor, "batch d_vocab"]:
    """Logits over the vocabulary at the last position, in float32 or wider (differentiable when
    grad is on)."""
    kept: list[Tensor] = []

    def keep_last_position(normalized: Float[Tensor, "batch pos d_model"], hook) -> None:
        kept.append(normalized[:, -1:, :])
        raise _ForwardDone

    with model.hooks(fwd_hooks=[(UNEMBED_INPUT, keep_last_position)]):
        try:
            model(batch.tokens, attention_mask=batch.attention_mask)
        except _ForwardDone:
            pass
    final = kept[0][:, 0, :]
    # At least float32 (float64 stays float64 for the finite-difference checks), whatever the
    # autocast region or the dtype the frozen weights are held in: the unembedding is one small
    # matmul at one position, and the loss on its output is where bf16 rounding would hurt most.
    weights_dtype = model.W_U.dtype
    compute = torch.promote_types(final.dtype, torch.promote_types(weights_dtype, torch.float32))
    with torch.autocast(final.device.type, enabled=False):
        if weights_dtype == compute:
            return model.unembed(final.to(compute))
        return final.to(compute) @ model.W_U.to(compute) + model.b_U.to(compute)


def label_logits(model, batch: PromptBatch) -> Float[Tensor, "batch n_labels"]:
    """Logits of the label tokens at the query's last position."""
    return query_logits(model, batch).index_select(-1, batch.label_token_ids)


def query_logits_and_rows(
    model, batch: PromptBatch, layers: Sequence[int], detach_rows: bool = True
) -> tuple[Float[Tensor, "batch d_vocab"], Float[Tensor, "batch layer head key_pos"]]:
    """One full forward: the vocabulary logits at the last position and the query rows of
    ``layers``' patterns (detached by default: diagnostics)."""
    with keeping_query_rows(model, layers, detach=detach_rows) as rows:
        logits = query_logits(model, batch)
    return logits, _stacked(rows, layers)


def full_attention_pattern(model, batch: PromptBatch, layer: int) -> Float[Tensor, "batch head query_pos key_pos"]:
    """The whole pattern (every query position) of one layer, a detached float32 copy; the forward
    stops right after it. For looking at one prompt, not for training (it is query_pos times larger
    than the query rows)."""
    kept: list[Tensor] = []

    def keep_pattern(pattern: Float[Tensor, "batch head query_pos key_pos"], hook) -> None:
        kept.append(pattern.detach().to(torch.float32, copy=True))
        raise _ForwardDone

    with model.hooks(fwd_hooks=[(pattern_hook_name(layer), keep_pattern)]):
        try:
            model(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=layer + 1)
        except _ForwardDone:
            pass
    return kept[0]
