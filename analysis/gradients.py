"""Path decomposition of the end-to-end (E2E) gradient on W_Q/W_K, and its agreement with ABFT.

The claim under test (method.md section 7): the E2E objective - cross-entropy of the query's true
label at the last position - "contains" the ABFT objective, i.e. part of what E2E fine-tuning does
to W_Q/W_K is exactly what ABFT does: move the query's attention onto correct demonstration labels
and off wrong ones.

Method
------
W_Q^l and W_K^l act on the model only through the attention scores of layer l, hence only through
its attention pattern ``P^l = blocks.{l}.attn.hook_pattern`` [batch, head, query_pos, key_pos].
By the chain rule, with ``G^l = dL/dP^l`` the *total* derivative of the loss with respect to that
pattern (every downstream path included),

    dL/dW^l = sum_{h, i, j} G^l[h, i, j] * dP^l[h, i, j]/dW^l        (W = W_Q or W_K of layer l)

where ``dP^l/dW^l`` is local: W^l does not affect layer l's input, so the derivative holds it
fixed. Split G^l by masks over (query_pos, key_pos) into three pieces that add up to G^l:

- ``correct``: the query's row (last position) on the demonstration label tokens equal to the
  query's true label (I_plus);
- ``wrong``: the query's row on the other demonstration label tokens (I_minus);
- ``rest``: everything else (the query row's other keys and every other row).

Back-propagate each piece separately from P^l to W_Q^l and W_K^l
(``torch.autograd.grad(P^l, [W_Q^l, W_K^l], grad_outputs=piece)``). The map G -> dL/dW is linear,
so the three parts add up to the plain back-propagated gradient; ``identity_error`` measures it.
The ``correct + wrong`` part is the "label-attention path": the share of the E2E gradient that
changes W^l by changing how much the query attends to the demonstration labels.

For GQA models (SmolLM2: 9 query heads, 3 KV heads, d_head 64) a query head's slice of W_Q is its
own d_head rows of ``q.weight``; its slice of W_K is its KV group's rows of ``k.weight``, which the
group's query heads share, so per-head W_K numbers are per KV group.

Agreement with ABFT, per prompt, from the same forward: the ABFT loss (abft_lens.loss.abft_loss,
A = 0.5, B = 1, heads flagged on that prompt by abft_lens.heads.induction_head_mask) and its
gradient. Reported: cosine(E2E gradient or one of its parts, ABFT gradient) per layer and per head,
on the gradient of the mean loss over the prompts and per prompt; the share of the E2E gradient
norm in the label path; and a sign test. Both losses are minimised, so a positive cosine means a
descent step of one lowers the other to first order.

The sign test asks, per (prompt, flagged head): does a small step *down* the E2E gradient raise the
head's attention on correct labels (dS_plus > 0) and lower it on wrong labels (dS_minus < 0)? That
is what descending the ABFT loss does by construction. The change is measured by a central finite
difference, ``(S(theta - s d) - S(theta + s d)) / 2`` for the descent direction d with
``||s d|| = sign_test_eps * ||theta_QK||``, and counted over (prompt, head) pairs; the confidence
intervals are Wilson's (pairs as independent) and a bootstrap over prompts (pairs of a prompt are
not independent). The same test along the ABFT gradient checks the sign convention (it must pass
nearly always), and ``aggregate`` steps along the mean E2E gradient of all prompts (one training
step) and measures every prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens.heads import (
    ThresholdKind,
    correct_and_wrong_mass,
    gather_label_attention,
    induction_head_mask,
    query_attention_rows,
)
from abft_lens.forward import query_logits
from abft_lens.loss import E2ESoftmax as Softmax
from abft_lens.loss import abft_loss, e2e_loss
from abft_lens.prompts import PromptBatch, PromptSet

PIECES = ("correct", "wrong", "rest")  # the parts of the E2E gradient; they sum to "full"
QK = tuple[Tensor, Tensor]  # (gradient or weight of W_Q, of W_K) of one layer


# --- the trained tensors ---------------------------------------------------------------------------


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


# --- pure math: the masks, the split, cosines -----------------------------------------------------


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


# --- one prompt ------------------------------------------------------------------------------------


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
    patterns: dict[int, Tensor] = {}

    def keep(pattern: Float[Tensor, "batch head query_pos key_pos"], hook) -> None:
        patterns[int(hook.name.split(".")[1])] = pattern  # the tensor itself: gradients flow through it

    flat = params.flat()
    with torch.enable_grad(), model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", keep) for l in range(n_layers)]):
        logits = query_logits(model, batch)
        loss = e2e_loss(logits, batch.label_token_ids, batch.query_labels, softmax)
        analysed = [patterns[layer] for layer in params.layers]
        grads = torch.autograd.grad(loss, analysed + flat, retain_graph=True)
        pattern_grads, full = grads[: len(analysed)], _pairs(grads[len(analysed):], flat)

        rows = torch.stack([patterns[layer][:, :, -1, :] for layer in range(n_layers)], dim=1)
        attention = gather_label_attention(rows, batch.label_positions)
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


# --- sign test ---------------------------------------------------------------------------------------


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


# --- the analysis over a prompt set ------------------------------------------------------------------


@dataclass
class GradientConfig:
    """Settings of `analyze_gradients` (the CLI adds the model, data set and prompt choice)."""

    softmax: Softmax = "label"  # E2E cross-entropy over the label tokens or the whole vocabulary
    layers: tuple[int, ...] | None = None  # analysed layers (None: all); ABFT still flags heads of every layer
    punish_weight: float = 0.5  # ABFT's A (its initial value in training)
    reward_weight: float = 1.0  # ABFT's B
    threshold: ThresholdKind = "paper"
    tau: float = 2.0
    sign_test: bool = True
    sign_test_eps: float = 1e-3  # finite-difference step, relative to ||theta_QK||
    sign_test_abft: bool = True  # the same test along the ABFT gradient (checks the sign convention)
    sign_test_aggregate: bool = True  # along the mean E2E gradient over all prompts
    head_min_pass_rate: float = 0.5  # "selected" heads: flagged on at least this share of the prompts
    confidence: float = 0.95
    seed: int = 0  # bootstrap


@dataclass
class GradientAnalysis:
    """Tables of one analysis (all tidy: one row per layer / head / prompt-layer / pair).

    ``layers``: gradient of the mean loss over the prompts, per layer (norms, shares, cosines);
    ``heads``: the same per (layer, head), W_Q rows of the head and W_K rows of its KV group;
    ``per_prompt``: per (prompt, layer) cosines and shares; ``prompts``: per prompt, over all
    analysed layers together (losses, flagged heads, cosine, share); ``pairs``: the sign test's raw changes;
    ``sign``: its fractions with confidence intervals; ``summary``: the headline numbers."""

    layers: pd.DataFrame
    heads: pd.DataFrame
    per_prompt: pd.DataFrame
    prompts: pd.DataFrame
    pairs: pd.DataFrame
    sign: pd.DataFrame
    summary: dict[str, object]
    config: GradientConfig
    mean_gradients: dict[str, list[QK]] = field(repr=False, default_factory=dict)


def _add(total: list[QK] | None, new: list[QK], scale: float) -> list[QK]:
    if total is None:
        return [(q * scale, k * scale) for q, k in new]
    return [(tq + q * scale, tk + k * scale) for (tq, tk), (q, k) in zip(total, new, strict=True)]


def _flat(grads: list[QK]) -> list[Tensor]:
    return [t for pair in grads for t in pair]


def _label(grads: dict[str, list[QK]]) -> list[QK]:
    return [(cq + wq, ck + wk) for (cq, ck), (wq, wk) in zip(grads["correct"], grads["wrong"], strict=True)]


def layer_table(grads: dict[str, list[QK]], layers: Sequence[int]) -> pd.DataFrame:
    """Per layer: norms of the E2E parts, the label path's share of the E2E gradient, and cosines
    with the ABFT gradient. ``grads`` maps correct/wrong/rest/full/abft to per-layer (W_Q, W_K)."""
    label = _label(grads)
    rows = []
    for i, layer in enumerate(layers):
        g = {name: list(value[i]) for name, value in grads.items()} | {"label": list(label[i])}
        summed = [g["correct"][j] + g["wrong"][j] + g["rest"][j] for j in range(2)]
        row = {"layer": layer, "norm_full": norm(g["full"]), "norm_abft": norm(g["abft"])}
        row |= {f"norm_{p}": norm(g[p]) for p in ("correct", "wrong", "label", "rest")}
        row["share_label_norm"] = row["norm_label"] / row["norm_full"] if row["norm_full"] > 0 else float("nan")
        row |= {f"share_{p}_projection": projection_share(g[p], g["full"]) for p in ("correct", "wrong", "label", "rest")}
        row |= {f"cos_{p}_abft": cosine(g[p], g["abft"]) for p in ("full", "label", "correct", "wrong", "rest")}
        row["cos_full_abft_q"] = cosine(g["full"][:1], g["abft"][:1])
        row["cos_full_abft_k"] = cosine(g["full"][1:], g["abft"][1:])
        row["cos_label_full"] = cosine(g["label"], g["full"])
        row["identity_error"] = norm([s - f for s, f in zip(summed, g["full"], strict=True)]) / max(row["norm_full"], 1e-30)
        rows.append(row)
    return pd.DataFrame(rows)


def head_table(grads: dict[str, list[QK]], params: QKParameters) -> pd.DataFrame:
    """Per (layer, head): cosine(E2E, ABFT) and the label path's norm share on the head's W_Q rows
    and on its KV group's W_K rows."""
    label = _label(grads)
    rows = []
    for i, layer in enumerate(params.layers):
        q = {name: per_head(value[i][0], params.n_heads) for name, value in grads.items()} | {
            "label": per_head(label[i][0], params.n_heads)}
        k = {name: per_head(value[i][1], params.n_kv_heads) for name, value in grads.items()} | {
            "label": per_head(label[i][1], params.n_kv_heads)}
        for head in range(params.n_heads):
            group = kv_group(head, params.n_heads, params.n_kv_heads)
            row = {"layer": layer, "head": head, "kv_group": group}
            for name, side, index in (("q", q, head), ("k", k, group)):
                full, abft, lab = [side["full"][index]], [side["abft"][index]], [side["label"][index]]
                row[f"cos_full_abft_{name}"] = cosine(full, abft)
                row[f"cos_label_abft_{name}"] = cosine(lab, abft)
                row[f"cos_rest_abft_{name}"] = cosine([side["rest"][index]], abft)
                row[f"share_label_norm_{name}"] = norm(lab) / norm(full) if norm(full) > 0 else float("nan")
                row[f"norm_full_{name}"] = norm(full)
                row[f"norm_abft_{name}"] = norm(abft)
            rows.append(row)
    return pd.DataFrame(rows)


