"""The `abft-lens` command line: a thin layer over the library's jobs and their config dataclasses.

Other packages (our `analysis/`) add commands through the entry-point group
``abft_lens.commands``: each entry point is a function ``register(app: typer.Typer) -> None``.
That keeps `abft_lens` from ever importing them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from abft_lens.choices import (
    Method,
    PidInput,
    Precision,
    RankBy,
    ThresholdKind,
    TrainingDemos,
    WeightDtype,
    checked,
)
from abft_lens.errors import AbftLensError, ConfigError, one_line
from abft_lens.runs import EVALUATE_RESUMABLE, check_out_dir, check_out_file, load_config, with_overrides

# Plain click help: rich markup would read each "[default: ...]" in a help text as a tag and drop it.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Find, score and fine-tune the induction heads behind in-context learning.")

PLUGIN_GROUP = "abft_lens.commands"


DEBUG_ENV = "ABFT_LENS_DEBUG"


# Options several commands share, defined once (each call gives a command its own typer.Option).
def device_option(help: str = "cpu, cuda, ..."):
    return typer.Option(None, help=help)


def label_words_option():
    return typer.Option(None, help="comma-separated label words replacing the data set's")


def precision_option(default: str = "auto"):
    """``default`` is only the help's text: the command's config holds the real default."""
    return typer.Option(None, callback=checked("precision", Precision),
                        help="auto (bf16 where the CPU has AMX/avx512_bf16 or the GPU bf16, else fp32), fp32, or "
                             f"bf16 (autocast mixed precision) [default: {default}]")


def dtype_option():
    return typer.Option(None, callback=checked("dtype", WeightDtype),
                        help="how the frozen weights are held: float32 or bfloat16 (half the memory; implies bf16 "
                             "matmuls) [default: float32]")


def overwrite_option():
    return typer.Option(None, "--overwrite/--no-overwrite",
                        help="replace the files of an existing non-empty --out folder [default: refuse it]")


def threshold_option(default: str = "paper"):
    """``default`` is only the help's text, as for ``precision_option``."""
    return typer.Option(None, callback=checked("threshold", ThresholdKind),
                        help=f"paper: k/(k+ln n_t); uniform: tau*k/n_t [default: {default}]")


def tau_option():
    return typer.Option(None, help="multiple of uniform attention for --threshold uniform")


@app.callback()
def _commands(
    debug: bool = typer.Option(False, "--debug", help=f"show the traceback of an error instead of one line "
                                                      f"(anywhere on the command line; or {DEBUG_ENV}=1)"),
) -> None:
    """Keeps `find-heads` a named command even while it is the only one. (``main`` takes ``--debug``
    off the command line before typer parses it; the option is here for ``--help``.)"""


