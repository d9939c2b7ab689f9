"""Predictions and evaluation metrics for ICL classification (method.md section 6).

``evaluate(model, dataset, config)`` measures, on held-out queries with demonstrations from a
separate pool:

- accuracy (argmax over the label tokens' logits at the query's last position) and macro-F1 on
  ``n_test`` queries x ``demo_sets`` demonstration sets, and the predicted-label distribution;
- contextual calibration (label probabilities divided by their mean over content-free queries,
  renormalised);
- robustness as prediction consistency over the 9 templates of an L9 orthogonal array and over
  8 demonstration sets;
- the unseen-label test (every demonstration carries a label other than the query's), beside
  random demonstrations and 0-shot;
- the label attention of the induction heads on the test prompts (collected in the same forward).

The metric math (macro-F1, consistency, calibration, induction-head masses) is pure tensor code;
``predict`` is the one loop that runs the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens.config import check_int, validate_config
from abft_lens.data import Example, ICLDataset, l9_templates, load_dataset, split_pools
from abft_lens.errors import AbftLensError, DataError
from abft_lens.forward import label_logits, query_logits_and_rows
from abft_lens.heads import correct_and_wrong_mass, gather_label_attention, induction_head_mask
from abft_lens.models import DEFAULT_MODEL
from abft_lens.precision import (
    WEIGHT_DTYPES,
    Precision,
    WeightDtype,
    autocast,
    resolve_config_precision,
)
from abft_lens.prompts import PromptBatch, PromptSet, build_prompts
from abft_lens.runs import atomic_write_text, save_config, write_json


# --- pure metric functions ------------------------------------------------------------------------


def accuracy(true: Int[Tensor, "n"], predicted: Int[Tensor, "n"]) -> float:
    if true.numel() == 0:
        raise ValueError("accuracy of zero predictions is undefined")
    return float((true == predicted).double().mean())


def macro_f1(true: Int[Tensor, "n"], predicted: Int[Tensor, "n"], n_labels: int) -> float:
    """Mean over all ``n_labels`` classes of F1 = 2 TP / (2 TP + FP + FN); a class with no true and
    no predicted example scores 0 (StaICC's convention: the average is over the whole label space)."""
    if true.numel() == 0:
        raise ValueError("macro-F1 of zero predictions is undefined")
    scores = []
    for label in range(n_labels):
        is_true, is_predicted = true == label, predicted == label
        tp = int((is_true & is_predicted).sum())
        fp = int((~is_true & is_predicted).sum())
        fn = int((is_true & ~is_predicted).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def label_distribution(labels: Int[Tensor, "n"], n_labels: int) -> Float[Tensor, "n_labels"]:
    """Fraction of ``labels`` equal to each class."""
    return torch.bincount(labels, minlength=n_labels).double() / max(labels.numel(), 1)


COLLAPSE_SHARE = 0.7  # a run has collapsed when more than this share of predictions is one label ...
COLLAPSE_TRUE_SHARE = 0.5  # ... whose true share is under this


def collapsed_label(predicted: Float[Tensor, "n_labels"], true: Float[Tensor, "n_labels"]) -> int | None:
    """The label the predictions have collapsed onto, if any: more than 70% of the predictions on one
    label whose true share is under 50% (a model that says one word most of the time; its accuracy can
    still rise where that label is common). ``predicted``/``true`` are label distributions."""
    top = int(predicted.argmax())
    if float(predicted[top]) > COLLAPSE_SHARE and float(true[top]) < COLLAPSE_TRUE_SHARE:
        return top
    return None


def consistency_score(predictions: Int[Tensor, "query variant"]) -> float:
    """The paper's robustness: per query, the size of the largest group of identical predictions
    over its variants (templates or demonstration sets) divided by the number of variants, averaged
    over queries. 1 = always the same prediction; 1 / n_labels = as spread as possible."""
    if predictions.ndim != 2 or predictions.shape[1] == 0:
        raise ValueError(f"expected predictions shaped [query, variant], got {tuple(predictions.shape)}")
    n_labels = int(predictions.max()) + 1
    counts = torch.nn.functional.one_hot(predictions, n_labels).sum(dim=1)  # [query, label]
    largest_group = counts.max(dim=-1).values
    return float((largest_group.double() / predictions.shape[1]).mean())


def calibrate_probabilities(
    probabilities: Float[Tensor, "batch n_labels"], content_free: Float[Tensor, "n_cf n_labels"]
) -> Float[Tensor, "batch n_labels"]:
    """Contextual calibration: divide each label's probability by its mean over the content-free
    queries and renormalise (Zhao et al. 2021, the paper's calibration baseline)."""
    bias = einops.reduce(content_free, "n_cf n_labels -> n_labels", "mean")
    if bool((bias <= 0).any()):
        raise ValueError(f"content-free label probabilities must be positive, got {bias.tolist()}")
    scaled = probabilities / bias
    return scaled / einops.reduce(scaled, "batch n_labels -> batch 1", "sum")


def induction_label_mass(
    label_attention: Float[Tensor, "batch layer head k"],
    correct_mask: Bool[Tensor, "batch k"],
    prompt_lengths: Int[Tensor, "batch"],
) -> dict[str, Float[Tensor, ""]]:
    """Sums over the (prompt, head) pairs that pass the paper's induction threshold: their number,
    their attention on correct labels (S_plus) and on wrong labels (S_minus). Sums, not means, so
    batches add up exactly; ``summarise_induction`` turns them into means."""
    flagged = induction_head_mask(label_attention, prompt_lengths).double()
    plus, minus = correct_and_wrong_mass(label_attention.double(), correct_mask)
    return {"prompts": torch.tensor(float(label_attention.shape[0]), dtype=torch.float64),
            "flagged": flagged.sum(), "correct_mass": (plus * flagged).sum(),
            "wrong_mass": (minus * flagged).sum()}


def summarise_induction(sums: dict[str, Tensor]) -> dict[str, float]:
    flagged = float(sums["flagged"])
    return {
        "induction_heads_per_prompt": flagged / float(sums["prompts"]),
        "induction_correct_mass": float(sums["correct_mass"]) / flagged if flagged else float("nan"),
        "induction_wrong_mass": float(sums["wrong_mass"]) / flagged if flagged else float("nan"),
    }


# --- running the model ------------------------------------------------------------------------------


@dataclass
class Predictions:
    """Label-space logits of every prompt of a set, in the set's order."""

    logits: Float[Tensor, "prompt n_labels"]
    true: Int[Tensor, "prompt"]
    induction_sums: dict[str, Tensor] | None
    seconds: float

    @property
    def predicted(self) -> Int[Tensor, "prompt"]:
        return self.logits.argmax(-1)

    @property
    def probabilities(self) -> Float[Tensor, "prompt n_labels"]:
        return self.logits.softmax(-1)


def _logits_and_label_attention(
    model, batch: PromptBatch
) -> tuple[Float[Tensor, "batch n_labels"], Float[Tensor, "batch layer head k"]]:
    """One forward: the label logits and every head's attention from the last position to the
    demonstration labels."""
    logits, rows = query_logits_and_rows(model, batch, range(model.cfg.n_layers))
    return logits.index_select(-1, batch.label_token_ids), gather_label_attention(rows, batch.label_positions)


def predict(model, prompts: PromptSet, batch_size: int = 8, attention: bool = False,
            progress: bool = True, desc: str = "evaluating") -> Predictions:
    """Label logits of every prompt (no gradients); with ``attention``, also the induction heads'
    label-attention sums (``induction_label_mass``) from the same forward."""
    device = next(model.parameters()).device
    attention = attention and prompts.k > 0
    logits, true = [], []
    sums: dict[str, Tensor] | None = None
    started = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    with torch.inference_mode():
        for batch in prompts.batches(batch_size):
            batch = batch.to(device)
            if attention:
                batch_logits, label_attention = _logits_and_label_attention(model, batch)
                batch_sums = induction_label_mass(label_attention.cpu(), batch.correct_mask.cpu(),
                                                  batch.prompt_lengths.cpu())
                sums = batch_sums if sums is None else {key: sums[key] + batch_sums[key] for key in sums}
            else:
                batch_logits = label_logits(model, batch)
            logits.append(batch_logits.float().cpu())
            true.append(batch.query_labels.cpu())
            bar.update(len(batch.query_labels))
    bar.close()
    return Predictions(torch.cat(logits), torch.cat(true), sums, time.perf_counter() - started)


def content_free_probabilities(
    model, dataset: ICLDataset, demo_pool: Sequence[Example], n: int = 512, k: int = 4, seed: int = 42,
    inputs: Sequence[str] = ("",), batch_size: int = 8, progress: bool = True,
) -> Float[Tensor, "n n_labels"]:
    """Label-space probabilities of ``n`` content-free queries (the strings ``inputs`` in turn; StaICC
    uses the empty string, Zhao et al. "N/A", "" and "[MASK]"), each after k real demonstrations
    drawn afresh from ``demo_pool``."""
    if n < 1 or not inputs:
        raise DataError("Calibration needs at least one content-free query and one content-free input.")
    queries = [Example(inputs[i % len(inputs)], 0) for i in range(n)]  # the label is never read
    prompts = build_prompts(model.tokenizer, dataset, queries, k=k, seed=seed, demo_pool=demo_pool,
                            max_length=model.cfg.n_ctx)
    return predict(model, prompts, batch_size, progress=progress, desc="calibrating").probabilities


# --- the evaluation job -------------------------------------------------------------------------------


@dataclass
class EvaluateConfig:
    """One evaluation of a model (or a fine-tuned run folder) on one data set. The test pool is
    ``split_pools(dataset, seed=pool_seed)``'s: it must be the training run's pool seed, so that
    test queries never were training examples."""

    model_or_run: str = DEFAULT_MODEL
    dataset: str = "sst2"
    n_test: int = 512  # test queries (from the test pool)
    demo_sets: int = 2  # demonstration sets per query (from the demonstration pool)
    k: int = 4
    seed: int = 42  # demonstration sampling
    pool_seed: int | None = None  # None: seed
    batch_size: int = 8
    calibrate: bool = False
    n_calibration: int = 512  # content-free queries
    calibration_inputs: tuple[str, ...] = ("",)  # StaICC's; ("N/A", "", "[MASK]") for Zhao et al.'s
    robustness: bool = False
    robustness_queries: int = 64  # a subset of the test queries: each costs 9 + demo-set forwards
    robustness_demo_sets: int = 8
    unseen_labels: bool = False  # also runs 0-shot
    attention: bool = True  # the induction heads' correct/wrong label mass on the test prompts
    label_words: tuple[str, ...] | None = None
    device: str | None = None
    out: str | None = None  # default: RUN_DIR/evaluate_<dataset>/, or runs/evaluate_<model>_<dataset>
    precision: Precision = "auto"  # bf16 autocast mixed precision or fp32; auto: bf16 where it is fast
    dtype: WeightDtype = "float32"  # how the model's weights are held
    overwrite: bool = False  # the CLI refuses an existing non-empty out folder unless this (runs.check_out_dir)

    def __post_init__(self) -> None:
        validate_config(self, positive=("n_test", "demo_sets", "k", "batch_size", "n_calibration",
                                        "robustness_queries", "robustness_demo_sets"),
                        non_negative=("seed",))
        check_int("pool_seed", self.pool_seed, 0, allow_none=True)

    @property
    def pools_seed(self) -> int:
        return self.seed if self.pool_seed is None else self.pool_seed


@dataclass
class EvaluationResult:
    """``metrics``: flat JSON-ready numbers (distributions as {label word: fraction});
    ``predictions``: one row per test input; ``tables``: the other conditions' predictions
    (``unseen_label``, ``zero_shot``, ``robustness``) in the same tidy form."""

    metrics: dict[str, object]
    predictions: pd.DataFrame
    config: EvaluateConfig
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    run_dir: Path | None = None


def predictions_frame(
    predictions: Predictions, label_words: Sequence[str], n_queries: int,
    calibrated: Float[Tensor, "prompt n_labels"] | None = None,
) -> pd.DataFrame:
    """A tidy table: prompt i is query ``i % n_queries`` of repeat ``i // n_queries`` (the order
    of ``build_prompts``); label logits and probabilities in one column per label word."""
    n = len(predictions.true)
    words = np.array(label_words)
    frame = pd.DataFrame({
        "query": np.arange(n) % n_queries,
        "repeat": np.arange(n) // n_queries,
        "true_label": words[predictions.true.numpy()],
        "predicted_label": words[predictions.predicted.numpy()],
        "correct": (predictions.true == predictions.predicted).numpy(),
    })
    for i, word in enumerate(label_words):
        frame[f"logit_{word}"] = predictions.logits[:, i].numpy()
    for i, word in enumerate(label_words):
        frame[f"prob_{word}"] = predictions.probabilities[:, i].numpy()
    if calibrated is not None:
        frame["calibrated_label"] = words[calibrated.argmax(-1).numpy()]
        for i, word in enumerate(label_words):
            frame[f"calibrated_prob_{word}"] = calibrated[:, i].numpy()
    return frame


def _collapsed_word(predicted: Tensor, true: Tensor, label_words: Sequence[str]) -> str | None:
    n = len(label_words)
    top = collapsed_label(label_distribution(predicted, n), label_distribution(true, n))
    return None if top is None else label_words[top]


def _distribution(labels: Tensor, label_words: Sequence[str]) -> dict[str, float]:
    return dict(zip(label_words, label_distribution(labels, len(label_words)).tolist(), strict=True))


def evaluate(model, dataset: ICLDataset, config: EvaluateConfig | None = None,
             progress: bool = True) -> EvaluationResult:
    """Evaluate ``model`` on ``dataset`` (see the module doc) in ``config.precision``;
    ``config.model_or_run``, ``config.dataset``, ``device`` and ``out`` are not read here
    (``run_evaluation`` uses them)."""
    config = config or EvaluateConfig()
    with autocast(config.precision, model):
        return _evaluate(model, dataset, config, progress)


def _evaluate(model, dataset: ICLDataset, config: EvaluateConfig, progress: bool) -> EvaluationResult:
    started = time.perf_counter()
    pools = split_pools(dataset, seed=config.pools_seed)
    if config.n_test > len(pools.test):
        raise DataError(f"n_test = {config.n_test}, but the test pool of '{dataset.name}' has only "
                        f"{len(pools.test)} queries.")
    queries = pools.test[: config.n_test]
    words = dataset.label_words
    n_labels = len(words)
    build = dict(k=config.k, demo_pool=pools.demo, max_length=model.cfg.n_ctx)
    n_forwards = 0

    prompts = build_prompts(model.tokenizer, dataset, queries, seed=config.seed, repeats=config.demo_sets,
                            **build)
    test = predict(model, prompts, config.batch_size, attention=config.attention, progress=progress)
    n_forwards += len(prompts)
    metrics: dict[str, object] = {
        "dataset": dataset.name, "k": config.k, "n_queries": len(queries), "demo_sets": config.demo_sets,
        "n_inputs": len(prompts),
        "accuracy": accuracy(test.true, test.predicted),
        "macro_f1": macro_f1(test.true, test.predicted, n_labels),
        "predicted_distribution": _distribution(test.predicted, words),
        "true_distribution": _distribution(test.true, words),
        "collapsed_onto": _collapsed_word(test.predicted, test.true, words),
        "mean_prompt_tokens": float(np.mean([len(p.tokens) for p in prompts.prompts])),
    }
    if test.induction_sums is not None:
        metrics.update(summarise_induction(test.induction_sums))

    calibrated = None
    if config.calibrate:
        content_free = content_free_probabilities(
            model, dataset, pools.demo, config.n_calibration, config.k, config.seed + 2,
            config.calibration_inputs, config.batch_size, progress)
        n_forwards += config.n_calibration
        calibrated = calibrate_probabilities(test.probabilities, content_free)
        metrics.update({
            "calibrated_accuracy": accuracy(test.true, calibrated.argmax(-1)),
            "calibrated_macro_f1": macro_f1(test.true, calibrated.argmax(-1), n_labels),
            "calibrated_predicted_distribution": _distribution(calibrated.argmax(-1), words),
            "calibrated_collapsed_onto": _collapsed_word(calibrated.argmax(-1), test.true, words),
            "content_free_probabilities": dict(zip(words, content_free.mean(0).tolist(), strict=True)),
            "n_calibration": config.n_calibration,
        })
    tables: dict[str, pd.DataFrame] = {}

    if config.unseen_labels:
        unseen_prompts = build_prompts(model.tokenizer, dataset, queries, seed=config.seed,
                                       repeats=config.demo_sets, demo_sampling="unseen_label", **build)
        unseen = predict(model, unseen_prompts, config.batch_size, progress=progress, desc="unseen labels")
        zero_prompts = build_prompts(model.tokenizer, dataset, queries, k=0, seed=config.seed,
                                     max_length=model.cfg.n_ctx)
        zero = predict(model, zero_prompts, config.batch_size, progress=progress, desc="0-shot")
        n_forwards += len(unseen_prompts) + len(zero_prompts)
        metrics.update({
            "unseen_label_accuracy": accuracy(unseen.true, unseen.predicted),
            "random_demo_accuracy": metrics["accuracy"],
            "zero_shot_accuracy": accuracy(zero.true, zero.predicted),
            "unseen_label_macro_f1": macro_f1(unseen.true, unseen.predicted, n_labels),
            "zero_shot_macro_f1": macro_f1(zero.true, zero.predicted, n_labels),
        })
        tables["unseen_label"] = predictions_frame(unseen, words, len(queries))
        tables["zero_shot"] = predictions_frame(zero, words, len(queries))

    if config.robustness:
        robustness, frame = _robustness(model, dataset, pools.demo, queries[: config.robustness_queries],
                                        config, progress)
        n_forwards += len(frame)
        metrics.update(robustness)
        tables["robustness"] = frame

    seconds = time.perf_counter() - started
    metrics.update({"n_forwards": n_forwards, "seconds": round(seconds, 2),
                    "seconds_per_prompt": test.seconds / len(prompts)})
    return EvaluationResult(metrics, predictions_frame(test, words, len(queries), calibrated), config, tables)


def _robustness(model, dataset: ICLDataset, demo_pool: Sequence[Example], queries: Sequence[Example],
                config: EvaluateConfig, progress: bool) -> tuple[dict[str, object], pd.DataFrame]:
    """Predictions of each query under the 9 L9 templates (one shared demonstration set, so only
    the template varies) and under ``robustness_demo_sets`` fresh demonstration sets (default
    template), and their consistency scores."""
    n = len(queries)
    frames, by_variant = [], {}
    build = dict(k=config.k, demo_pool=demo_pool, max_length=model.cfg.n_ctx)
    for index, template in enumerate(l9_templates(dataset)):
        prompts = build_prompts(model.tokenizer, dataset, queries, seed=config.seed, template=template,
                                **build)
        result = predict(model, prompts, config.batch_size, progress=progress, desc=f"template {index + 1}/9")
        by_variant.setdefault("template", []).append(result.predicted)
        frame = predictions_frame(result, dataset.label_words, n)
        frames.append(frame.assign(variant="template", variant_index=index))
    prompts = build_prompts(model.tokenizer, dataset, queries, seed=config.seed + 1,
                            repeats=config.robustness_demo_sets, **build)
    result = predict(model, prompts, config.batch_size, progress=progress, desc="demonstration sets")
    by_variant["demos"] = list(einops.rearrange(result.predicted, "(repeat query) -> repeat query", query=n))
    frame = predictions_frame(result, dataset.label_words, n)
    frames.append(frame.assign(variant="demos", variant_index=frame["repeat"]))

    scores = {name: consistency_score(torch.stack(preds, dim=1)) for name, preds in by_variant.items()}
    metrics = {"consistency_templates": scores["template"], "consistency_demos": scores["demos"],
               "consistency": (scores["template"] + scores["demos"]) / 2, "robustness_queries": n,
               "robustness_demo_sets": config.robustness_demo_sets}
    table = pd.concat(frames, ignore_index=True).drop(columns="repeat")
    first = ["variant", "variant_index"]
    return metrics, table[first + [column for column in table.columns if column not in first]]


def evaluate_datasets(model, datasets: Sequence[str | ICLDataset], config: EvaluateConfig | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """Out-of-domain evaluation: one model on several data sets with the same settings; one row
    per data set with the scalar metrics (for a model fine-tuned on one of them, the others
    measure out-of-domain harm)."""
    config = config or EvaluateConfig()
    rows = []
    for item in datasets:
        dataset = item if isinstance(item, ICLDataset) else load_dataset(item, config.label_words)
        result = evaluate(model, dataset, replace(config, dataset=dataset.name), progress)
        rows.append({key: value for key, value in result.metrics.items() if not isinstance(value, dict)})
    return pd.DataFrame(rows)


def out_of_domain_harm(table: pd.DataFrame) -> pd.DataFrame:
    """Out-of-domain harm from a long table of accuracies (columns ``trained_on``, ``dataset``, ``method``,
    ``seed``, ``accuracy``; the base model's rows have method ``vanilla``): per fine-tuned row, the
    vanilla accuracy on the same data set and seed minus the fine-tuned model's (positive = harm) in
    a new column ``harm``. Both must come from the same evaluation settings."""
    vanilla = table[table["method"] == "vanilla"].set_index(["dataset", "seed"])["accuracy"]
    tuned = table[table["method"] != "vanilla"].copy()
    reference = [vanilla.get((d, s), float("nan")) for d, s in zip(tuned["dataset"], tuned["seed"], strict=True)]
    tuned["harm"] = pd.Series(reference, index=tuned.index, dtype=float) - tuned["accuracy"]
    return tuned


# --- run folders -----------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    """A fine-tuning run folder: a ``config.json`` written by ``runs.save_config`` (fields under
    ``"config"``; a Hugging Face model directory's config.json has none) and a checkpoint."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        payload = json.loads(config.read_text())
    except ValueError:
        return False
    has_checkpoint = any(path.glob("*.safetensors")) or any(path.glob("checkpoint*"))
    return isinstance(payload, dict) and "config" in payload and has_checkpoint


def check_not_broken_run_dir(path: Path) -> None:
    """A folder with a fine-tuning run's files (trained.safetensors, checkpoints/) but no run config.json,
    or with a run config.json but no trained tensors, is a damaged or unfinished run folder, not a Hugging
    Face model directory: an error naming it, before any model loads."""
    if not path.is_dir() or is_run_dir(path):
        return
    config = path / "config.json"
    try:
        payload = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, ValueError):
        payload = None  # unreadable
    if isinstance(payload, dict) and "config" in payload:
        raise AbftLensError(f"{path} holds a job's config.json but no trained.safetensors and no checkpoint: it "
                            "is not a finished fine-tuning run (nor a model directory). Pass a finished run "
                            "folder, or re-run the fine-tuning.")
    run_files = [name for name in ("trained.safetensors", "checkpoints") if (path / name).exists()]
    if not run_files or isinstance(payload, dict):  # a model directory (a Hugging Face config.json)
        return
    problem = "has a config.json that cannot be read" if config.is_file() else "has no config.json"
    raise AbftLensError(f"{path} looks like a fine-tuning run folder (it has {' and '.join(run_files)}) but "
                        f"{problem}, so its base model and settings are unknown. Pass a complete run folder, "
                        "or re-run the fine-tuning.")


def _run_record(run_dir: Path) -> dict[str, object]:
    return json.loads((run_dir / "config.json").read_text()).get("config", {})


def run_defaults(model_or_run: str) -> dict[str, object]:
    """For a run folder, the evaluation settings that follow the training run: its data set, k, label
    words and pool seed (so that the test pool is disjoint from the pool it trained on). Empty for a
    bare model."""
    source = Path(model_or_run)
    if not is_run_dir(source):
        return {}
    record = _run_record(source)
    defaults: dict[str, object] = {}
    if isinstance(record.get("dataset"), str):
        defaults["dataset"] = record["dataset"]
    if isinstance(record.get("k"), int):
        defaults["k"] = record["k"]
    if record.get("label_words"):
        defaults["label_words"] = tuple(record["label_words"])
    pool_seed = record.get("pool_seed", record.get("seed"))
    if isinstance(pool_seed, int):
        defaults["pool_seed"] = pool_seed
    return defaults


def default_out(config: EvaluateConfig) -> Path:
    if config.out:
        return Path(config.out)
    source = Path(config.model_or_run)
    dataset = Path(config.dataset).stem
    if is_run_dir(source):
        return source / f"evaluate_{dataset}"
    return Path("runs") / f"evaluate_{source.name}_{dataset}"


def load_model_or_run(config: EvaluateConfig):
    """A bare model by name or path, or the fine-tuned model of a run folder."""
    source = Path(config.model_or_run)
    check_not_broken_run_dir(source)
    if is_run_dir(source):
        try:
            from abft_lens.training import load_trained_model
        except ImportError as error:
            raise AbftLensError(f"{source} is a run folder, but abft_lens.training cannot be imported "
                                f"to load it: {error}") from error
        return load_trained_model(source, device=config.device, dtype=config.dtype)
    from abft_lens.models import load_model

    return load_model(config.model_or_run, device=config.device, dtype=WEIGHT_DTYPES[config.dtype])


def run_evaluation(config: EvaluateConfig, model=None, progress: bool = True) -> EvaluationResult:
    """The `evaluate` job: load the model (or use ``model``), evaluate, and write the output folder
    (config.json, metrics.json, predictions.csv and one CSV per extra condition)."""
    dataset = load_dataset(config.dataset, config.label_words)  # before the model: a bad data file fails at once
    model = model if model is not None else load_model_or_run(config)
    device = next(model.parameters()).device
    config, choice = resolve_config_precision(config, device, announce=progress)
    result = evaluate(model, dataset, config, progress)
    out = default_out(config)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, config, pools_seed=config.pools_seed, precision_reason=choice.reason)
    write_json(out / "metrics.json", {"model_or_run": config.model_or_run, **result.metrics})
    atomic_write_text(out / "predictions.csv", result.predictions.to_csv(index=False, float_format="%.6g"))
    for name, table in result.tables.items():
        atomic_write_text(out / f"predictions_{name}.csv", table.to_csv(index=False, float_format="%.6g"))
    result.run_dir = out
    return result


def _shares(distribution: dict[str, float]) -> str:
    return ", ".join(f"{word} {share:.2f}" for word, share in distribution.items())


def headline(metrics: dict[str, object]) -> list[str]:
    """The metrics a person reads first, one line each."""
    m = metrics
    lines = [f"accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  ({m['n_inputs']} inputs = "
             f"{m['n_queries']} queries x {m['demo_sets']} demonstration sets, k={m['k']})",
             f"predicted labels: {_shares(m['predicted_distribution'])}"]
    if m.get("collapsed_onto"):
        lines.append(f"COLLAPSED onto '{m['collapsed_onto']}': over {COLLAPSE_SHARE:.0%} of the predictions, "
                     f"true share {m['true_distribution'][m['collapsed_onto']]:.2f}; read accuracy with care")
    if "calibrated_accuracy" in m:
        lines.append(f"calibrated: accuracy {m['calibrated_accuracy']:.3f}  "
                     f"macro-F1 {m['calibrated_macro_f1']:.3f}; predicted labels: {_shares(m['calibrated_predicted_distribution'])}")
    if "consistency" in m:
        lines.append(f"consistency {m['consistency']:.3f} (templates {m['consistency_templates']:.3f}, "
                     f"demonstration sets {m['consistency_demos']:.3f}; {m['robustness_queries']} queries)")
    if "unseen_label_accuracy" in m:
        lines.append(f"unseen-label accuracy {m['unseen_label_accuracy']:.3f} vs random demonstrations "
                     f"{m['random_demo_accuracy']:.3f} and 0-shot {m['zero_shot_accuracy']:.3f}")
    if "induction_heads_per_prompt" in m:
        lines.append(f"induction heads: {m['induction_heads_per_prompt']:.1f} per prompt, label mass "
                     f"correct {m['induction_correct_mass']:.3f} / wrong {m['induction_wrong_mass']:.3f}")
    lines.append(f"{m['n_forwards']} prompts in {m['seconds']:.0f} s "
                 f"({m['seconds_per_prompt']:.3f} s per test prompt, batched)")
    return lines