def analyze_gradients(model, prompts: PromptSet, config: GradientConfig | None = None,
                      progress: bool = True) -> GradientAnalysis:
    """Decompose the E2E gradient on every prompt of ``prompts`` (one at a time), compare it with
    the ABFT gradient, and run the sign test. The model's weights are unchanged afterwards."""
    config = config or GradientConfig()
    started = time.perf_counter()
    model.eval()
    params = QKParameters.of(model, config.layers)
    all_layers = list(range(model.cfg.n_layers))
    theta_norm = params.norm()
    n = len(prompts)
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    mean: dict[str, list[QK] | None] = dict.fromkeys((*PIECES, "full", "abft"))
    per_prompt_rows, prompt_rows, pair_rows, masks = [], [], [], []
    attention_sum = None
    bar = tqdm(total=n, desc="gradient paths", unit="prompt", disable=not progress)
    device = next(model.parameters()).device
    try:
        for p in model.parameters():  # gradients only for W_Q/W_K: no work for the rest
            p.requires_grad_(False)
        for p in params.flat():
            p.requires_grad_(True)
        for index in range(n):
            batch = prompts.collate([index]).to(device)
            result = prompt_gradients(model, batch, params, config.softmax, config.punish_weight,
                                      config.reward_weight, config.threshold, config.tau)
            grads = {**result.e2e, "full": result.full, "abft": result.abft}
            for name, value in grads.items():
                mean[name] = _add(mean[name], value, 1 / n)
            table = layer_table(grads, params.layers)
            per_prompt_rows.append(table[["layer", "cos_full_abft", "cos_label_abft", "share_label_norm",
                                          "share_label_projection", "norm_full", "norm_abft",
                                          "identity_error"]].assign(prompt=index))
            prompt_rows.append(_prompt_row(index, grads, result))
            masks.append(result.head_mask.cpu())
            attention_sum = result.label_attention.cpu() if attention_sum is None else attention_sum + result.label_attention.cpu()
            if config.sign_test and bool(result.head_mask.any()):
                directions = {"e2e": _flat(result.full)}
                if config.sign_test_abft:
                    directions["abft"] = _flat(result.abft)
                for name, direction in directions.items():
                    size = norm(direction)
                    if size == 0:
                        continue
                    change = label_attention_change(model, batch, params, direction,
                                                    config.sign_test_eps * theta_norm / size, all_layers)
                    pair_rows.append(_pair_rows(name, index, change, batch, result.head_mask))
            bar.update(1)
        bar.close()
        if config.sign_test and config.sign_test_aggregate:
            direction = _flat(mean["full"])
            step = config.sign_test_eps * theta_norm / max(norm(direction), 1e-30)
            for index in tqdm(range(n), desc="sign test, mean E2E step", unit="prompt", disable=not progress):
                if not bool(masks[index].any()):
                    continue
                batch = prompts.collate([index]).to(device)
                change = label_attention_change(model, batch, params, direction, step, all_layers)
                pair_rows.append(_pair_rows("e2e_mean", index, change, batch, masks[index]))
    finally:
        for p in model.parameters():
            p.requires_grad_(saved_flags[id(p)])
        model.zero_grad(set_to_none=True)

    layers = layer_table(mean, params.layers)
    head_mask = torch.cat(masks)
    pass_rate = head_mask.double().mean(0)
    heads = head_table(mean, params)
    heads["pass_rate"] = [float(pass_rate[layer, head]) for layer, head in zip(heads["layer"], heads["head"], strict=True)]
    mean_mass = (attention_sum / n).sum(-1)
    heads["label_mass"] = [float(mean_mass[0, layer, head]) for layer, head in zip(heads["layer"], heads["head"], strict=True)]
    heads["selected"] = heads["pass_rate"] >= config.head_min_pass_rate
    per_prompt = pd.concat(per_prompt_rows, ignore_index=True)
    per_prompt = per_prompt[["prompt", *[c for c in per_prompt.columns if c != "prompt"]]]
    by_prompt = pd.DataFrame(prompt_rows)
    pairs = pd.concat(pair_rows, ignore_index=True) if pair_rows else pd.DataFrame(
        columns=["direction", "prompt", "layer", "head", "dS_plus", "dS_minus", "has_correct", "has_wrong"])
    sign = sign_test(pairs, config.confidence, config.seed) if len(pairs) else pd.DataFrame()
    flat_mean = {name: _flat(value) for name, value in mean.items()}
    label_flat = _flat(_label(mean))
    summary = {
        "n_prompts": n,
        "layers": list(params.layers),
        "mean_flagged_heads_per_prompt": float(head_mask.double().sum((1, 2)).mean()),
        "prompts_with_flagged_heads": int(head_mask.flatten(1).any(1).sum()),
        "cos_full_abft": cosine(flat_mean["full"], flat_mean["abft"]),
        "cos_label_abft": cosine(label_flat, flat_mean["abft"]),
        "cos_rest_abft": cosine(flat_mean["rest"], flat_mean["abft"]),
        "share_label_norm": norm(label_flat) / norm(flat_mean["full"]),
        "share_label_projection": projection_share(label_flat, flat_mean["full"]),
        "share_correct_projection": projection_share(flat_mean["correct"], flat_mean["full"]),
        "share_wrong_projection": projection_share(flat_mean["wrong"], flat_mean["full"]),
        "per_prompt_cos_full_abft_mean": float(by_prompt["cos_full_abft"].mean()),
        "per_prompt_cos_full_abft_positive": float((by_prompt["cos_full_abft"].dropna() > 0).mean()),
        "per_prompt_share_label_norm_mean": float(by_prompt["share_label_norm"].mean()),
        "max_identity_error": float(per_prompt["identity_error"].max()),
        "mean_e2e_loss": float(by_prompt["e2e_loss"].mean()),
        "mean_abft_loss": float(by_prompt["abft_loss"].mean()),
        "theta_qk_norm": theta_norm,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if len(sign):
        for _, row in sign.iterrows():
            summary[f"sign_{row['direction']}_{row['criterion']}"] = row["fraction"]
    return GradientAnalysis(layers, heads, per_prompt, by_prompt, pairs, sign, summary, config,
                            {name: value for name, value in mean.items() if value is not None})


def _prompt_row(index: int, grads: dict[str, list[QK]], result: PromptGradients) -> dict[str, object]:
    full, abft, label = _flat(grads["full"]), _flat(grads["abft"]), _flat(_label(grads))
    return {"prompt": index, "e2e_loss": result.e2e_loss, "abft_loss": result.abft_loss,
            "flagged_heads": int(result.head_mask.sum()), "cos_full_abft": cosine(full, abft),
            "cos_label_abft": cosine(label, abft), "share_label_norm": norm(label) / max(norm(full), 1e-30),
            "share_label_projection": projection_share(label, full)}


def _pair_rows(direction: str, prompt: int, change: Float[Tensor, "batch layer head k"], batch: PromptBatch,
               head_mask: Bool[Tensor, "batch layer head"]) -> pd.DataFrame:
    """One row per flagged head of a one-prompt batch: the changes of S_plus and S_minus."""
    plus, minus = correct_and_wrong_mass(change.double().cpu(), batch.correct_mask.cpu())
    layer, head = torch.nonzero(head_mask[0].cpu(), as_tuple=True)
    n_correct = int(batch.correct_mask.sum())
    return pd.DataFrame({
        "direction": direction, "prompt": prompt, "layer": layer.numpy(), "head": head.numpy(),
        "dS_plus": plus[0, layer, head].numpy(), "dS_minus": minus[0, layer, head].numpy(),
        "has_correct": n_correct > 0, "has_wrong": n_correct < batch.correct_mask.shape[1],
    })