def _print_table(frame) -> None:
    typer.echo(frame.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


@app.command("find-heads")
def find_heads_command(
    model: Optional[str] = typer.Argument(None, help="smollm2-135m (default), gemma3-270m, a Hub name such as "
                                                     "gpt2-xl, a local HF directory or a .gguf file"),
    dataset: Optional[str] = typer.Option(None, help="sst2, mr, fp, sst5, trec, subj, tee, teh, agnews, "
                                                     "hate_speech18, or a CSV/JSONL file [default: sst2]"),
    k: Optional[int] = typer.Option(None, help="demonstrations per prompt [default: 4]"),
    n_prompts: Optional[int] = typer.Option(None, help="probe prompts [default: 256]"),
    threshold: Optional[str] = threshold_option(),
    tau: Optional[float] = tau_option(),
    rank_by: Optional[str] = typer.Option(None, callback=checked("rank_by", RankBy), help="pass_rate, label_mass or correctness [default: pass_rate]"),
    top: Optional[int] = typer.Option(None, help="heads to print [default: 20]"),
    seed: Optional[int] = typer.Option(None, help="[default: 42]"),
    batch_size: Optional[int] = typer.Option(None, help="[default: 8]"),
    label_words: Optional[str] = label_words_option(),
    device: Optional[str] = device_option(),
    device_map: Optional[str] = typer.Option(None, help="spread or offload a large model (accelerate): auto, "
                                                        "balanced, cpu, or a JSON map; excludes --device"),
    n_devices: Optional[int] = typer.Option(None, help="split the model over this many GPUs; excludes --device"),
    out: Optional[Path] = typer.Option(None, help="run folder [default: runs/find-heads_<model>_<dataset>]"),
    precision: Optional[str] = precision_option(),
    dtype: Optional[str] = dtype_option(),
    overwrite: Optional[bool] = overwrite_option(),
    config: Optional[Path] = typer.Option(None, help="a FindHeadsConfig JSON (or a run folder's config.json)"),
) -> None:
    """Rank every attention head by how much it attends to the demonstration labels."""
    from abft_lens.distributed import is_main_process
    from abft_lens.find_heads import FindHeadsConfig, find_heads

    base = load_config(config, FindHeadsConfig) if config else FindHeadsConfig()
    words = tuple(w.strip() for w in label_words.split(",")) if label_words else None
    cfg = with_overrides(base, dict(model=model, dataset=dataset, k=k, n_prompts=n_prompts, threshold=threshold, tau=tau,
                            rank_by=rank_by, top=top, seed=seed, batch_size=batch_size, label_words=words,
                            device=device, device_map=device_map, n_devices=n_devices,
                            out=str(out) if out else None, precision=precision, dtype=dtype, overwrite=overwrite))
    check_out_dir(cfg.run_dir(), cfg.overwrite)
    result = find_heads(cfg)
    if not is_main_process():  # under torchrun, rank 0 alone reports
        return
    typer.echo(f"\nTop {cfg.top} heads of {cfg.model} on {cfg.dataset} "
               f"({cfg.n_prompts} prompts, k={cfg.k}, ranked by {cfg.rank_by}):")
    _print_table(result.top_table(cfg.top))
    row = result.scores.table.iloc[0]
    typer.echo(f"\nUniform attention would put {row['uniform_mass']:.3f} on the labels; "
               f"the paper's threshold averages {row['mean_threshold']:.3f}.")
    typer.echo(f"Run folder: {result.run_dir} ({result.seconds:.0f} s)")
    if (result.run_dir / "report.html").is_file():
        typer.echo(f"Report: {result.run_dir / 'report.html'}")


def _parse_lr(value: str | None) -> float | None | str:
    """``--lr 1e-4`` or ``--lr search``; "unset" (not given) is returned as the string "unset"."""
    if value is None:
        return "unset"
    if value.strip().lower() == "search":
        return None
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"--lr must be a number or 'search', got {value!r}") from None


def _parse_lr_grid(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(","))
    except ValueError:
        raise ConfigError(f"lr_grid must be comma-separated numbers; got {value!r}.") from None


