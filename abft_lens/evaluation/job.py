"""The `evaluate` job: its typed config, the evaluation of one model on one data set (test accuracy,
calibration, robustness, unseen labels), out-of-domain tables, and the output folder. A fine-tuning
run folder is read through ``abft_lens.runs``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from abft_lens.config import check_int, validate_config
from abft_lens.data import Example, ICLDataset, l9_templates, load_dataset, split_pools
from abft_lens.errors import DataError
from abft_lens.icl_tests import icl_test_dataset, icl_test_k, memorised_share
from abft_lens.evaluation.metrics import (
    COLLAPSE_MARGIN,
    COLLAPSE_SHARE,
    accuracy,
    calibrate_probabilities,
    collapsed_label,
    consistency_score,
    label_distribution,
    macro_f1,
    summarise_induction,
)
from abft_lens.evaluation.outputs import Predictions
from abft_lens.evaluation.partial import PartialPredictions, numerics_context
from abft_lens.evaluation.prediction import content_free_probabilities, predict
from abft_lens.models import DEFAULT_MODEL
from abft_lens.precision import (
    WEIGHT_DTYPES,
    Precision,
    WeightDtype,
    autocast,
    resolve_config_precision,
)
from abft_lens.prompts import build_prompts
from abft_lens.runs import (
    PARTIAL_PREDICTIONS_DIR,
    atomic_write_text,
    check_not_broken_run_dir,
    is_run_dir,
    load_trained_model,
    run_log,
    run_record,
    save_config,
    write_json,
)

log = logging.getLogger("abft_lens.evaluate")


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
    icl_tests: bool = False  # flipped and symbol labels (abft_lens.icl_tests): following the prompt's mapping
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
             progress: bool = True, partial: PartialPredictions | None = None) -> EvaluationResult:
    """Evaluate ``model`` on ``dataset`` (see the module doc) in ``config.precision``;
    ``config.model_or_run``, ``config.dataset``, ``device`` and ``out`` are not read here
    (``run_evaluation`` uses them). ``partial``: where finished batches are kept, for a resumable run."""
    config = config or EvaluateConfig()
    with autocast(config.precision, model):
        return _evaluate(model, dataset, config, progress, partial)


def _evaluate(model, dataset: ICLDataset, config: EvaluateConfig, progress: bool,
              partial: PartialPredictions | None) -> EvaluationResult:
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
    test = predict(model, prompts, config.batch_size, attention=config.attention, progress=progress,
                   partial=partial)
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
            config.calibration_inputs, config.batch_size, progress=progress, partial=partial)
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
        unseen = predict(model, unseen_prompts, config.batch_size, progress=progress, desc="unseen labels",
                         partial=partial)
        zero_prompts = build_prompts(model.tokenizer, dataset, queries, k=0, seed=config.seed,
                                     max_length=model.cfg.n_ctx)
        zero = predict(model, zero_prompts, config.batch_size, progress=progress, desc="0-shot", partial=partial)
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

    if config.icl_tests:
        for test_name in ("flipped", "symbols"):
            result, frame = _icl_test(model, test_name, dataset, queries, pools.demo, config, progress, partial)
            n_forwards += len(frame)
            metrics.update(result)
            tables[f"icl_{test_name}"] = frame

    if config.robustness:
        robustness, frame = _robustness(model, dataset, pools.demo, queries[: config.robustness_queries],
                                        config, progress, partial)
        n_forwards += len(frame)
        metrics.update(robustness)
        tables["robustness"] = frame

    seconds = time.perf_counter() - started
    metrics.update({"n_forwards": n_forwards, "seconds": round(seconds, 2),
                    "seconds_per_prompt": test.seconds / len(prompts)})
    return EvaluationResult(metrics, predictions_frame(test, words, len(queries), calibrated), config, tables)


def _icl_test(model, test_name: str, dataset: ICLDataset, queries: Sequence[Example],
              demo_pool: Sequence[Example], config: EvaluateConfig, progress: bool,
              partial: PartialPredictions | None) -> tuple[dict[str, object], pd.DataFrame]:
    """One ICL test (``abft_lens.icl_tests``): the same queries with the label words flipped by a
    derangement, or replaced by symbols, every label shown (k >= the number of labels), scored
    against the in-prompt mapping; for ``flipped``, the share of answers that keep the words' usual
    meaning instead."""
    tested, sigma = icl_test_dataset(test_name, dataset, model.tokenizer, seed=config.seed)
    k = icl_test_k(len(dataset.label_words), config.k)
    prompts = build_prompts(model.tokenizer, tested, queries, k=k, seed=config.seed + 3, repeats=config.demo_sets,
                            demo_pool=demo_pool, demo_sampling="every_label", max_length=model.cfg.n_ctx)
    found = predict(model, prompts, config.batch_size, progress=progress, desc=f"ICL test: {test_name}",
                    partial=partial)
    n_labels = len(tested.label_words)
    result: dict[str, object] = {
        f"{test_name}_k": k,
        f"{test_name}_label_words": list(tested.label_words),
        f"{test_name}_accuracy": accuracy(found.true, found.predicted),
        f"{test_name}_macro_f1": macro_f1(found.true, found.predicted, n_labels),
        f"{test_name}_predicted_distribution": _distribution(found.predicted, tested.label_words),
    }
    if sigma is not None:
        result["flipped_memorised_share"] = memorised_share(found.predicted.numpy(), found.true.numpy(), sigma)
    return result, predictions_frame(found, tested.label_words, len(queries))


def _robustness(model, dataset: ICLDataset, demo_pool: Sequence[Example], queries: Sequence[Example],
                config: EvaluateConfig, progress: bool, partial: PartialPredictions | None
                ) -> tuple[dict[str, object], pd.DataFrame]:
    """Predictions of each query under the 9 L9 templates (one shared demonstration set, so only
    the template varies) and under ``robustness_demo_sets`` fresh demonstration sets (default
    template), and their consistency scores."""
    n = len(queries)
    frames, by_variant = [], {}
    build = dict(k=config.k, demo_pool=demo_pool, max_length=model.cfg.n_ctx)
    for index, template in enumerate(l9_templates(dataset)):
        prompts = build_prompts(model.tokenizer, dataset, queries, seed=config.seed, template=template,
                                **build)
        result = predict(model, prompts, config.batch_size, progress=progress, desc=f"template {index + 1}/9",
                         partial=partial)
        by_variant.setdefault("template", []).append(result.predicted)
        frame = predictions_frame(result, dataset.label_words, n)
        frames.append(frame.assign(variant="template", variant_index=index))
    prompts = build_prompts(model.tokenizer, dataset, queries, seed=config.seed + 1,
                            repeats=config.robustness_demo_sets, **build)
    result = predict(model, prompts, config.batch_size, progress=progress, desc="demonstration sets",
                     partial=partial)
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


# --- the job and its output folder -------------------------------------------------------------------


def run_defaults(model_or_run: str) -> dict[str, object]:
    """For a run folder, the evaluation settings that follow the training run: its data set, k, label
    words and pool seed (so that the test pool is disjoint from the pool it trained on). Empty for a
    bare model."""
    source = Path(model_or_run)
    if not is_run_dir(source):
        return {}
    record = run_record(source)
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
        return load_trained_model(source, device=config.device, dtype=config.dtype)
    from abft_lens.models import load_model

    return load_model(config.model_or_run, device=config.device, dtype=WEIGHT_DTYPES[config.dtype])


def run_evaluation(config: EvaluateConfig, model=None, progress: bool = True) -> EvaluationResult:
    """The `evaluate` job: load the model (or use ``model``), evaluate, and write the output folder
    (config.json, metrics.json, predictions.csv and one CSV per extra condition). Finished batches are
    kept in the folder until then (``abft_lens.evaluation.partial``): the same job run again after an
    interruption goes on where it stopped."""
    dataset = load_dataset(config.dataset, config.label_words)  # before the model: a bad data file fails at once
    out = default_out(config)
    with run_log(out, "evaluate"):
        log.info("evaluate %s on %s: %d test queries x %d demonstration sets, k=%d", config.model_or_run,
                 dataset.name, config.n_test, config.demo_sets, config.k)
        model = model if model is not None else load_model_or_run(config)
        device = next(model.parameters()).device
        config, choice = resolve_config_precision(config, device, announce=progress)
        log.info("precision %s (%s)", config.precision, choice.reason)
        context = numerics_context(config.precision, config.dtype, device, choice.reason)
        partial = PartialPredictions.for_model(out / PARTIAL_PREDICTIONS_DIR, model, context)
        result = evaluate(model, dataset, config, progress, partial)
        result.metrics["resumed_prompts"] = partial.read_back
        save_config(out, config, pools_seed=config.pools_seed, precision_reason=choice.reason)
        write_json(out / "metrics.json", {"model_or_run": config.model_or_run, **result.metrics})
        atomic_write_text(out / "predictions.csv", result.predictions.to_csv(index=False, float_format="%.6g"))
        for name, table in result.tables.items():
            atomic_write_text(out / f"predictions_{name}.csv", table.to_csv(index=False, float_format="%.6g"))
        partial.discard()
        for line in headline(result.metrics):
            log.info("%s", line)
        log.info("wrote %s", out)
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
        word = m["collapsed_onto"]
        lines.append(f"COLLAPSED onto '{word}': {m['predicted_distribution'][word]:.0%} of the predictions (over "
                     f"{COLLAPSE_SHARE:.0%}), true share {m['true_distribution'][word]:.0%} (at least "
                     f"{COLLAPSE_MARGIN * 100:.0f} points below); read accuracy with care")
    if "calibrated_accuracy" in m:
        lines.append(f"calibrated: accuracy {m['calibrated_accuracy']:.3f}  "
                     f"macro-F1 {m['calibrated_macro_f1']:.3f}; predicted labels: {_shares(m['calibrated_predicted_distribution'])}")
    if "consistency" in m:
        lines.append(f"consistency {m['consistency']:.3f} (templates {m['consistency_templates']:.3f}, "
                     f"demonstration sets {m['consistency_demos']:.3f}; {m['robustness_queries']} queries)")
    if "unseen_label_accuracy" in m:
        lines.append(f"unseen-label accuracy {m['unseen_label_accuracy']:.3f} vs random demonstrations "
                     f"{m['random_demo_accuracy']:.3f} and 0-shot {m['zero_shot_accuracy']:.3f}")
    if "flipped_accuracy" in m:
        lines.append(f"ICL tests (k={m['flipped_k']}, every label shown): flipped labels accuracy "
                     f"{m['flipped_accuracy']:.3f} macro-F1 {m['flipped_macro_f1']:.3f}, answers keeping the "
                     f"usual meaning {m['flipped_memorised_share']:.2f}; symbol labels accuracy "
                     f"{m['symbols_accuracy']:.3f} macro-F1 {m['symbols_macro_f1']:.3f}")
    if "induction_heads_per_prompt" in m:
        lines.append(f"induction heads: {m['induction_heads_per_prompt']:.1f} per prompt, label mass "
                     f"correct {m['induction_correct_mass']:.3f} / wrong {m['induction_wrong_mass']:.3f}")
    resumed = f", {m['resumed_prompts']} of them read back from an interrupted run" if m.get("resumed_prompts") else ""
    lines.append(f"{m['n_forwards']} prompts{resumed} in {m['seconds']:.0f} s "
                 f"({m['seconds_per_prompt']:.3f} s per test prompt, batched)")
    return lines
