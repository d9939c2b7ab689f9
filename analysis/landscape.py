"""The paper's own evidence for "E2E contains ABFT": accuracy on the plane of weights

    theta = theta_0 + l_E (theta_E - theta_0) + l_A (theta_A - theta_0)

spanned by a base model (theta_0), its ABFT fine-tune (theta_A) and its E2E fine-tune (theta_E),
both trained on the same data set. Only W_Q/W_K differ between the three, so one loaded model is
reused: its W_Q/W_K tensors are overwritten for each point and restored at the end.

A "barrier" on a path from a to b is the largest drop of accuracy below the straight line between
the end points' accuracies, ``max_t [(1 - t) acc(a) + t acc(b) - acc(path(t))]`` (0: none). It is
reported for the straight segments base -> ABFT, ABFT -> E2E and base -> E2E, and for the best path
on the grid from ABFT to E2E (the path whose lowest accuracy is highest), beside the standard
error of one accuracy so that a barrier can be told from test-set noise.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from abft_lens.data import load_dataset, split_pools
from abft_lens.errors import AbftLensError
from abft_lens.evaluation import predict
from abft_lens.prompts import PromptSet, build_prompts
from abft_lens.runs import lora_settings_of, read_finished_run

Point = tuple[float, float]  # (l_E, l_A)


@dataclass
class LandscapeResult:
    """``grid``: one row per grid point (l_e2e, l_abft, accuracy, true_label_probability);
    ``paths``: the straight segments' points; ``summary``: accuracies, barriers, best mix."""

    grid: pd.DataFrame
    paths: pd.DataFrame
    summary: dict[str, object]

    def marks(self) -> dict[str, Point]:
        return landscape_marks(self.summary)


def landscape_marks(summary: dict[str, object]) -> dict[str, Point]:
    """The named points of a landscape (its ``summary``) as (l_E, l_A)."""
    best = summary["best_mix"]
    return {"base": (0.0, 0.0), "ABFT": (0.0, 1.0), "E2E": (1.0, 0.0), "best mix": (best["l_e2e"], best["l_abft"])}


