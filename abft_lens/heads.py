"""Label attention of every head at the query's last token, the induction-head test, and the
per-head scores that `find-heads` ranks (method.md sections 2-3).

The math (gathering label attention, thresholds, the running sums) is pure tensor code; the
forward that touches a model, ``abft_lens.forward.query_attention_rows``, hooks only ``hook_pattern``
of the layers it is asked for, keeps only the query row, and stops after the deepest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens.choices import RankBy, ThresholdKind
from abft_lens.errors import HeadSelectionError
from abft_lens.forward import query_attention_rows
from abft_lens.prompts import PromptBatch, PromptSet

Head = tuple[int, int]


def gather_label_attention(
    rows: Float[Tensor, "batch layer head key_pos"], label_positions: Int[Tensor, "batch k"]
) -> Float[Tensor, "batch layer head k"]:
    n_layers, n_heads = rows.shape[1], rows.shape[2]
    index = einops.repeat(label_positions, "batch k -> batch layer head k", layer=n_layers, head=n_heads)
    return rows.gather(-1, index)


def label_attention(model, batch: PromptBatch, layers: Sequence[int]) -> Float[Tensor, "batch layer head k"]:
    return gather_label_attention(query_attention_rows(model, batch, layers), batch.label_positions)


def induction_thresholds(
    prompt_lengths: Int[Tensor, "batch"], k: int, kind: ThresholdKind = "paper", tau: float = 2.0
) -> Float[Tensor, "batch"]:
    """The label mass a head must exceed to count as an induction head on each prompt:
    the paper's ``k / (k + ln n_t)``, or ``tau * k / n_t`` (a multiple of uniform attention)."""
    lengths = prompt_lengths.to(torch.float64)
    if kind == "paper":
        return (k / (k + torch.log(lengths))).float()
    if kind == "uniform":
        return (tau * k / lengths).float()
    raise ValueError(f"Unknown threshold {kind!r}; use 'paper' or 'uniform'.")


def induction_head_mask(
    label_attention: Float[Tensor, "batch layer head k"],
    prompt_lengths: Int[Tensor, "batch"],
    kind: ThresholdKind = "paper",
    tau: float = 2.0,
) -> Bool[Tensor, "batch layer head"]:
    """Which heads are induction heads on which prompt: label mass ``S`` above the threshold.
    A selection, not a function to differentiate through: computed on detached values."""
    mass = label_attention.detach().sum(-1)
    threshold = induction_thresholds(prompt_lengths, label_attention.shape[-1], kind, tau)
    return mass > einops.rearrange(threshold, "batch -> batch 1 1").to(mass.device)


def correct_and_wrong_mass(
    label_attention: Float[Tensor, "batch layer head k"], correct_mask: Bool[Tensor, "batch k"]
) -> tuple[Float[Tensor, "batch layer head"], Float[Tensor, "batch layer head"]]:
    """``S_plus`` (attention on demonstration labels equal to the query's label) and ``S_minus``."""
    correct = einops.rearrange(correct_mask, "batch k -> batch 1 1 k").to(label_attention.dtype)
    return (label_attention * correct).sum(-1), (label_attention * (1 - correct)).sum(-1)


@dataclass
class HeadStatistics:
    """Running per-head sums over prompts, so that batches (and processes) can be merged exactly."""

    n_prompts: int
    label_mass: Float[Tensor, "layer head"]
    label_mass_sq: Float[Tensor, "layer head"]
    correctness: Float[Tensor, "layer head"]
    correctness_sq: Float[Tensor, "layer head"]
    passes: Float[Tensor, "layer head"]
    uniform_mass: float  # sum over prompts of k / n_t, the label mass of uniform attention
    threshold: float  # sum over prompts of the threshold

    @classmethod
    def zeros(cls, n_layers: int, n_heads: int) -> HeadStatistics:
        z = lambda: torch.zeros(n_layers, n_heads, dtype=torch.float64)  # noqa: E731
        return cls(0, z(), z(), z(), z(), z(), 0.0, 0.0)

    def add(
        self,
        label_attention: Float[Tensor, "batch layer head k"],
        correct_mask: Bool[Tensor, "batch k"],
        prompt_lengths: Int[Tensor, "batch"],
        kind: ThresholdKind,
        tau: float,
    ) -> None:
        attention = label_attention.detach().double().cpu()
        mass = attention.sum(-1)
        plus, minus = correct_and_wrong_mass(attention, correct_mask.cpu())
        passes = induction_head_mask(attention, prompt_lengths.cpu(), kind, tau)
        k = attention.shape[-1]
        self.n_prompts += attention.shape[0]
        self.label_mass += mass.sum(0)
        self.label_mass_sq += (mass**2).sum(0)
        self.correctness += (plus - minus).sum(0)
        self.correctness_sq += ((plus - minus) ** 2).sum(0)
        self.passes += passes.double().sum(0)
        self.uniform_mass += float((k / prompt_lengths.double()).sum())
        self.threshold += float(induction_thresholds(prompt_lengths.cpu(), k, kind, tau).double().sum())

    def merge(self, other: HeadStatistics) -> HeadStatistics:
        fields = ("label_mass", "label_mass_sq", "correctness", "correctness_sq", "passes")
        merged = {name: getattr(self, name) + getattr(other, name) for name in fields}
        return HeadStatistics(self.n_prompts + other.n_prompts, **merged,
                              uniform_mass=self.uniform_mass + other.uniform_mass,
                              threshold=self.threshold + other.threshold)

    def to_frame(self, rank_by: RankBy = "pass_rate") -> pd.DataFrame:
        if self.n_prompts == 0:
            raise HeadSelectionError("No prompts were scored.")
        n = self.n_prompts

        def mean_and_se(total: Tensor, total_sq: Tensor) -> tuple[np.ndarray, np.ndarray]:
            mean = total / n
            var = (total_sq / n - mean**2).clamp(min=0) * n / max(n - 1, 1)
            return mean.numpy().ravel(), (var / n).sqrt().numpy().ravel()

        layers, heads = np.meshgrid(np.arange(self.label_mass.shape[0]), np.arange(self.label_mass.shape[1]),
                                    indexing="ij")
        mass, mass_se = mean_and_se(self.label_mass, self.label_mass_sq)
        correctness, correctness_se = mean_and_se(self.correctness, self.correctness_sq)
        frame = pd.DataFrame({
            "layer": layers.ravel(), "head": heads.ravel(),
            "label_mass": mass, "label_mass_se": mass_se,
            "correctness": correctness, "correctness_se": correctness_se,
            "pass_rate": (self.passes / n).numpy().ravel(),
            "uniform_mass": self.uniform_mass / n, "mean_threshold": self.threshold / n,
            "n_prompts": n,
        })
        return rank_heads(frame, rank_by)


