"""The tensors the gradient analysis differentiates: W_Q and W_K of the analysed layers, with the
head layout needed to slice them per head (GQA: a query head's W_K rows are its KV group's)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float
from torch import Tensor

QK = tuple[Tensor, Tensor]  # (gradient or weight of W_Q, of W_K) of one layer


@dataclass
class QKParameters:
    """W_Q and W_K of the analysed layers (the bridge's ``blocks.{l}.attn.q/k`` weights, the same
    tensors ``abft_lens.training`` trains), with the head layout needed to slice them per head."""

    layers: tuple[int, ...]
    q: list[torch.nn.Parameter]  # [n_heads * d_head, d_model] per layer
    k: list[torch.nn.Parameter]  # [n_kv_heads * d_head, d_model] per layer
    n_heads: int
    n_kv_heads: int
    d_head: int

    @classmethod
    def of(cls, model, layers: Sequence[int] | None = None) -> QKParameters:
        from abft_lens.training import trainable_qk_parameters

        weights = list(trainable_qk_parameters(model).values())  # q0, k0, q1, k1, ... in layer order
        layers = tuple(range(model.cfg.n_layers)) if layers is None else tuple(layers)
        n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
        return cls(layers, [weights[2 * layer] for layer in layers], [weights[2 * layer + 1] for layer in layers],
                   model.cfg.n_heads, n_kv, model.cfg.d_head)

    def flat(self) -> list[torch.nn.Parameter]:
        return [p for pair in zip(self.q, self.k, strict=True) for p in pair]

    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.flat()]

    def norm(self) -> float:
        return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in self.flat()))

    @torch.no_grad()
    def set(self, values: Sequence[Tensor]) -> None:
        for p, value in zip(self.flat(), values, strict=True):
            p.copy_(value)

    @torch.no_grad()
    def shift(self, base: Sequence[Tensor], direction: Sequence[Tensor], scale: float) -> None:
        """theta = base + scale * direction (in place, exact: always from ``base``)."""
        for p, b, d in zip(self.flat(), base, direction, strict=True):
            p.copy_(b + scale * d)


def kv_group(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The KV head (group) query head ``head`` reads its keys from (GQA: consecutive query heads
    share one)."""
    return head // (n_heads // n_kv_heads)


def per_head(weight: Float[Tensor, "heads_x_d_head d_model"], n: int) -> Float[Tensor, "head d_head d_model"]:
    """Rows of a q/k projection weight grouped by head (output features are head-major)."""
    return einops.rearrange(weight, "(head d_head) d_model -> head d_head d_model", head=n)