@app.command("finetune")
def finetune_command(
    model: Optional[str] = typer.Argument(None, help="as for find-heads [default: smollm2-135m]"),
    dataset: Optional[str] = typer.Option(None, help="as for find-heads [default: sst2]"),
    method: Optional[str] = typer.Option(None, callback=checked("method", Method),
                                         help="abft, e2e (cross-entropy of the query's label), or either trained as "
                                              "LoRA adapters on q/k: abft-lora, e2e-lora (the paper's E2E "
                                              "baseline) [default: abft]"),
    n_train: Optional[int] = typer.Option(None, help="training prompts from the training pool [default: 512]"),
    n_val: Optional[int] = typer.Option(None, help="validation queries carved from the training pool, for the lr "
                                                   "search [default: 128]"),
    k: Optional[int] = typer.Option(None, help="demonstrations per prompt [default: 4]"),
    lr: Optional[str] = typer.Option(None, help="a learning rate, or 'search': the best of --lr-grid by validation "
                                                "accuracy after --lr-search-steps steps [default: search]"),
    lr_grid: Optional[str] = typer.Option(None, help="comma-separated lrs for the search [default: 2e-5,1e-4,3e-4,1e-3]"),
    lr_search_steps: Optional[int] = typer.Option(None, help="steps of each lr trial (8: Table 1's short search) "
                                                             "[default: --steps, a full-length trial]"),
    batch_size: Optional[int] = typer.Option(None, help="prompts per optimiser step (pseudo-batch) [default: 32]"),
    micro_batch_size: Optional[int] = typer.Option(None, help="prompts per forward [default: 8, or --batch-size "
                                                              "where that is smaller]"),
    steps: Optional[int] = typer.Option(None, help="optimiser steps [default: 32]"),
    heads: Optional[str] = typer.Option(None, help="per-prompt (the paper's threshold on each prompt), all (no head "
                                                   "filter) or a heads.csv (a fixed set) [default: per-prompt]"),
    head_top: Optional[int] = typer.Option(None, help="with a heads.csv: its first N rows [default: 20]"),
    threshold: Optional[str] = threshold_option(),
    tau: Optional[float] = tau_option(),
    pid: Optional[bool] = typer.Option(None, "--pid/--no-pid", help="adapt A by the PID controller [default: on]"),
    pid_input: Optional[str] = typer.Option(None, callback=checked("pid_input", PidInput),
                                            help="the PID's input: count (mean flagged heads per prompt, the "
                                                 "paper's) or relative (that count over its first value, times "
                                                 "--pid-reference-heads: the same gains on any number of heads) "
                                                 "[default: count]"),
    pid_reference_heads: Optional[float] = typer.Option(None, help="the relative PID input's scale, in heads "
                                                                   "[default: 50]"),
    terms: Optional[str] = typer.Option(None, help="both, reward (A = 0) or punish (B = 0) [default: both]"),
    initial_punish_weight: Optional[float] = typer.Option(None, help="A_0, the punishment weight the PID starts "
                                                                     "from (or keeps, with --no-pid) [default: 0.5]"),
    reward_weight: Optional[float] = typer.Option(None, help="B, the reward weight [default: 1]"),
    training_demos: Optional[str] = typer.Option(None, callback=checked("training_demos", TrainingDemos),
                                                 help="training prompts' demonstrations: random (the paper's) or "
                                                      "label_covering (one of the query's label forced, the rest "
                                                      "random) or label_covering_resampled (random sets redrawn "
                                                      "until one holds it) [default: random]"),
    e2e_softmax: Optional[str] = typer.Option(None, help="E2E cross-entropy over the label tokens (label) or the "
                                                         "vocabulary (vocab) [default: label]"),
    trainable: Optional[str] = typer.Option(None, help="qk (W_Q, W_K) or all (full fine-tuning) [default: qk]"),
    checkpoint_every: Optional[int] = typer.Option(None, help="steps between checkpoints [default: 4]"),
    keep_checkpoints: Optional[bool] = typer.Option(None, "--keep-checkpoints/--no-keep-checkpoints",
                                                    help="keep every checkpoint (for `abft-lens validate-checkpoints`), "
                                                         "not only the latest [default: off]"),
    seed: Optional[int] = typer.Option(None, help="prompts, data order [default: 42]"),
    pool_seed: Optional[int] = typer.Option(None, help="the train/demo/test split [default: 42]"),
    label_words: Optional[str] = label_words_option(),
    device: Optional[str] = device_option(),
    out: Optional[Path] = typer.Option(None, help="run folder [default: runs/finetune_<method>_<model>_<dataset>"
                                                  "_seed<seed>]"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                          help="continue a killed run from its last checkpoint"),
    precision: Optional[str] = precision_option(),
    dtype: Optional[str] = dtype_option(),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank r of the q/k adapters; with --method abft or e2e it "
                                                       "trains that method as LoRA [default: 16]"),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA alpha (update scale alpha / r) [default: 32]"),
    lora_dropout: Optional[float] = typer.Option(None, help="LoRA dropout, active in training steps [default: 0]"),
    load_in_4bit: Optional[bool] = typer.Option(None, "--load-in-4bit/--no-load-in-4bit",
                                                help="base weights in 4-bit NF4 (bitsandbytes, CUDA GPU only; LoRA "
                                                     "methods) [default: off]"),
    config: Optional[Path] = typer.Option(None, help="a FinetuneConfig JSON (or a run folder's config.json)"),
) -> None:
    """Fine-tune W_Q and W_K with ABFT (or the end-to-end baseline), in full or as LoRA adapters, and write
    a run folder."""
    from abft_lens.training import FinetuneConfig, run_finetune

    base = load_config(config, FinetuneConfig) if config else FinetuneConfig()
    words = tuple(w.strip() for w in label_words.split(",")) if label_words else None
    grid = _parse_lr_grid(lr_grid) if lr_grid else None
    if micro_batch_size is None and batch_size is not None and batch_size < base.micro_batch_size:
        micro_batch_size = batch_size  # only --batch-size given: the micro-batch follows it down
    chosen_method = method or base.method
    if lora_rank is not None and chosen_method in ("abft", "e2e"):
        method = f"{chosen_method}-lora"  # --lora-rank asks for adapters: the method's LoRA variant
    parsed_lr = _parse_lr(lr)
    if parsed_lr != "unset":
        base = dataclasses.replace(base, lr=parsed_lr)
    cfg = with_overrides(base, dict(model=model, dataset=dataset, method=method, n_train=n_train, n_val=n_val, k=k,
                            lr_grid=grid, lr_search_steps=lr_search_steps, batch_size=batch_size,
                            micro_batch_size=micro_batch_size, steps=steps, heads=heads, head_top=head_top,
                            threshold=threshold, tau=tau, pid=pid, pid_input=pid_input,
                            pid_reference_heads=pid_reference_heads, terms=terms,
                            initial_punish_weight=initial_punish_weight, reward_weight=reward_weight,
                            training_demos=training_demos, e2e_softmax=e2e_softmax, trainable=trainable,
                            checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, seed=seed,
                            pool_seed=pool_seed,
                            label_words=words, device=device, out=str(out) if out else None, resume=resume,
                            precision=precision, dtype=dtype, lora_rank=lora_rank, lora_alpha=lora_alpha,
                            lora_dropout=lora_dropout, load_in_4bit=load_in_4bit))
    result = run_finetune(cfg)
    from abft_lens.distributed import is_main_process
    if not is_main_process():  # under torchrun, rank 0 alone reports
        return
    metrics = result.metrics
    first, last = metrics.iloc[0], metrics.iloc[-1]
    typer.echo(f"\n{cfg.method.upper()} on {cfg.dataset}: {len(metrics)} steps at lr {result.lr:g}, "
               f"{result.trainable_params / 1e6:.2f}M trained parameters ({result.full_precision_params / 1e6:.2f}M "
               f"held in full precision for the objective), {result.train_seconds:.0f} s "
               f"({result.seconds_per_step:.1f} s per step)")
    if result.lr_search is not None:
        trials = ", ".join(f"{t['lr']:g}: {t['validation_accuracy']:.3f}" for t in result.lr_search.trials)
        typer.echo(f"lr search (validation accuracy after {result.lr_search.steps} steps; untrained "
                   f"{result.lr_search.baseline_accuracy:.3f}): {trials}")
    typer.echo(f"loss {first['loss']:.3f} -> {last['loss']:.3f}; flagged heads per prompt "
               f"{first['flagged_heads']:.1f} -> {last['flagged_heads']:.1f}; their label mass correct "
               f"{first['correct_mass']:.3f} -> {last['correct_mass']:.3f}, wrong {first['wrong_mass']:.3f} -> "
               f"{last['wrong_mass']:.3f}")
    typer.echo(f"Run folder: {result.run_dir} (evaluate it with `abft-lens evaluate {result.run_dir}`)")
    _report_after_job(result.run_dir, device=cfg.device)


