"""Which heads count in the loss: per prompt by the induction threshold, all heads, or a fixed set
read from a heads.csv (then only its layers are run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from abft_lens.errors import HeadSelectionError
from abft_lens.heads import Head, ThresholdKind, induction_head_mask


@dataclass(frozen=True)
class HeadPlan:
    """Which layers are run and which heads count: per prompt by the threshold, all heads, or a fixed
    set (then only its layers are read and the forward stops after its deepest layer)."""

    mode: Literal["per-prompt", "all", "fixed"]
    layers: tuple[int, ...]
    fixed_heads: tuple[Head, ...] = ()

    def fixed_mask(self, n_heads: int) -> Bool[Tensor, "layer head"]:
        mask = torch.zeros(len(self.layers), n_heads, dtype=torch.bool)
        position = {layer: i for i, layer in enumerate(self.layers)}
        for layer, head in self.fixed_heads:
            mask[position[layer], head] = True
        return mask


def read_head_set(path: str | Path, top: int | None = None) -> list[Head]:
    """The (layer, head) pairs of a heads CSV (``find-heads``' heads.csv, or any CSV with ``layer`` and
    ``head`` columns), in file order, the first ``top`` of them."""
    path = Path(path)
    if not path.is_file():
        raise HeadSelectionError(f"Head set file {path} does not exist (use 'per-prompt', 'all' or a heads.csv).")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    missing = [c for c in ("layer", "head") if c not in frame.columns]
    if missing:
        raise HeadSelectionError(f"{path} has no column(s) {missing}; a head set needs 'layer' and 'head' columns.")
    if top is not None:
        frame = frame.head(top)
    heads = [(int(layer), int(head)) for layer, head in zip(frame["layer"], frame["head"], strict=True)]
    if not heads:
        raise HeadSelectionError(f"The head set in {path} is empty: there is no head to train.")
    return heads


def plan_heads(spec: str, n_layers: int, n_heads: int, top: int | None = None) -> HeadPlan:
    if spec == "per-prompt" or spec == "all":
        return HeadPlan(spec, tuple(range(n_layers)))
    heads = read_head_set(spec, top)
    bad = [(layer, head) for layer, head in heads if not (0 <= layer < n_layers and 0 <= head < n_heads)]
    if bad:
        raise HeadSelectionError(f"Heads {bad[:5]} in {spec} are outside the model's {n_layers} layers x {n_heads} heads.")
    unique = tuple(sorted(set(heads)))
    return HeadPlan("fixed", tuple(sorted({layer for layer, _ in unique})), unique)


def counted_heads(plan: HeadPlan, mask: Bool[Tensor, "batch layer head"], attention: Float[Tensor, "batch layer head k"],
                  prompt_lengths: Int[Tensor, " batch"], threshold: ThresholdKind,
                  tau: float) -> Bool[Tensor, "batch layer head"]:
    """The heads the PID counts (method.md: n_t, the heads flagged as induction heads): those of the loss's
    ``mask`` that pass the induction threshold on their prompt. With the paper's per-prompt filter that is
    ``mask`` itself. Without a filter ("all") or with a fixed head set the loss also acts on heads that are
    not induction heads on the prompt; counting those would feed the PID a constant (270 heads on SmolLM2),
    A would never move, and "no head filter" would be "no PID" as well."""
    if plan.mode == "per-prompt":
        return mask
    return mask & induction_head_mask(attention, prompt_lengths, threshold, tau)


def head_mask_for(plan: HeadPlan, attention: Float[Tensor, "batch layer head k"],
                  prompt_lengths, threshold: ThresholdKind, tau: float) -> Bool[Tensor, "batch layer head"]:
    if plan.mode == "per-prompt":
        return induction_head_mask(attention, prompt_lengths, threshold, tau)
    if plan.mode == "all":
        return torch.ones(attention.shape[:3], dtype=torch.bool, device=attention.device)
    mask = plan.fixed_mask(attention.shape[2]).to(attention.device)
    return mask.expand(attention.shape[0], -1, -1)
