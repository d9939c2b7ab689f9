"""The `find-heads` job: score every head of a model on probe prompts, rank, select, and write a
run folder (config.json, run.log, heads.csv, heatmap.html, attention_examples.json, report.html)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from abft_lens.data import load_dataset, split_pools
from abft_lens import distributed
from abft_lens.heads import HeadScoreConfig, HeadScores, RankBy, ThresholdKind, accumulate_head_statistics
from abft_lens.models import DEFAULT_MODEL, load_model, parse_device_map
from abft_lens.plots import head_heatmap, save_figure
from abft_lens.config import validate_config
from abft_lens.precision import (
    WEIGHT_DTYPES,
    Precision,
    WeightDtype,
    autocast,
    resolve_config_precision,
)
from abft_lens.prompts import build_prompts
from abft_lens.runs import atomic_write_text, run_log, save_config

log = logging.getLogger("abft_lens.find_heads")

HEADS_COLUMNS = ("rank", "layer", "head", "label_mass", "label_mass_se", "correctness", "correctness_se",
                 "pass_rate", "uniform_mass", "mean_threshold", "n_prompts")


@dataclass
class FindHeadsConfig:
    model: str = DEFAULT_MODEL
    dataset: str = "sst2"
    k: int = 4
    n_prompts: int = 256
    threshold: ThresholdKind = "paper"
    tau: float = 2.0
    rank_by: RankBy = "pass_rate"
    top: int = 20
    seed: int = 42
    batch_size: int = 8
    label_words: tuple[str, ...] | None = None
    device: str | None = None
    device_map: str | None = None  # accelerate placement: auto, balanced, cpu or a JSON map (see load_model)
    n_devices: int | None = None  # split the model over this many GPUs
    out: str | None = None  # default: runs/find-heads_<model>_<dataset>
    precision: Precision = "auto"  # bf16 autocast mixed precision or fp32; auto: bf16 where it is fast
    dtype: WeightDtype = "float32"  # how the model's weights are held
    overwrite: bool = False  # the CLI refuses an existing non-empty out folder unless this (runs.check_out_dir)

    def __post_init__(self) -> None:
        validate_config(self, positive=("k", "n_prompts", "top", "batch_size"), non_negative=("seed",),
                        optional_positive=("n_devices",), positive_float=("tau",))

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"find-heads_{Path(self.model).name}_{Path(self.dataset).stem}"


@dataclass
class FindHeadsResult:
    scores: HeadScores
    run_dir: Path
    seconds: float

    def top_table(self, top: int):
        return self.scores.table.head(top)[list(HEADS_COLUMNS[:8])]


def find_heads(config: FindHeadsConfig, model=None, progress: bool = True) -> FindHeadsResult:
    """Run the job; ``model`` may be passed in to reuse a loaded one (it must be ``config.model``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank scores its share of the probe prompts (whole
    batches, see ``distributed.shard_batches``), the per-head sums are all-reduced, and rank 0 alone
    writes the run folder; every rank returns the same scores."""
    with distributed.process_group(), contextlib.ExitStack() as stack:
        if distributed.is_main_process():  # rank 0 alone writes the run folder, its log included
            stack.enter_context(run_log(config.run_dir(), "find-heads"))
        log.info("find-heads %s on %s: %d prompts, k=%d, threshold %s, ranked by %s", config.model,
                 config.dataset, config.n_prompts, config.k, config.threshold, config.rank_by)
        return _find_heads(config, model, progress)


def _find_heads(config: FindHeadsConfig, model, progress: bool) -> FindHeadsResult:
    started = time.perf_counter()
    dataset = load_dataset(config.dataset, config.label_words)  # before the model: a bad data file fails at once
    model = model if model is not None else load_model(config.model, device=config.device,
                                                       dtype=WEIGHT_DTYPES[config.dtype],
                                                       device_map=parse_device_map(config.device_map),
                                                       n_devices=config.n_devices)
    config, choice = resolve_config_precision(config, next(model.parameters()).device,
                                              announce=progress and distributed.is_main_process())
    pools = split_pools(dataset, seed=config.seed)
    prompts = build_prompts(model.tokenizer, dataset, pools.train, n_prompts=min(config.n_prompts, len(pools.train)),
                            k=config.k, seed=config.seed, max_length=model.cfg.n_ctx)
    score_config = HeadScoreConfig(config.threshold, config.tau, config.rank_by, config.batch_size)
    shard = distributed.shard_batches(len(prompts), config.batch_size)
    with autocast(config.precision, model):
        stats = accumulate_head_statistics(model, prompts, score_config, indices=shard,
                                           progress=progress and distributed.is_main_process())
    scores = HeadScores(distributed.all_reduce_head_statistics(stats).to_frame(config.rank_by))
    run_dir = config.run_dir()
    seconds = time.perf_counter() - started
    log.info("scored %d prompts in %.1f s (precision %s: %s)", len(prompts), seconds, config.precision,
             choice.reason)
    if not distributed.is_main_process():
        return FindHeadsResult(scores, run_dir, seconds)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, config, pools=pools.sizes(), n_prompts_scored=len(prompts),
                world_size=distributed.get_world_size(),
                label_words=list(dataset.label_words), label_token_ids=list(prompts.label_token_ids),
                mean_prompt_tokens=sum(len(p.tokens) for p in prompts.prompts) / len(prompts),
                precision_reason=choice.reason,
                seconds=round(seconds, 1))
    atomic_write_text(run_dir / "heads.csv", scores.table[list(HEADS_COLUMNS)].to_csv(index=False, float_format="%.6g"))
    title = f"{config.model} on {dataset.name}: correct minus wrong label attention (k={config.k})"
    save_figure(head_heatmap(scores.table, "correctness", title), run_dir / "heatmap")
    save_figure(head_heatmap(scores.table, "label_mass", f"{config.model} on {dataset.name}: label attention mass"),
                run_dir / "heatmap_label_mass")
    from abft_lens.report import write_job_report  # the attention views need the model, which is here

    with autocast(config.precision, model):
        write_job_report(run_dir, models={"model": model})
    top = scores.table.iloc[0]
    log.info("top head L%dH%d (%s %.3f); wrote %s", top["layer"], top["head"], config.rank_by, top[config.rank_by],
             run_dir)
    return FindHeadsResult(scores, run_dir, seconds)