@app.command("validate-checkpoints")
def validate_checkpoints_command(
    run_dir: Path = typer.Argument(..., help="a fine-tuning run folder (best one run with --keep-checkpoints)"),
    device: Optional[str] = device_option(),
) -> None:
    """Validation accuracy of the base model and of every checkpoint a run kept, on the run's own validation
    queries (from the training pool; the test pool is never used): RUN_DIR/validation_trajectory.csv."""
    from abft_lens.runs import VALIDATION_TRAJECTORY_FILE, run_record
    from abft_lens.training import validation_trajectory

    run_record(run_dir)  # a folder that is not a run: one line, before any model loads
    frame = validation_trajectory(run_dir, device=device)
    _print_table(frame)
    typer.echo(f"Written: {run_dir / VALIDATION_TRAJECTORY_FILE}")


@app.command("evaluate")
def evaluate_command(
    model_or_run: Optional[str] = typer.Argument(None, help="a model (as for find-heads; default smollm2-135m) "
                                                            "or a fine-tuning run folder"),
    dataset: Optional[str] = typer.Option(None, help="as for find-heads [default: the run's data set, else sst2]"),
    n_test: Optional[int] = typer.Option(None, help="test queries [default: 512]"),
    demo_sets: Optional[int] = typer.Option(None, help="demonstration sets per query [default: 2]"),
    k: Optional[int] = typer.Option(None, help="demonstrations per prompt [default: 4]"),
    seed: Optional[int] = typer.Option(None, help="demonstration sampling [default: 42]"),
    pool_seed: Optional[int] = typer.Option(None, help="pool split [default: the run's seed, else --seed]"),
    batch_size: Optional[int] = typer.Option(None, help="[default: 8]"),
    calibrate: Optional[bool] = typer.Option(None, "--calibrate/--no-calibrate",
                                             help="add contextual calibration [default: off]"),
    n_calibration: Optional[int] = typer.Option(None, help="content-free queries for calibration [default: 512]"),
    robustness: Optional[bool] = typer.Option(None, "--robustness/--no-robustness",
                                              help="prediction consistency over 9 templates and 8 demo sets"),
    robustness_queries: Optional[int] = typer.Option(None, help="test queries for --robustness [default: 64]"),
    unseen_labels: Optional[bool] = typer.Option(None, "--unseen-labels/--no-unseen-labels",
                                                 help="unseen-label and 0-shot accuracy [default: off]"),
    icl_tests: Optional[bool] = typer.Option(None, "--icl-tests/--no-icl-tests",
                                             help="flipped and symbol labels, every label shown: does the model "
                                                  "follow the prompt's mapping or its memory? [default: off]"),
    label_words: Optional[str] = label_words_option(),
    device: Optional[str] = device_option(),
    out: Optional[Path] = typer.Option(None, help="output folder [default: RUN_DIR/evaluate_<dataset>, or "
                                                  "runs/evaluate_<model>_<dataset> for a bare model]"),
    precision: Optional[str] = precision_option(),
    dtype: Optional[str] = dtype_option(),
    overwrite: Optional[bool] = overwrite_option(),
    config: Optional[Path] = typer.Option(None, help="an EvaluateConfig JSON (or an evaluation's config.json); "
                                          "for a run folder, the run's data set, k, label words and pool seed "
                                          "replace the file's (the test pool stays disjoint from the training "
                                          "pool), and flags replace both"),
) -> None:
    """Accuracy, macro-F1 and, on request, calibration, robustness and the unseen-label test."""
    from abft_lens.evaluation import (
        EvaluateConfig,
        check_not_broken_run_dir,
        default_out,
        headline,
        run_defaults,
        run_evaluation,
    )

    base = load_config(config, EvaluateConfig) if config else EvaluateConfig()
    if model_or_run is not None:
        base = dataclasses.replace(base, model_or_run=model_or_run)
    check_not_broken_run_dir(Path(base.model_or_run))
    base = with_overrides(base, run_defaults(base.model_or_run))
    words = tuple(w.strip() for w in label_words.split(",")) if label_words else None
    cfg = with_overrides(base, dict(dataset=dataset, n_test=n_test, demo_sets=demo_sets, k=k, seed=seed,
                            pool_seed=pool_seed, batch_size=batch_size, calibrate=calibrate, n_calibration=n_calibration,
                            robustness=robustness, robustness_queries=robustness_queries,
                            unseen_labels=unseen_labels, icl_tests=icl_tests, label_words=words, device=device,
                            out=str(out) if out else None, precision=precision, dtype=dtype, overwrite=overwrite))
    check_out_dir(default_out(cfg), cfg.overwrite, resumable=EVALUATE_RESUMABLE)
    result = run_evaluation(cfg)
    typer.echo(f"\n{cfg.model_or_run} on {cfg.dataset}:")
    for line in headline(result.metrics):
        typer.echo("  " + line)
    typer.echo(f"Output folder: {result.run_dir}")
    _report_after_job(result.run_dir, device=cfg.device)


