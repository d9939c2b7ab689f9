"""One prompt's gradients: one forward with every layer's pattern kept in the graph, the E2E gradient
on W_Q/W_K, its three path parts per analysed layer, and the ABFT gradient from the same forward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from abft_lens.forward import keeping_patterns, query_logits, query_rows
from abft_lens.heads import ThresholdKind, gather_label_attention, induction_head_mask
from abft_lens.loss import E2ESoftmax as Softmax
from abft_lens.loss import abft_loss, e2e_loss
from abft_lens.prompts import PromptBatch

from .decomposition import label_column_masks, norm, split_pattern_gradient
from .parameters import QK, QKParameters

PIECES = ("correct", "wrong", "rest")  # the parts of the E2E gradient; they sum to "full"


@dataclass
class PromptGradients:
    """Gradients on the analysed layers' (W_Q, W_K) for one batch (normally one prompt).

    ``e2e[piece][i]`` is the E2E part through ``piece`` for the i-th analysed layer; ``full`` is the
    plain back-propagated E2E gradient, ``abft`` the ABFT gradient."""

    e2e: dict[str, list[QK]]
    full: list[QK]
    abft: list[QK]
    label_attention: Float[Tensor, "batch layer head k"]  # every layer, base weights
    head_mask: Bool[Tensor, "batch layer head"]  # induction heads (every layer)
    e2e_loss: float
    abft_loss: float
    identity_error: list[float]  # per analysed layer: ||sum of parts - full|| / ||full||


def _pairs(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[QK]:
    filled = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params, strict=True)]
    return [(filled[i], filled[i + 1]) for i in range(0, len(filled), 2)]


def prompt_gradients(
    model, batch: PromptBatch, params: QKParameters, softmax: Softmax = "label",
    punish_weight: float = 0.5, reward_weight: float = 1.0, threshold: ThresholdKind = "paper", tau: float = 2.0,
) -> PromptGradients:
    """One forward with every layer's ``hook_pattern`` kept in the graph; the E2E gradient, its
    three path parts per analysed layer, and the ABFT gradient (see the module doc)."""
    n_layers = model.cfg.n_layers
    flat = params.flat()
    with torch.enable_grad(), keeping_patterns(model, range(n_layers)) as patterns:
        logits = query_logits(model, batch)
        loss = e2e_loss(logits, batch.label_token_ids, batch.query_labels, softmax)
        analysed = [patterns[layer] for layer in params.layers]
        grads = torch.autograd.grad(loss, analysed + flat, retain_graph=True)
        pattern_grads, full = grads[: len(analysed)], _pairs(grads[len(analysed):], flat)

        attention = gather_label_attention(query_rows(patterns, range(n_layers)), batch.label_positions)
        mask = induction_head_mask(attention, batch.prompt_lengths, threshold, tau)
        abft = abft_loss(attention, batch.correct_mask, mask, punish_weight, reward_weight).loss
        abft_grads = torch.autograd.grad(abft, flat, retain_graph=True, allow_unused=True) if mask.any() else [None] * len(flat)

        correct_cols, wrong_cols = label_column_masks(batch.label_positions, batch.correct_mask, batch.tokens.shape[1])
        parts: dict[str, list[QK]] = {piece: [] for piece in PIECES}
        for index, (pattern, grad) in enumerate(zip(analysed, pattern_grads, strict=True)):
            for piece, piece_grad in split_pattern_gradient(grad, correct_cols, wrong_cols).items():
                q, k = torch.autograd.grad(pattern, [params.q[index], params.k[index]], grad_outputs=piece_grad,
                                           retain_graph=True, allow_unused=True)
                parts[piece].append(_pairs([q, k], [params.q[index], params.k[index]])[0])
    errors = []
    for index, whole in enumerate(full):
        summed = [sum(parts[piece][index][j] for piece in PIECES) for j in range(2)]
        errors.append(norm([s - w for s, w in zip(summed, whole, strict=True)]) / max(norm(whole), 1e-30))
    return PromptGradients(parts, full, _pairs(abft_grads, flat), attention.detach(), mask,
                           float(loss.detach()), float(abft.detach()), errors)
