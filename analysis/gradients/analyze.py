"""The analysis over a prompt set: ``analyze_gradients`` runs ``prompt_gradients`` and the sign test
on every prompt and gathers the tidy tables (per layer, per head, per prompt, per pair) and the
headline numbers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens.heads import ThresholdKind, correct_and_wrong_mass
from abft_lens.loss import E2ESoftmax as Softmax
from abft_lens.prompts import PromptBatch, PromptSet

from .decomposition import cosine, norm, projection_share
from .parameters import QK, QKParameters, kv_group, per_head
from .prompt import PIECES, PromptGradients, prompt_gradients
from .sign_test import label_attention_change, sign_test


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