@app.command("figures")
def figures_command(
    roots: Optional[list[Path]] = typer.Argument(None, help="folders to search for saved results "
                                                            "[default: runs benchmarks/results analysis/results]"),
    out: Path = typer.Option(Path("figures"), help="where the HTML and PNG files go"),
    png: bool = typer.Option(True, "--png/--no-png", help="also write PNG (needs kaleido and Chromium)"),
) -> None:
    """Redraw the paper's figures from saved run folders: head heatmaps, accuracy per data set beside
    the paper's quoted GPT2-XL numbers, training curves, and the analysis figures."""
    from abft_lens.figures import DEFAULT_ROOTS, make_figures

    report = make_figures(roots or list(DEFAULT_ROOTS), out, png)
    for path in report.written:
        typer.echo(f"  {path}")
    for reason in report.skipped:
        typer.echo(f"skipped: {reason}", err=True)
    typer.echo(f"{len(report.written)} files in {out}")


def _report_after_job(run_dir: Path, models=None, device: str | None = None) -> None:
    """The run folder's report.html, written at the end of a job (see abft_lens.report)."""
    from abft_lens.distributed import is_main_process
    from abft_lens.report import write_job_report

    if is_main_process():
        path = write_job_report(Path(run_dir), models=models, device=device)
        if path is not None:
            typer.echo(f"Report: {path}")