def rank_heads(frame: pd.DataFrame, rank_by: RankBy = "pass_rate") -> pd.DataFrame:
    """Sort by ``rank_by`` (ties broken by label mass, then position) and number the rows 1..N."""
    if rank_by not in ("pass_rate", "label_mass", "correctness"):
        raise ValueError(f"Unknown ranking {rank_by!r}; use pass_rate, label_mass or correctness.")
    keys = [rank_by] + [c for c in ("label_mass", "correctness") if c != rank_by]
    ranked = frame.sort_values(keys + ["layer", "head"], ascending=[False] * len(keys) + [True, True])
    return ranked.assign(rank=np.arange(1, len(ranked) + 1)).reset_index(drop=True)


@dataclass
class HeadScoreConfig:
    threshold: ThresholdKind = "paper"
    tau: float = 2.0
    rank_by: RankBy = "pass_rate"
    batch_size: int = 8
    layers: tuple[int, ...] | None = None  # None: every layer


@dataclass
class HeadScores:
    """One row per (layer, head), ranked (see ``HeadStatistics.to_frame`` for the columns)."""

    table: pd.DataFrame

    def select(self, top: int | None = None, min_pass_rate: float | None = None,
               by: RankBy | None = None) -> list[Head]:
        """The ``top`` heads by ``by`` (default: the table's ranking), or every head whose pass
        rate is at least ``min_pass_rate``; both may be combined."""
        frame = self.table if by is None else rank_heads(self.table, by)
        if min_pass_rate is not None:
            frame = frame[frame["pass_rate"] >= min_pass_rate]
        if top is not None:
            if top < 1:
                raise HeadSelectionError(f"top must be at least 1, got {top}.")
            frame = frame.head(top)
        heads = [(int(layer), int(head)) for layer, head in zip(frame["layer"], frame["head"], strict=True)]
        if not heads:
            raise HeadSelectionError("The selection is empty: no head meets the criteria.")
        return heads


def score_heads(model, prompts: PromptSet, config: HeadScoreConfig | None = None,
                progress: bool = True) -> HeadScores:
    """Score every head of ``config.layers`` over ``prompts`` (see ``HeadStatistics``)."""
    config = config or HeadScoreConfig()
    frame = accumulate_head_statistics(model, prompts, config, progress=progress).to_frame(config.rank_by)
    if config.layers is not None:
        frame = rank_heads(frame[frame["layer"].isin(config.layers)], config.rank_by)
    return HeadScores(frame)


def accumulate_head_statistics(model, prompts: PromptSet, config: HeadScoreConfig | None = None,
                               indices: Sequence[int] | None = None, progress: bool = True) -> HeadStatistics:
    config = config or HeadScoreConfig()
    layers = list(config.layers) if config.layers is not None else list(range(model.cfg.n_layers))
    stats = HeadStatistics.zeros(model.cfg.n_layers, model.cfg.n_heads)
    order = prompts.by_length(indices)  # sums over prompts: the order only sets how much padding is computed
    device = next(model.parameters()).device
    bar = tqdm(total=len(order), desc="scoring heads", unit="prompt", disable=not progress)
    with torch.no_grad():
        for batch in prompts.batches(config.batch_size, order):
            batch = batch.to(device)
            attention = label_attention(model, batch, layers)
            full = torch.zeros(attention.shape[0], model.cfg.n_layers, *attention.shape[2:], dtype=attention.dtype,
                               device=attention.device)
            full[:, layers] = attention
            stats.add(full, batch.correct_mask, batch.prompt_lengths, config.threshold, config.tau)
            bar.update(attention.shape[0])
    bar.close()
    return stats
