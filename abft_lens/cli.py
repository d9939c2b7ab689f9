"""The `abft-lens` command line: a thin layer over the library's jobs and their config dataclasses.

Other packages (our `analysis/`) add commands through the entry-point group
``abft_lens.commands``: each entry point is a function ``register(app: typer.Typer) -> None``.
That keeps `abft_lens` from ever importing them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
from pathlib import Path
from typing import Optional

import typer

from abft_lens.errors import AbftLensError
from abft_lens.runs import load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find, score and fine-tune the induction heads behind in-context learning.")

PLUGIN_GROUP = "abft_lens.commands"


@app.callback()
def _commands() -> None:
    """Keeps `find-heads` a named command even while it is the only one."""


def _merge(config, overrides: dict):
    """Command-line values that were given override the config file's."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


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
    threshold: Optional[str] = typer.Option(None, help="paper: k/(k+ln n_t); uniform: tau*k/n_t [default: paper]"),
    tau: Optional[float] = typer.Option(None, help="multiple of uniform attention for --threshold uniform"),
    rank_by: Optional[str] = typer.Option(None, help="pass_rate, label_mass or correctness [default: pass_rate]"),
    top: Optional[int] = typer.Option(None, help="heads to print [default: 20]"),
    seed: Optional[int] = typer.Option(None, help="[default: 42]"),
    batch_size: Optional[int] = typer.Option(None, help="[default: 8]"),
    label_words: Optional[str] = typer.Option(None, help="comma-separated label words replacing the data set's"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ..."),
    out: Optional[Path] = typer.Option(None, help="run folder [default: runs/find-heads_<model>_<dataset>]"),
    config: Optional[Path] = typer.Option(None, help="a FindHeadsConfig JSON (or a run folder's config.json)"),
) -> None:
    """Rank every attention head by how much it attends to the demonstration labels."""
    from abft_lens.find_heads import FindHeadsConfig, find_heads

    base = load_config(config, FindHeadsConfig) if config else FindHeadsConfig()
    words = tuple(w.strip() for w in label_words.split(",")) if label_words else None
    cfg = _merge(base, dict(model=model, dataset=dataset, k=k, n_prompts=n_prompts, threshold=threshold, tau=tau,
                            rank_by=rank_by, top=top, seed=seed, batch_size=batch_size, label_words=words,
                            device=device, out=str(out) if out else None))
    result = find_heads(cfg)
    typer.echo(f"\nTop {cfg.top} heads of {cfg.model} on {cfg.dataset} "
               f"({cfg.n_prompts} prompts, k={cfg.k}, ranked by {cfg.rank_by}):")
    _print_table(result.top_table(cfg.top))
    row = result.scores.table.iloc[0]
    typer.echo(f"\nUniform attention would put {row['uniform_mass']:.3f} on the labels; "
               f"the paper's threshold averages {row['mean_threshold']:.3f}.")
    typer.echo(f"Run folder: {result.run_dir} ({result.seconds:.0f} s)")


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
    label_words: Optional[str] = typer.Option(None, help="comma-separated label words replacing the data set's"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ..."),
    out: Optional[Path] = typer.Option(None, help="output folder [default: RUN_DIR/evaluate_<dataset>, or "
                                                  "runs/evaluate_<model>_<dataset> for a bare model]"),
    config: Optional[Path] = typer.Option(None, help="an EvaluateConfig JSON (or an evaluation's config.json)"),
) -> None:
    """Accuracy, macro-F1 and, on request, calibration, robustness and the unseen-label test."""
    from abft_lens.evaluation import EvaluateConfig, headline, run_defaults, run_evaluation

    base = load_config(config, EvaluateConfig) if config else EvaluateConfig()
    if model_or_run is not None:
        base = dataclasses.replace(base, model_or_run=model_or_run)
    base = _merge(base, run_defaults(base.model_or_run))
    words = tuple(w.strip() for w in label_words.split(",")) if label_words else None
    cfg = _merge(base, dict(dataset=dataset, n_test=n_test, demo_sets=demo_sets, k=k, seed=seed, pool_seed=pool_seed,
                            batch_size=batch_size, calibrate=calibrate, n_calibration=n_calibration,
                            robustness=robustness, robustness_queries=robustness_queries,
                            unseen_labels=unseen_labels, label_words=words, device=device,
                            out=str(out) if out else None))
    result = run_evaluation(cfg)
    typer.echo(f"\n{cfg.model_or_run} on {cfg.dataset}:")
    for line in headline(result.metrics):
        typer.echo("  " + line)
    typer.echo(f"Output folder: {result.run_dir}")

def _load_plugins() -> None:
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        entry_point.load()(app)


def main(argv: list[str] | None = None) -> None:
    _load_plugins()
    try:
        # Standalone mode: usage errors print the usage and exit 2; other exceptions reach us.
        app(args=argv, prog_name="abft-lens")
    except AbftLensError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