@app.command("show-attention")
def show_attention_command(
    model_or_run: str = typer.Argument("smollm2-135m", help="a model (as for find-heads), a fine-tuning run folder "
                                                            "(base and fine-tuned side by side) or a find-heads folder"),
    dataset: Optional[str] = typer.Option(None, help="as for find-heads [default: the run's data set, else sst2]"),
    prompt: int = typer.Option(0, help="which held-out prompt: test-pool query N with demonstrations from the "
                                       "demo pool, as `evaluate` builds them"),
    heads: str = typer.Option("top:8", help="top:N (a find-heads folder's ranking, a run's fixed head set, else the "
                                            "N heads with the largest label mass on this prompt) or L20H5,L18H6"),
    pattern: Optional[str] = typer.Option(None, help="also draw the full pattern (every query position) of this "
                                                     "head, e.g. L20H5"),
    k: Optional[int] = typer.Option(None, help="demonstrations per prompt [default: the run's, else 4]"),
    seed: Optional[int] = typer.Option(None, help="demonstration sampling [default: the run's, else 42]"),
    pool_seed: Optional[int] = typer.Option(None, help="pool split [default: the run's, else --seed]"),
    threshold: Optional[str] = threshold_option("the run's, else paper"),
    tau: Optional[float] = tau_option(),
    device: Optional[str] = device_option(),
    out: Path = typer.Option(Path("attention.html"), help="the HTML file to write (plotly.js inside it)"),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="replace an existing --out file"),
) -> None:
    """Draw one prompt's tokens coloured by the query's attention, per head (a menu switches heads)."""
    from abft_lens.attention_view import check_heads_exist, parse_heads
    from abft_lens.report import read_record, run_kind

    check_out_file(out, (".html", ".htm"), overwrite, why="the view is a self-contained HTML page")
    wanted = parse_heads(heads)
    shown = parse_heads(pattern) if pattern else None
    if shown is not None and (not isinstance(shown, list) or len(shown) != 1):
        raise ConfigError(f"pattern: name one head, e.g. L20H5; got {pattern!r}.")
    if prompt < 0:
        raise ConfigError(f"prompt: must be 0 or more, got {prompt}.")
    if tau is not None and not tau > 0:
        raise ConfigError(f"tau must be a number > 0; got {tau!r}.")
    source = Path(model_or_run)
    kind = run_kind(source) if source.is_dir() else ""
    record = read_record(source).get("config", {}) if kind else {}
    threshold = threshold or record.get("threshold", "paper")
    tau = tau if tau is not None else float(record.get("tau", 2.0))
    if kind == "evaluate":
        raise ConfigError(f"{source} is an evaluation folder; pass the model or fine-tuning run it evaluated "
                          f"({record.get('model_or_run')}).")
    if kind == "finetune" and not (source / "trained.safetensors").is_file():
        raise ConfigError(f"{source} is a fine-tuning run that has not finished (no trained.safetensors).")
    if isinstance(wanted, int) and (source / "heads.csv").is_file() and kind in ("find-heads", "finetune"):
        import pandas as pd

        ranking = pd.read_csv(source / "heads.csv").head(wanted)
        wanted = [(int(layer), int(head)) for layer, head in zip(ranking["layer"], ranking["head"], strict=True)]
    data_name = dataset or record.get("dataset", "sst2")
    from abft_lens.data import load_dataset, split_pools

    data = load_dataset(data_name, tuple(record["label_words"]) if record.get("label_words") else None)
    seed = seed if seed is not None else int(record.get("seed", 42))
    pools_seed = pool_seed if pool_seed is not None else int(record.get("pool_seed", seed))
    n_test = len(split_pools(data, seed=pools_seed).test)
    if prompt >= n_test:
        raise ConfigError(f"prompt: {prompt} is past the test pool of {data.name} ({n_test} queries, 0 to {n_test - 1}).")

    from abft_lens.attention_view import attention_figure, capture_example, pattern_view
    from abft_lens.models import load_model
    from abft_lens.report import example_prompts
    from abft_lens.runs import atomic_write_text

    if kind == "finetune":
        from abft_lens.training import load_trained_model

        models = {"base": load_model(record["model"], device=device),
                  "fine-tuned": load_trained_model(source, device=device)}
    else:
        models = {"model": load_model(record.get("model", model_or_run), device=device)}
    first = next(iter(models.values()))
    if shown is not None:
        check_heads_exist(shown, first.cfg.n_layers, first.cfg.n_heads)
    prompts = example_prompts(first, data_name, record.get("label_words"), pools_seed,
                              k if k is not None else int(record.get("k", 4)), seed, n=prompt + 1)
    example = capture_example(models, prompts, wanted, prompt, threshold, tau,
                              title=f"{data.name} test prompt {prompt}")
    figures = [attention_figure(example)]
    if shown is not None:
        figures += [pattern_view(model, prompts, shown[0], prompt).update_layout(title=f"{name}: full pattern of "
                                                                                     f"L{shown[0][0]}H{shown[0][1]}")
                    for name, model in models.items()]
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"figure-{i + 1}")
             for i, f in enumerate(figures)]
    atomic_write_text(out, "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>attention view</title></head>"
                           f"<body>{''.join(parts)}</body></html>\n")
    typer.echo(f"Attention view ({len(example.heads)} heads: "
               f"{', '.join(f'L{l}H{h}' for l, h in example.heads)}): {out}")


