"""Pure math of the path decomposition: the label-column masks, the split of a pattern gradient into
its correct / wrong / rest pieces, and cosines, norms and projection shares of gradients given as
lists of tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def label_column_masks(
    label_positions: Int[Tensor, "batch k"], correct_mask: Bool[Tensor, "batch k"], key_len: int
) -> tuple[Bool[Tensor, "batch key_pos"], Bool[Tensor, "batch key_pos"]]:
    """Key positions holding a correct (I_plus) and a wrong (I_minus) demonstration label."""
    batch = label_positions.shape[0]
    correct = torch.zeros(batch, key_len, dtype=torch.bool, device=label_positions.device)
    wrong = torch.zeros_like(correct)
    correct.scatter_(1, label_positions, correct_mask)
    wrong.scatter_(1, label_positions, ~correct_mask)
    return correct, wrong


def split_pattern_gradient(
    grad: Float[Tensor, "batch head query_pos key_pos"],
    correct_columns: Bool[Tensor, "batch key_pos"],
    wrong_columns: Bool[Tensor, "batch key_pos"],
) -> dict[str, Float[Tensor, "batch head query_pos key_pos"]]:
    """``grad`` cut into the query row's correct-label entries, its wrong-label entries and the
    rest; the three pieces sum to ``grad`` exactly (disjoint masks)."""
    query_row = torch.zeros(grad.shape[-2], dtype=torch.bool, device=grad.device)
    query_row[-1] = True
    query_row = einops.rearrange(query_row, "query_pos -> 1 1 query_pos 1")
    correct = query_row & einops.rearrange(correct_columns, "batch key_pos -> batch 1 1 key_pos")
    wrong = query_row & einops.rearrange(wrong_columns, "batch key_pos -> batch 1 1 key_pos")
    zero = grad.new_zeros(())
    return {
        "correct": torch.where(correct, grad, zero),
        "wrong": torch.where(wrong, grad, zero),
        "rest": torch.where(correct | wrong, zero, grad),
    }


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))


def norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Cosine similarity of two gradients given as lists of tensors (NaN if either is zero)."""
    na, nb = norm(a), norm(b)
    return _dot(a, b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def projection_share(part: Sequence[Tensor], whole: Sequence[Tensor]) -> float:
    """<part, whole> / ||whole||^2: the shares of parts that sum to ``whole`` sum to 1."""
    nw = norm(whole)
    return _dot(part, whole) / nw**2 if nw > 0 else float("nan")
