"""The sign test: does a small step down a gradient raise each flagged head's attention on correct
labels and lower it on wrong ones? Central finite differences, Wilson and cluster-bootstrap intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from abft_lens.forward import query_attention_rows
from abft_lens.heads import gather_label_attention
from abft_lens.prompts import PromptBatch

from .parameters import QKParameters


def label_attention_change(
    model, batch: PromptBatch, params: QKParameters, direction: Sequence[Tensor], step: float,
    layers: Sequence[int],
) -> Float[Tensor, "batch layer head k"]:
    """First-order change of the label attention of ``layers`` under the step theta -> theta - step *
    direction, by a central difference; the weights are restored exactly afterwards."""
    base = params.snapshot()
    try:
        with torch.no_grad():
            params.shift(base, direction, -step)
            down = gather_label_attention(query_attention_rows(model, batch, layers), batch.label_positions)
            params.shift(base, direction, step)
            up = gather_label_attention(query_attention_rows(model, batch, layers), batch.label_positions)
    finally:
        params.set(base)
    return ((down.double() - up.double()) / 2).float()


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (NaN for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    z = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(0.5 + confidence / 2, dtype=torch.float64)))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cluster_bootstrap_interval(
    outcomes: np.ndarray, clusters: np.ndarray, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 ``outcomes``, resampling whole clusters
    (prompts) with replacement."""
    if len(outcomes) == 0:
        return float("nan"), float("nan")
    ids, inverse = np.unique(clusters, return_inverse=True)
    hits = np.bincount(inverse, weights=outcomes.astype(float), minlength=len(ids))
    sizes = np.bincount(inverse, minlength=len(ids)).astype(float)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    means = hits[draws].sum(1) / sizes[draws].sum(1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


SIGN_CRITERIA = {
    "correct_up": ("has_correct", "dS_plus > 0: more attention on correct labels"),
    "wrong_down": ("has_wrong", "dS_minus < 0: less attention on wrong labels"),
    "both": ("has_both", "both at once (pairs whose prompt has correct and wrong demonstrations)"),
    "margin_up": ("has_both", "d(S_plus - S_minus) > 0"),
}


def sign_test(pairs: pd.DataFrame, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Fractions of (prompt, head) pairs whose label attention moved the ABFT way, per direction.

    ``pairs`` has columns ``direction``, ``prompt``, ``dS_plus``, ``dS_minus``, ``has_correct``,
    ``has_wrong`` (one row per pair, the change along a *descent* step). A criterion is counted only
    over the pairs where it is defined (e.g. ``wrong_down`` needs a wrong demonstration)."""
    pairs = pairs.assign(
        has_both=pairs["has_correct"] & pairs["has_wrong"],
        correct_up=pairs["dS_plus"] > 0, wrong_down=pairs["dS_minus"] < 0,
    )
    pairs = pairs.assign(both=pairs["correct_up"] & pairs["wrong_down"],
                         margin_up=(pairs["dS_plus"] - pairs["dS_minus"]) > 0)
    rows = []
    for direction, group in pairs.groupby("direction", sort=False):
        for criterion, (defined, meaning) in SIGN_CRITERIA.items():
            sub = group[group[defined]]
            hits, n = int(sub[criterion].sum()), len(sub)
            low, high = wilson_interval(hits, n, confidence)
            boot_low, boot_high = cluster_bootstrap_interval(sub[criterion].to_numpy(), sub["prompt"].to_numpy(),
                                                             confidence, seed=seed)
            rows.append({"direction": direction, "criterion": criterion, "meaning": meaning, "pairs": n,
                         "prompts": sub["prompt"].nunique(), "successes": hits,
                         "fraction": hits / n if n else float("nan"), "wilson_low": low, "wilson_high": high,
                         "bootstrap_low": boot_low, "bootstrap_high": boot_high})
    return pd.DataFrame(rows)