@app.command("report")
def report_command(
    run_dir: Optional[Path] = typer.Argument(None, help="a run folder (find-heads, finetune, evaluate, benchmark)"),
    index: Optional[Path] = typer.Option(None, help="instead: write DIR/index.html over every run folder under DIR "
                                                    "(building the reports that are missing)"),
    attention: bool = typer.Option(False, "--attention/--no-attention",
                                   help="recompute the attention views first (loads the run's models)"),
    rebuild: bool = typer.Option(False, "--rebuild/--no-rebuild", help="with --index: rebuild every report"),
    device: Optional[str] = device_option("cpu, cuda, ... (for --attention)"),
) -> None:
    """Rebuild a run folder's report.html from its saved files, or write an index page over many runs."""
    from abft_lens.report import build_index, build_report, compute_attention_examples, run_kind

    if (run_dir is None) == (index is None):
        raise ConfigError("report: give a RUN_DIR, or --index DIR (not both).")
    target = run_dir if run_dir is not None else index
    if not target.is_dir():
        raise ConfigError(f"report: {target} is not a folder.")
    if run_dir is not None:
        if not run_kind(run_dir):
            raise ConfigError(f"report: {run_dir} is not a run folder (no metrics.jsonl, metrics.json, heads.csv "
                              "with a config.json, or results.csv).")
        if attention:
            compute_attention_examples(run_dir, device=device)
        typer.echo(f"Report: {build_report(run_dir)}")
        return
    typer.echo(f"Index: {build_index(index, rebuild=rebuild)}")


def _load_plugins() -> None:
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        entry_point.load()(app)


def _caused_by_interrupt(error: BaseException | None) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _interrupted(command: str | None) -> None:
    hint = "; rerun the same command with --resume to continue" if command == "finetune" else ""
    typer.echo(f"interrupted{hint}", err=True)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """The `abft-lens` entry point. A problem with the input is one line ``error: ...`` on stderr and exit
    status 2: an ``AbftLensError`` as its message, any other exception as its type and message (``--debug``
    anywhere on the command line, or ABFT_LENS_DEBUG=1, shows the traceback instead). Ctrl-C exits 130."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    args = [arg for arg in args if arg != "--debug"]
    command = next((arg for arg in args if not arg.startswith("-")), None)
    try:
        _load_plugins()
        # Standalone mode: usage errors print the usage and exit 2; other exceptions reach us.
        app(args=args, prog_name="abft-lens")
    except SystemExit as stop:
        if stop.code == 130 and _caused_by_interrupt(stop):  # typer turns Ctrl-C into exit 130, silently
            _interrupted(command)
        raise
    except KeyboardInterrupt:
        _interrupted(command)
    except AbftLensError as error:
        if debug:
            raise
        typer.echo(f"error: {one_line(str(error))}", err=True)
        sys.exit(2)
    except Exception as error:  # a bug or an unforeseen input: still one line, the traceback on request
        if debug:
            raise
        typer.echo(f"error: {type(error).__name__}: {one_line(str(error))} (rerun with --debug for the "
                   "traceback)", err=True)
        sys.exit(2)