def read_run(run_dir: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """A full-rank fine-tuning run's config fields and its trained W_Q/W_K (by parameter name)."""
    record, tensors = read_finished_run(run_dir)
    if lora_settings_of(record) is not None:  # its tensors are adapters, not points of the W_Q/W_K plane
        raise AbftLensError(f"{run_dir} is a LoRA run (method {record.get('method')}); the landscape interpolates "
                            "the W_Q/W_K of full-rank runs (methods abft and e2e).")
    return record, tensors


def interpolate(base: dict[str, torch.Tensor], delta_e2e: dict[str, torch.Tensor], delta_abft: dict[str, torch.Tensor],
                l_e2e: float, l_abft: float) -> dict[str, torch.Tensor]:
    """theta_0 + l_E delta_E + l_A delta_A, tensor by tensor."""
    return {name: base[name] + l_e2e * delta_e2e[name] + l_abft * delta_abft[name] for name in base}


def barrier(accuracies: np.ndarray, t: np.ndarray) -> float:
    """Largest drop below the straight line between the end points' accuracies (>= 0)."""
    line = (1 - t) * accuracies[0] + t * accuracies[-1]
    return float(max(0.0, np.max(line - accuracies)))


def best_path(grid: pd.DataFrame, start: Point, end: Point) -> tuple[list[Point], float]:
    """The path between two grid points (8-neighbour moves) whose lowest accuracy is highest, and
    that lowest accuracy (a widest-path search: Dijkstra with min instead of sum)."""
    xs, ys = np.sort(grid["l_e2e"].unique()), np.sort(grid["l_abft"].unique())
    value = grid.pivot(index="l_abft", columns="l_e2e", values="accuracy").loc[ys, xs].to_numpy()

    def cell(point: Point) -> tuple[int, int]:
        i, j = int(np.argmin(np.abs(ys - point[1]))), int(np.argmin(np.abs(xs - point[0])))
        if not (math.isclose(ys[i], point[1], abs_tol=1e-9) and math.isclose(xs[j], point[0], abs_tol=1e-9)):
            raise ValueError(f"{point} is not a grid point")
        return i, j

    source, target = cell(start), cell(end)
    best = {source: value[source]}
    previous: dict[tuple[int, int], tuple[int, int]] = {}
    queue = [(-value[source], source)]
    while queue:
        negative, here = heapq.heappop(queue)
        if here == target:
            break
        if -negative < best.get(here, -np.inf):
            continue
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                there = (here[0] + di, here[1] + dj)
                if there == here or not (0 <= there[0] < len(ys) and 0 <= there[1] < len(xs)):
                    continue
                width = min(-negative, value[there])
                if width > best.get(there, -np.inf):
                    best[there], previous[there] = width, here
                    heapq.heappush(queue, (-width, there))
    path, here = [target], target
    while here != source:
        here = previous[here]
        path.append(here)
    return [(float(xs[j]), float(ys[i])) for i, j in reversed(path)], float(best[target])


def _key(point: Point) -> Point:
    return (round(point[0], 9), round(point[1], 9))


def landscape_prompts(model, record: dict[str, object], n_test: int, demo_sets: int, seed: int) -> PromptSet:
    """Test prompts of the runs' data set: queries from the test pool of the runs' pool seed,
    demonstrations from the demonstration pool (as abft_lens.evaluation does)."""
    label_words = tuple(record["label_words"]) if record.get("label_words") else None
    dataset = load_dataset(str(record["dataset"]), label_words)
    pools = split_pools(dataset, seed=int(record.get("pool_seed", record.get("seed", 42))))
    return build_prompts(model.tokenizer, dataset, pools.test, n_prompts=min(n_test, len(pools.test)),
                         k=int(record.get("k", 4)), seed=seed, demo_pool=pools.demo, repeats=demo_sets,
                         max_length=model.cfg.n_ctx)


def evaluate_points(model, prompts: PromptSet, base: dict[str, torch.Tensor], delta_e2e: dict[str, torch.Tensor],
                    delta_abft: dict[str, torch.Tensor], points: Iterable[Point], batch_size: int = 8,
                    progress: bool = True) -> pd.DataFrame:
    """Accuracy (label-token argmax) and mean probability of the true label at each (l_E, l_A); the
    model's W_Q/W_K are restored to ``base`` afterwards."""
    params = dict(model.named_parameters())
    rows = []
    points = list(points)
    try:
        for l_e2e, l_abft in tqdm(points, desc="weight plane", unit="point", disable=not progress):
            with torch.no_grad():
                for name, tensor in interpolate(base, delta_e2e, delta_abft, l_e2e, l_abft).items():
                    params[name].copy_(tensor)
            result = predict(model, prompts, batch_size, progress=False)
            true_probability = result.probabilities.gather(1, result.true[:, None]).mean()
            rows.append({"l_e2e": l_e2e, "l_abft": l_abft,
                         "accuracy": float((result.predicted == result.true).double().mean()),
                         "true_label_probability": float(true_probability), "n_inputs": len(prompts)})
    finally:
        with torch.no_grad():
            for name, tensor in base.items():
                params[name].copy_(tensor)
    return pd.DataFrame(rows)


SEGMENTS: dict[str, tuple[Point, Point]] = {
    "base -> ABFT": ((0.0, 0.0), (0.0, 1.0)),
    "ABFT -> E2E": ((0.0, 1.0), (1.0, 0.0)),
    "base -> E2E": ((0.0, 0.0), (1.0, 0.0)),
}


def weight_landscape(model, base_name: str, abft_run: Path, e2e_run: Path, grid: int = 9, low: float = -0.5,
                     high: float = 1.5, n_test: int = 128, demo_sets: int = 1, seed: int = 42,
                     batch_size: int = 8, path_points: int = 5, progress: bool = True) -> LandscapeResult:
    """Accuracy on the grid and on the three straight segments (``path_points`` points each, ends
    included); ``model`` is the base model ``base_name`` (its W_Q/W_K are theta_0)."""
    abft_record, abft_tensors = read_run(abft_run)
    e2e_record, e2e_tensors = read_run(e2e_run)
    for field in ("dataset", "k", "pool_seed", "label_words"):
        if abft_record.get(field) != e2e_record.get(field):
            raise AbftLensError(f"The ABFT and E2E runs differ in {field}: {abft_record.get(field)!r} vs "
                                f"{e2e_record.get(field)!r}; the landscape needs two runs on the same data.")
    for record, run in ((abft_record, abft_run), (e2e_record, e2e_run)):
        if str(record.get("model")) != str(base_name):
            raise AbftLensError(f"{run} fine-tuned {record.get('model')!r}, not the base model {base_name!r}.")
    if set(abft_tensors) != set(e2e_tensors):
        raise AbftLensError("The two runs trained different tensors; the landscape needs the same W_Q/W_K set.")
    params = dict(model.named_parameters())
    unknown = sorted(set(abft_tensors) - set(params))
    if unknown:
        raise AbftLensError(f"The runs' tensors are not parameters of the base model: {unknown[:3]}")
    base = {name: params[name].detach().clone() for name in abft_tensors}
    delta_e2e = {name: e2e_tensors[name].to(base[name]) - base[name] for name in base}
    delta_abft = {name: abft_tensors[name].to(base[name]) - base[name] for name in base}

    axis = np.linspace(low, high, grid)
    grid_points = [(float(e), float(a)) for a in axis for e in axis]
    t = np.linspace(0, 1, path_points)
    segment_points = {name: [(float(s[0] + ti * (e[0] - s[0])), float(s[1] + ti * (e[1] - s[1]))) for ti in t]
                      for name, (s, e) in SEGMENTS.items()}
    unique = list(dict.fromkeys(_key(p) for p in grid_points + [p for ps in segment_points.values() for p in ps]))
    prompts = landscape_prompts(model, abft_record, n_test, demo_sets, seed)
    table = evaluate_points(model, prompts, base, delta_e2e, delta_abft, unique, batch_size, progress)
    lookup = {_key((row.l_e2e, row.l_abft)): row for row in table.itertuples()}
    grid_table = pd.DataFrame([lookup[_key(p)]._asdict() for p in grid_points]).drop(columns="Index")

    paths, barriers = [], {}
    for name, points in segment_points.items():
        accuracies = np.array([lookup[_key(p)].accuracy for p in points])
        barriers[name] = barrier(accuracies, t)
        paths += [{"segment": name, "t": ti, "l_e2e": p[0], "l_abft": p[1], "accuracy": a}
                  for ti, p, a in zip(t, points, accuracies, strict=True)]
    accuracy = {name: lookup[_key(p)].accuracy for name, p in (("base", (0.0, 0.0)), ("abft", (0.0, 1.0)),
                                                               ("e2e", (1.0, 0.0)))}
    n_inputs = len(prompts)
    standard_error = math.sqrt(max(accuracy["base"] * (1 - accuracy["base"]), 0.25 / n_inputs) / n_inputs)
    best = table.loc[table["accuracy"].idxmax()]
    summary: dict[str, object] = {
        "dataset": abft_record["dataset"], "base": base_name, "abft_run": str(abft_run), "e2e_run": str(e2e_run),
        "n_inputs": n_inputs, "grid": grid, "range": [low, high],
        "accuracy_base": accuracy["base"], "accuracy_abft": accuracy["abft"], "accuracy_e2e": accuracy["e2e"],
        "accuracy_standard_error": standard_error,
        "best_mix": {"l_e2e": float(best["l_e2e"]), "l_abft": float(best["l_abft"]), "accuracy": float(best["accuracy"])},
        "barriers": barriers,
        "cosine_delta_abft_delta_e2e": _cosine(delta_abft, delta_e2e),
        "norm_delta_abft": _norm(delta_abft), "norm_delta_e2e": _norm(delta_e2e),
    }
    on_grid = all(_key(p) in {_key(q) for q in grid_points} for p in ((0.0, 1.0), (1.0, 0.0)))
    if on_grid:
        route, bottleneck = best_path(grid_table, (0.0, 1.0), (1.0, 0.0))
        summary["best_grid_path_abft_to_e2e"] = {"points": route, "lowest_accuracy": bottleneck,
                                                 "barrier": max(0.0, min(accuracy["abft"], accuracy["e2e"]) - bottleneck)}
    summary["no_barrier_abft_to_e2e"] = bool(barriers["ABFT -> E2E"] <= 2 * standard_error)
    summary["no_barrier_base_abft_e2e"] = bool(max(barriers["base -> ABFT"], barriers["ABFT -> E2E"])
                                               <= 2 * standard_error)
    return LandscapeResult(grid_table, pd.DataFrame(paths), summary)


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def _cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    return dot / (_norm(a) * _norm(b)) if _norm(a) > 0 and _norm(b) > 0 else float("nan")
