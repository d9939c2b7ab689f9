"""The paper's ablations and training dynamics on our embedded model, and remedies for where ABFT stalls
(issue 18). Each piece is one (data set, setting, seed): a fine-tuning run with the settings' changes to the
paper's recipe (``abft_lens.ablations``) and its evaluation (accuracy, macro-F1, the predicted-label
distribution and whether it collapsed onto one label, on n-test queries x demo-sets). A setting that two
experiments share (the paper's recipe is in four) runs once. The experiments (``--experiments``, all by
default):

- ``table4`` (paper Table 4), on SST-2, TREC and SUBJ: full ABFT ("paper") beside no PID (A = 0.5, B = 1
  fixed), no head filter (every head gets the loss), reward only (A = 0) and punish only (B = 0); accuracy,
  macro-F1, collapse, and training time relative to full ABFT (``table4.csv``). Fig. 5 is drawn from the
  same runs: induction heads per prompt (the PID's input) and A per step (``steps.csv``, from each run's
  metrics.jsonl; without the head filter the loss acts on every head, and the PID still counts the heads
  above the induction threshold);
- ``fig6`` (paper Fig. 6), on SST-2: a 3 x 3 grid of initial weights (A0, B0), with and without PID;
- ``fig2`` (paper Fig. 2), on SST-2 and TREC: accuracy against 32, 128, 512 and 1024 training prompts for
  ABFT, the paper's E2E baseline (E2E-LoRA; ``--fig2-methods``) and vanilla ICL (the same 32 steps of 32 at
  every size; training queries from the whole 1024-example pool, so the lr must come from --lr-from or
  --abft-lr/--e2e-lr/--lora-lr);
- ``remedies`` (not in the paper), on the 8 data sets: label-covering training prompts, the relative PID
  input, both, and label covering by redrawing random sets instead of forcing a demonstration, against the
  paper's ABFT (``remedies.csv``: differences with their verdict against the
  seed spread or, for one seed, the larger of two standard errors and twice the paper's ABFT seed spread on
  that data set in the three-seed grid, ``--spread-from``; summary.json's ``remedies_recommended`` applies
  the issue's test: macro-F1 ahead on a weak set, TREC, SST-5 or TEE, and behind nowhere);
- ``lr_choice``: a full-length ABFT run at each lr of the grid keeping a checkpoint every 8 steps, scored on
  the validation split at each (``validation.csv``; step 8 is the 8-step search's trial) and on the test pool
  at the end: which rule (the 8-step search, the mean over the checkpoints, the last step) picks the lr
  with the best test accuracy (``lr_choice.csv``). The test pool is never used to choose.

Every ABFT/E2E piece takes the lr that the paper-claim benchmark's search chose for the same model, data set
and method (``--lr-from``, default its committed results.csv), so that no ablation re-runs the search; where
none is found the piece searches on its validation split. Pieces are appended to ``<out>/results.csv`` as
they finish (under a file lock), a re-run skips finished pieces (and refuses to resume pieces finished in
another precision), each runs in a fresh subprocess (or, with ``--in-process``, with one loaded model). The
tables, ``summary.json`` (the headline and the command) and the figures cover every piece in the folder, so
one experiment at a time builds them up; the figures
(HTML here; `abft-lens figures` redraws them) come from ``abft_lens.ablation_figures``.

Full size on the embedded model (seed 42; add seeds with --seeds 42 43 44 where time allows), one
experiment at a time or all at once:

    .venv/bin/python benchmarks/bench_ablations.py --experiments table4 --seeds 42 --precision bf16 \
      --out benchmarks/results/ablations_smollm2

More seeds of only some settings (``--settings``), e.g. where a remedy helped on one seed:

    .venv/bin/python benchmarks/bench_ablations.py --experiments remedies --remedy-datasets trec sst5 \
      --settings paper label_covering --seeds 43 44 --precision bf16 --out benchmarks/results/ablations_smollm2

CI runs the tiny version in process (tests/test_benchmarks.py; one data set, 2 steps of 4 prompts, 8 test
inputs; its numbers mean nothing):

    .venv/bin/python benchmarks/bench_ablations.py --tiny --in-process --out runs/bench_ablations_tiny
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import get_args

import pandas as pd

from abft_lens.ablation_figures import STEPS_FILE, VALIDATION_FILE, ablation_figures, compared_rows, in_dataset_order
from abft_lens.ablations import (
    EXPERIMENTS,
    FIG2_METHODS,
    FIG2_SIZES,
    FIG6_PUNISH_WEIGHTS,
    FIG6_REWARD_WEIGHTS,
    REMEDIES,
    TABLE4,
    Setting,
    experiment_settings,
    is_lr_setting,
)
from abft_lens.benchmarking import (
    METRICS,
    append_rows,
    check_finished_precision,
    compare,
    piece_keys,
    read_table,
    run_pieces,
    run_script,
    seed_table,
    timed_rows,
)
from abft_lens.choices import Method
from abft_lens.data import PAPER_DATASETS
from abft_lens.errors import DataError
from abft_lens.runs import atomic_write_text, package_versions, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, however this file is loaded
import bench_paper_claim as paper_claim  # noqa: E402

# The saved config's values of the fields the settings change, one column each.
KNOBS = ("pid", "pid_input", "pid_reference_heads", "heads", "terms", "initial_punish_weight", "reward_weight",
         "training_demos", "n_train", "n_val", "steps", "keep_checkpoints")
COLUMNS = ["dataset", "setting", "seed", "method", "accuracy", "macro_f1", "collapsed_onto", "predicted_distribution",
           "label_words", "n_inputs", "train_seconds", "lr", "lr_source", *KNOBS, "share_without_query_label",
           "flagged_heads_first", "flagged_heads_last", "induction_heads_first", "induction_heads_last",
           "punish_weight_last", "steps_at_zero_punish_weight",
           "induction_heads_per_prompt", "induction_correct_mass", "induction_wrong_mass", "peak_memory_mb",
           "trainable_params", "eval_seconds", "piece_seconds", "run_dir", "device", "precision", "model"]
KEYS = ("dataset", "setting", "seed")
STEP_COLUMNS = ["dataset", "setting", "seed", "step", "flagged_heads", "induction_heads", "prompts_with_flagged",
                "punish_weight", "loss", "correct_mass", "wrong_mass"]
VALIDATION_COLUMNS = ["dataset", "setting", "seed", "lr", "step", "validation_accuracy", "n_validation"]
# The fp32 table's searches, then the bf16 grid's: SUBJ's only search with the paper's words is in the latter
# (the fp32 rows used false/true, which reused_lr leaves out), as in the grid's own --lr-from.
LR_FROM = [Path("benchmarks/results/paper_claim_smollm2/results.csv"),
           Path("benchmarks/results/paper_claim_smollm2_bf16/results.csv")]
# Where the paper's ABFT stalls on the embedded model (issue 18): the remedies must help here.
WEAK_DATASETS = ("trec", "sst5", "tee")
# The three-seed bf16 grid of the paper's claim: ABFT's seed spread per data set at the ablations' precision.
SPREAD_FROM = Path("benchmarks/results/paper_claim_smollm2_bf16/results.csv")
TINY = dict(n_train=8, steps=2, batch_size=4, micro_batch_size=4, n_val=8, k=2, n_test=8, demo_sets=1,
            abft_lr="1e-3", e2e_lr="1e-3", lora_lr="1e-3", eval_batch_size=8, lr_grid=[1e-3, 1e-2],
            lr_checkpoint_every=1,
            sizes=[4, 8], table4_datasets=["sst2"], fig6_datasets=["sst2"], fig2_datasets=["sst2"],
            remedy_datasets=["sst2"], lr_datasets=["sst2"], lr_from=[], spread_from=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    paper_claim.add_run_arguments(parser)
    parser.set_defaults(lr_from=list(LR_FROM))
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument("--table4-datasets", nargs="+", default=["sst2", "trec", "subj"])
    parser.add_argument("--fig6-datasets", nargs="+", default=["sst2"])
    parser.add_argument("--fig2-datasets", nargs="+", default=["sst2", "trec"])
    parser.add_argument("--remedy-datasets", nargs="+", default=list(PAPER_DATASETS))
    parser.add_argument("--lr-datasets", nargs="+", default=list(PAPER_DATASETS),
                        help="data sets of lr_choice (its lrs: --lr-grid, default FinetuneConfig.lr_grid)")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(FIG2_SIZES), help="fig2's training prompts")
    parser.add_argument("--fig2-methods", nargs="+", default=list(FIG2_METHODS), choices=get_args(Method),
                        help="fig2's fine-tuning methods (e2e-lora: the paper's E2E baseline; e2e: full W_Q/W_K)")
    parser.add_argument("--fig6-punish-weights", nargs="+", type=float, default=list(FIG6_PUNISH_WEIGHTS),
                        help="fig6's initial punishment weights A0")
    parser.add_argument("--fig6-reward-weights", nargs="+", type=float, default=list(FIG6_REWARD_WEIGHTS),
                        help="fig6's reward weights B0")
    parser.add_argument("--lr-checkpoint-every", type=int, default=8, help="lr_choice's steps between checkpoints")
    parser.add_argument("--pid-reference-heads", type=float, default=None,
                        help="the relative PID input's scale in the remedies [default: FinetuneConfig's]")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="every fine-tuning piece keeps its checkpoints (for `abft-lens validate-checkpoints`)")
    parser.add_argument("--spread-from", type=Path, default=SPREAD_FROM,
                        help="a paper-claim results.csv whose ABFT seeds give, per data set, the spread a "
                             "one-seed difference must exceed besides two standard errors (a missing file: "
                             "standard errors only)")
    parser.add_argument("--settings", nargs="+", default=None,
                        help="run only these settings of the experiments (names as in results.csv), e.g. more "
                             "seeds of the paper's recipe and one remedy where it helped; the tables still cover "
                             "every piece in --out, and a setting with more seeds is then compared over its seeds "
                             "against the other's one (the verdicts use the smaller count)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ablations_smollm2"))
    parser.add_argument("--tiny", action="store_true", help="CI size: SST-2 only, a few prompts, 2 steps")
    args = paper_claim.parse_with_tiny(parser, argv, TINY)
    if args.settings is not None:
        planned = {name for _, name, _ in planned_pieces(argparse.Namespace(**{**vars(args), "settings": None}))[0]}
        if unknown := sorted(set(args.settings) - planned):
            parser.error(f"--settings {' '.join(unknown)}: no such setting in --experiments "
                         f"{' '.join(args.experiments)} (they have: {', '.join(sorted(planned))})")
    search_steps = search_step(args)
    if "lr_choice" in args.experiments and search_steps % args.lr_checkpoint_every:
        parser.error(f"--lr-checkpoint-every {args.lr_checkpoint_every} keeps no checkpoint at step {search_steps}, "
                     "the lr search's trial length, which lr_choice's 'search' rule scores")
    return args


def search_step(args: argparse.Namespace) -> int:
    """The step whose validation accuracy the short lr search (``--lr-search-steps``, 8) would have seen
    (lr_choice's 'search' rule)."""
    return min(args.lr_search_steps, args.steps)


def planned_pieces(args: argparse.Namespace) -> tuple[list[tuple[str, str, int]], dict[str, Setting]]:
    """The pieces of the experiments asked for (only ``--settings``' where given), each (data set, setting
    name, seed) once, and the settings by name."""
    from abft_lens.training import FinetuneConfig

    datasets = {"table4": args.table4_datasets, "fig6": args.fig6_datasets, "fig2": args.fig2_datasets,
                "remedies": args.remedy_datasets, "lr_choice": args.lr_datasets}
    settings: dict[str, Setting] = {}
    pieces: dict[tuple[str, str, int], None] = {}
    for experiment in args.experiments:
        chosen = experiment_settings(experiment, sizes=args.sizes, size_methods=args.fig2_methods,
                                     punish_weights=args.fig6_punish_weights,
                                     reward_weights=args.fig6_reward_weights,
                                     lrs=args.lr_grid or FinetuneConfig().lr_grid,
                                     checkpoint_every=args.lr_checkpoint_every)
        for setting in chosen:
            if settings.setdefault(setting.name, setting) != setting:
                raise ValueError(f"two settings are named {setting.name!r}")
        chosen = [setting for setting in chosen if args.settings is None or setting.name in args.settings]
        for dataset in datasets[experiment]:
            for seed in args.seeds:
                pieces.update({(dataset, setting.name, seed): None for setting in chosen})
    return list(pieces), settings


def run_piece(args: argparse.Namespace, dataset: str, setting: Setting, seed: int, model=None) -> list[dict[str, object]]:
    """One piece's results row; its per-step metrics go to steps.csv and, for a run that kept checkpoints with
    a validation split, their validation accuracy to validation.csv. ``model`` is left trained, or, after a
    validation trajectory, with the base weights again."""
    from abft_lens.evaluation import run_evaluation
    from abft_lens.models import load_model
    from abft_lens.runs import read_metrics, run_payload, run_record
    from abft_lens.training import apply_tensors, peak_memory_mb, snapshot, trainable_parameters, validation_trajectory

    model = model if model is not None else load_model(args.model, device=args.device)
    run_dir = args.out / "runs" / f"{dataset}_{setting.name}_seed{seed}"
    common = dict(setting=setting.name, run_dir=str(run_dir))
    if setting.method == "vanilla":
        config = paper_claim.eval_config(args, dataset, seed, calibrate=False, out=run_dir, model_or_run=args.model,
                                         extras=False)
        evaluation = run_evaluation(config, model=model)
        return [paper_claim.result_row(args, dataset, "vanilla", seed, evaluation.metrics, **common, train_seconds=0.0,
                                       trainable_params=0, peak_memory_mb=peak_memory_mb(next(model.parameters()).device),
                                       precision=run_record(run_dir)["precision"])]

    overrides = setting.fields()
    if args.pid_reference_heads is not None and overrides.get("pid_input") == "relative":
        overrides["pid_reference_heads"] = args.pid_reference_heads
    if args.keep_checkpoints:
        overrides["keep_checkpoints"] = True
    given_lr = "lr" in overrides
    base = snapshot(trainable_parameters(model, "qk"))
    trained, evaluation, lr_source = paper_claim.finetune_and_evaluate(
        args, dataset, setting.method, seed, run_dir, model, extras=False, **overrides)
    record = run_payload(run_dir)
    config, steps = record["config"], read_metrics(run_dir)
    keys = dict(dataset=dataset, setting=setting.name, seed=seed)
    append_rows(args.out / STEPS_FILE, [{**keys, **row} for row in steps], STEP_COLUMNS, (*KEYS, "step"))
    if config["keep_checkpoints"] and config["n_val"]:
        apply_tensors(model, base)  # the trajectory starts from the base model (step 0)
        trajectory = validation_trajectory(run_dir, model=model, progress=False)
        append_rows(args.out / VALIDATION_FILE, [{**keys, **row} for row in trajectory.to_dict("records")],
                    VALIDATION_COLUMNS, (*KEYS, "step"))
    punish = [row["punish_weight"] for row in steps]
    return [paper_claim.result_row(
        args, dataset, setting.method, seed, evaluation.metrics, **common, **paper_claim.cost_columns(trained),
        lr=trained.lr,
        lr_source="setting" if given_lr else lr_source, **{knob: config.get(knob) for knob in KNOBS},
        share_without_query_label=record["prompts"]["share_without_query_label"],
        flagged_heads_first=steps[0]["flagged_heads"], flagged_heads_last=steps[-1]["flagged_heads"],
        induction_heads_first=steps[0]["induction_heads"], induction_heads_last=steps[-1]["induction_heads"],
        punish_weight_last=punish[-1], steps_at_zero_punish_weight=sum(weight == 0 for weight in punish),
        precision=config["precision"])]


def check_lrs_known(args: argparse.Namespace, pieces: list[tuple[str, str, int]], settings: dict[str, Setting]) -> None:
    """Before any piece runs: the training-size pieces train on the whole pool, with no validation split to
    search an lr on, so each needs a given or reused lr. Found missing in a piece, it would stop the benchmark
    part-way, after hours of the other experiments."""
    for dataset, name, _ in pieces:
        setting = settings[name]
        overrides = setting.fields()
        if setting.method != "vanilla" and overrides.get("n_val") == 0 and "lr" not in overrides \
                and paper_claim.piece_lr(args, dataset, setting.method)[0] is None:
            raise DataError(f"{dataset} {name}: the training-size pieces train on the whole pool (no validation "
                            "split to search an lr on): name results with an lr chosen for this model in "
                            f"--lr-from (a path from the working directory), or give --{setting.method}-lr.")


def finished_pieces(results: Path) -> set[tuple[str, str, int]]:
    return set(piece_keys(read_table(results, COLUMNS), KEYS))


def append_results(path: Path, rows: list[dict[str, object]]) -> pd.DataFrame:
    return append_rows(path, rows, COLUMNS, KEYS)


# --- summaries -----------------------------------------------------------------------------------------


def relative_train_time(frame: pd.DataFrame) -> pd.Series:
    """Each row's training time over full ABFT's ("paper") on the same data set, seed and device."""
    frame = frame.assign(device=frame["device"].fillna("unknown"))
    paper = frame[frame["setting"] == "paper"].set_index(["dataset", "seed", "device"])["train_seconds"]
    index = pd.MultiIndex.from_frame(frame[["dataset", "seed", "device"]])
    return pd.Series(frame["train_seconds"].to_numpy() / paper.reindex(index).to_numpy(), index=frame.index)


def settings_table(frame: pd.DataFrame, names: list[str],
                   known_spread: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (data set, setting) of ``names`` (the first is "paper"): seed_table's statistics, the mean training
    time relative to full ABFT, and each metric's difference from "paper" with the margin it is judged by and
    its verdict (``compare``; with one seed, ``known_spread``'s seed standard deviations per data set, if
    given, widen the margin: ``reference_spread``)."""
    rows = compared_rows(frame, names)
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(relative_train_time=relative_train_time(rows))
    table = seed_table(rows, by="setting").merge(
        rows.groupby(["dataset", "setting"], as_index=False)["relative_train_time"].mean(), on=["dataset", "setting"])
    for metric in METRICS:
        known = known_spread[f"{metric}_std"] if known_spread is not None else None
        versus = [compare(table, name, "paper", metric, by="setting", known_std=known).assign(setting=name)
                  for name in names[1:]]
        versus = [part for part in versus if len(part)]
        if versus:
            columns = {"difference": f"{metric}_minus_paper", "margin": f"{metric}_margin",
                       "verdict": f"{metric}_verdict"}
            table = table.merge(pd.concat(versus)[["dataset", "setting", *columns]].rename(columns=columns),
                                on=["dataset", "setting"], how="left")
    order = {name: index for index, name in enumerate(names)}
    return in_dataset_order(table.sort_values("setting", key=lambda column: column.map(order), kind="stable"))


def lr_choice_table(results: pd.DataFrame, validation: pd.DataFrame, search_step: int) -> pd.DataFrame:
    """Per data set and rule, the lr that rule picks from the validation accuracies (means over seeds; ties:
    the smaller lr, as the search does) and the test accuracy (macro-F1 beside it) of that lr's full-length run,
    beside the best test accuracy any lr of the grid reached (``regret``: the difference; ``macro_f1_regret`` the
    same for macro-F1, which also counts an lr whose run collapsed onto one label). Rules: ``search`` (validation at
    ``search_step``, the lr search's trial length), ``checkpoints`` (mean over every kept step after 0),
    ``full_length`` (the last step)."""
    runs = results[results["setting"].map(is_lr_setting)]
    test = runs.groupby(["dataset", "lr"])[["accuracy", "macro_f1"]].mean()
    # Other settings kept checkpoints too (--keep-checkpoints) at the same lrs: only the lr runs choose.
    validation = validation[validation["setting"].map(is_lr_setting) & (validation["step"] > 0)]
    mean = validation.groupby(["dataset", "lr", "step"])["validation_accuracy"].mean().reset_index()
    rows = []
    for dataset, part in mean.groupby("dataset"):
        last = part["step"].max()
        rules = {"search": part[part["step"] == min(search_step, last)], "full_length": part[part["step"] == last],
                 "checkpoints": part.groupby(["dataset", "lr"], as_index=False)["validation_accuracy"].mean()}
        known = dataset in test.index.get_level_values(0)
        best, best_f1 = (test.loc[dataset, metric].max() if known else float("nan")
                         for metric in ("accuracy", "macro_f1"))
        for rule, scores in rules.items():
            if scores.empty:
                continue
            chosen = scores.sort_values(["validation_accuracy", "lr"], ascending=[False, True]).iloc[0]
            key = (dataset, chosen["lr"])
            picked = test.loc[key] if key in test.index else pd.Series(float("nan"), index=test.columns)
            rows.append({"dataset": dataset, "rule": rule, "lr": chosen["lr"],
                         "validation_accuracy": chosen["validation_accuracy"], "test_accuracy": picked["accuracy"],
                         "test_macro_f1": picked["macro_f1"], "best_test_accuracy": best,
                         "regret": best - picked["accuracy"], "best_test_macro_f1": best_f1,
                         "macro_f1_regret": best_f1 - picked["macro_f1"]})
    return pd.DataFrame(rows)


def reference_spread(results: Path | None, model: str, precision: str) -> pd.DataFrame | None:
    """Per data set, the seed standard deviations of accuracy and macro-F1 of the paper's ABFT on ``model`` in
    ``precision`` in another benchmark's ``results`` (the paper-claim grid's 3 seeds), or None without that
    file or those rows. What one reseed of the paper's recipe moves: a one-seed ablation's difference counts
    only beyond it."""
    if results is None or not results.is_file():
        return None
    rows = pd.read_csv(results)
    rows = rows[(rows["method"] == "abft") & (rows["model"] == model) & (rows["precision"] == precision)]
    if rows.empty:
        return None
    spread = seed_table(rows).set_index("dataset")[["seeds", "accuracy_std", "macro_f1_std"]]
    spread = spread[spread["seeds"] >= 2]
    return None if spread.empty else spread


def remedy_verdicts(remedies: pd.DataFrame,
                    datasets: Iterable[str] = PAPER_DATASETS) -> dict[str, dict[str, object]]:
    """Per remedy, the issue's test for recommending it over the paper's recipe, decided only once it has a
    verdict on every one of ``datasets``: macro-F1 ahead of the paper's ABFT beyond the margin on at least one
    weak data set (``WEAK_DATASETS``, where ABFT stalls), behind on none of them, and no collapse where the
    paper's ABFT did not collapse (it does on some seeds of TEE and TEH)."""
    if "macro_f1_verdict" not in remedies:  # no remedy compared with a finished paper piece yet
        return {}
    paper = remedies[remedies["setting"] == "paper"]
    paper_collapsed = set(paper.loc[paper["collapsed_seeds"] > 0, "dataset"])
    verdicts = {}
    for setting, part in remedies[remedies["setting"] != "paper"].groupby("setting", sort=False):
        by_dataset = dict(zip(part["dataset"], part["macro_f1_verdict"], strict=True))
        ahead_weak = [d for d, v in by_dataset.items() if d in WEAK_DATASETS and v == "ahead"]
        behind = [d for d, v in by_dataset.items() if v == "behind"]
        collapsed = [d for d, n in zip(part["dataset"], part["collapsed_seeds"], strict=True)
                     if n > 0 and d not in paper_collapsed]
        missing = [d for d in datasets if d not in by_dataset]
        verdicts[setting] = {"ahead_on_weak": ahead_weak, "behind_on": behind, "collapsed_on": collapsed,
                             "missing": missing,
                             "recommend": None if missing else (bool(ahead_weak) and not behind
                                                                and not collapsed)}
    return verdicts


def summarise(frame: pd.DataFrame, validation: pd.DataFrame, search_step: int,
              known_spread: pd.DataFrame | None = None, remedy_datasets: Iterable[str] = PAPER_DATASETS,
              ) -> tuple[dict[str, object], dict[str, pd.DataFrame]]:
    """The headline (summary.json) and the tables written beside it."""
    tables = {"table4": settings_table(frame, [s.name for s in TABLE4], known_spread),
              "remedies": settings_table(frame, [s.name for s in REMEDIES], known_spread)}
    if len(validation):
        tables["lr_choice"] = lr_choice_table(frame, validation, search_step)
    summary: dict[str, object] = {"pieces": len(frame), "seeds": sorted(int(s) for s in frame["seed"].unique())}
    for name in ("table4", "remedies"):
        table = tables[name]
        if len(table):
            summary[name] = {setting: {"mean_accuracy": float(part["accuracy_mean"].mean()),
                                       "mean_macro_f1": float(part["macro_f1_mean"].mean()),
                                       "mean_relative_train_time": float(part["relative_train_time"].mean()),
                                       "collapsed_runs": int(part["collapsed_seeds"].sum()),
                                       **({"macro_f1_vs_paper": dict(zip(part["dataset"], part["macro_f1_verdict"],
                                                                         strict=True))}
                                          if "macro_f1_verdict" in part and setting != "paper" else {})}
                             for setting, part in table.groupby("setting", sort=False)}
    if len(tables["remedies"]):
        summary["remedies_recommended"] = remedy_verdicts(tables["remedies"], remedy_datasets)
    if "lr_choice" in tables and len(tables["lr_choice"]):
        by_rule = tables["lr_choice"].groupby("rule")
        summary["lr_choice_mean_regret"] = by_rule["regret"].mean().to_dict()
        summary["lr_choice_mean_macro_f1_regret"] = by_rule["macro_f1_regret"].mean().to_dict()
    return summary, tables


def main(argv: list[str] | None = None, model=None) -> None:
    """The benchmark (module doc); ``model`` (with ``--in-process``) replaces loading ``--model``."""
    args = parse_args(argv)
    pieces, settings = planned_pieces(args)
    results = args.out / "results.csv"

    def run_one(piece: tuple[str, str, int], loaded=None) -> None:
        dataset, name, seed = piece
        append_results(results, timed_rows(lambda: run_piece(args, dataset, settings[name], seed, model=loaded)))

    if args.piece:
        dataset, name, seed = args.piece.split(":")
        run_one((dataset, name, int(seed)))
        return
    from abft_lens.models import load_model
    from abft_lens.plots import save_figure

    args.out.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([sys.executable, sys.argv[0] if argv is None else __file__, *given])
    started = time.perf_counter()
    if not args.summarise_only:
        check_lrs_known(args, pieces, settings)
        check_finished_precision(read_table(results, COLUMNS), KEYS, pieces, paper_claim.run_precision(args))
        run_pieces(pieces, lambda: finished_pieces(results), run_one, model=model,
                   load_model=lambda: load_model(args.model, device=args.device),
                   child_command=None if args.in_process else
                   lambda piece: [sys.executable, __file__, "--piece", ":".join(map(str, piece)), *given])

    # Every piece the folder holds, not only this command's: the tables and summary.json are rewritten
    # whole, so a command that runs one experiment must not drop the others' rows from them.
    frame = read_table(results, COLUMNS)
    steps = read_table(args.out / STEPS_FILE, STEP_COLUMNS)
    validation = read_table(args.out / VALIDATION_FILE, VALIDATION_COLUMNS)
    if frame.empty:
        print("no finished piece yet")
        return
    known_spread = reference_spread(args.spread_from, args.model, paper_claim.run_precision(args))
    summary, tables = summarise(frame, validation, search_step(args),
                                known_spread, args.remedy_datasets)
    if known_spread is not None:
        summary["one_seed_margin_from"] = {"results": str(args.spread_from), "method": "abft",
                                           "model": args.model, "seeds": int(known_spread["seeds"].min())}
    for name, table in tables.items():
        if len(table):  # an experiment with no finished comparison yet writes no empty file
            atomic_write_text(args.out / f"{name}.csv", table.to_csv(index=False, float_format="%.4g"))
    atomic_write_text(args.out / "seed_table.csv", seed_table(frame, by="setting").to_csv(index=False, float_format="%.4g"))
    for stem, figure in ablation_figures(frame, steps, validation, name=args.model).items():
        save_figure(figure, args.out / stem)
    write_json(args.out / "summary.json", {"command": command, **summary,
                                           "total_piece_seconds": round(float(frame["piece_seconds"].sum()), 1),
                                           "this_session_seconds": round(time.perf_counter() - started, 1),
                                           "settings": {k: str(v) for k, v in vars(args).items() if k != "piece"},
                                           "versions": package_versions()})
    print(frame[["dataset", "setting", "seed", "accuracy", "macro_f1", "collapsed_onto", "train_seconds"]]
          .to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_script(main)
