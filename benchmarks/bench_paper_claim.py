"""The paper's claim on our embedded model (issue 3, part 5): vanilla ICL, contextual calibration, ABFT and
E2E fine-tuning on the paper's 8 data sets, one results table and one figure.

For each (dataset, method, seed) piece the script runs, in a fresh subprocess (so peak memory is the
piece's own):
- ``vanilla`` and ``calibration`` (one piece, "base", gives both rows): ``evaluation.evaluate`` of the
  pretrained model with calibration (512 content-free queries), robustness and the unseen-label test;
  the calibration row's accuracy/macro-F1 are the calibrated ones (its consistency and unseen-label
  accuracy are not measured: left empty);
- ``abft`` / ``e2e``: ``training.run_finetune`` (n_d = 512 training prompts, 32 steps of 32, W_Q/W_K
  only, the lr chosen on a validation split of the training pool unless given) and then the same
  evaluation of the fine-tuned model. The run folder is resumable, so a piece killed mid-training
  continues from its last checkpoint.

Every finished piece is appended to ``<out>/results.csv`` at once (atomic rewrite); a re-run skips
finished pieces. ``<out>/results.html`` is the figure, ``<out>/summary.json`` the headline (mean accuracy
per method, ABFT wins over vanilla, ABFT/E2E training-time ratio) with the command that produced it.

Size (measured on this project's 2-core CPU machine while lightly shared, SST-2, k = 4, ~104 tokens per
prompt): forward + backward of W_Q/W_K costs ~0.47 s per prompt for ABFT (the forward stops after the
last attention pattern) and ~0.58 s for E2E, so a 32-step run of 32 prompts is ~8 (ABFT) to ~10 (E2E)
minutes; the lr search (4 lrs x 8 steps, plus 5 validation passes of 128 prompts) costs about as much
again; an evaluation with calibration, robustness (64 queries) and the unseen-label test is ~5,000
forwards, 10-15 minutes. That is ~1.5 h per data set and ~11 h for the 8 (about 3x longer when the
machine is busy): run it by hand, in pieces (it resumes), not in CI:

    ABFT_LENS_CACHE_DIR=$PWD/.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_paper_claim.py \\
        --model smollm2-135m --seeds 42 --out benchmarks/results/paper_claim_smollm2

To save about a quarter of that, search the lr once on SST-2 and pass it for every data set (``--abft-lr X
--e2e-lr Y``; the paper also used one lr throughout). A first small search on SST-2 (4 steps of 8
prompts, 64 validation queries) found validation accuracy falling with the ABFT lr: untrained 0.656,
2e-5 0.641, 1e-4 0.594, 3e-4 0.516, 1e-3 0.469, so search below 1e-4 for ABFT. CI runs the tiny
version (one data set, 8 test inputs, two steps of 4 prompts; 41 min of pieces on this machine at a
load average of ~15 on 2 cores, so a few minutes on an idle one; its numbers mean nothing):

    .venv/bin/python benchmarks/bench_paper_claim.py --tiny --out runs/bench_paper_claim_tiny
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from abft_lens.data import PAPER_DATASETS
from abft_lens.runs import atomic_write_text, package_versions, write_json

METHODS = ("vanilla", "calibration", "abft", "e2e")
COLUMNS = ["dataset", "method", "seed", "accuracy", "macro_f1", "consistency", "unseen_label_accuracy",
           "train_seconds", "peak_memory_mb", "trainable_params", "model", "lr", "n_train", "steps",
           "zero_shot_accuracy", "induction_heads_per_prompt", "induction_correct_mass", "induction_wrong_mass",
           "eval_seconds", "piece_seconds", "run_dir"]
TINY = dict(datasets=["sst2"], n_train=8, steps=2, batch_size=4, micro_batch_size=4, n_val=8, k=2, n_test=8,
            demo_sets=1, n_calibration=8, robustness_queries=2, robustness_demo_sets=2, abft_lr="1e-3",
            e2e_lr="1e-3", eval_batch_size=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--datasets", nargs="+", default=list(PAPER_DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--pool-seed", type=int, default=42, help="fixed across seeds: one test pool")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--abft-lr", default="search", help="a number or 'search' (validation split)")
    parser.add_argument("--e2e-lr", default="search")
    parser.add_argument("--n-test", type=int, default=512)
    parser.add_argument("--demo-sets", type=int, default=2)
    parser.add_argument("--n-calibration", type=int, default=512)
    parser.add_argument("--robustness-queries", type=int, default=64)
    parser.add_argument("--robustness-demo-sets", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/paper_claim"))
    parser.add_argument("--tiny", action="store_true", help="CI size: one data set, a few prompts, 2 steps")
    parser.add_argument("--piece", default=None, help=argparse.SUPPRESS)  # internal: DATASET:PIECE:SEED
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def piece_of(method: str) -> str:
    return "base" if method in ("vanilla", "calibration") else method


def eval_config(args: argparse.Namespace, dataset: str, seed: int, calibrate: bool, out: Path):
    from abft_lens.evaluation import EvaluateConfig

    return EvaluateConfig(dataset=dataset, n_test=args.n_test, demo_sets=args.demo_sets, k=args.k, seed=seed,
                          pool_seed=args.pool_seed, batch_size=args.eval_batch_size, calibrate=calibrate,
                          n_calibration=args.n_calibration, robustness=True,
                          robustness_queries=args.robustness_queries,
                          robustness_demo_sets=args.robustness_demo_sets, unseen_labels=True, out=str(out))


def _row(args, dataset: str, method: str, seed: int, metrics: dict, **extra) -> dict[str, object]:
    keys = ("accuracy", "macro_f1", "consistency", "unseen_label_accuracy", "zero_shot_accuracy",
            "induction_heads_per_prompt", "induction_correct_mass", "induction_wrong_mass")
    row = {"dataset": dataset, "method": method, "seed": seed, "model": args.model,
           **{key: metrics.get(key) for key in keys}, "eval_seconds": metrics.get("seconds")}
    return {**row, **extra}


def run_piece(args: argparse.Namespace, dataset: str, piece: str, seed: int) -> list[dict[str, object]]:
    """One piece in this process: its result rows."""
    from abft_lens.evaluation import run_evaluation
    from abft_lens.models import load_model
    from abft_lens.training import FinetuneConfig, peak_memory_mb, run_finetune

    model = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    runs = args.out / "runs"
    if piece == "base":
        out = runs / f"{dataset}_base_seed{seed}"
        result = run_evaluation(eval_config(args, dataset, seed, calibrate=True, out=out), model=model)
        metrics, peak = result.metrics, peak_memory_mb(device)
        common = dict(train_seconds=0.0, peak_memory_mb=peak, trainable_params=0, run_dir=str(out))
        calibrated = {**metrics, "accuracy": metrics["calibrated_accuracy"], "macro_f1": metrics["calibrated_macro_f1"],
                      "consistency": None, "unseen_label_accuracy": None}
        return [_row(args, dataset, "vanilla", seed, metrics, **common),
                _row(args, dataset, "calibration", seed, calibrated, **common)]

    lr_arg = args.abft_lr if piece == "abft" else args.e2e_lr
    run_dir = runs / f"{dataset}_{piece}_seed{seed}"
    config = FinetuneConfig(model=args.model, dataset=dataset, method=piece, n_train=args.n_train, n_val=args.n_val,
                            k=args.k, lr=None if lr_arg == "search" else float(lr_arg), batch_size=args.batch_size,
                            micro_batch_size=args.micro_batch_size, steps=args.steps, seed=seed,
                            pool_seed=args.pool_seed, out=str(run_dir), resume=True, device=args.device)
    trained = run_finetune(config, model=model)
    evaluation = run_evaluation(eval_config(args, dataset, seed, calibrate=False, out=run_dir / f"evaluate_{dataset}"),
                                model=model)
    return [_row(args, dataset, piece, seed, evaluation.metrics, train_seconds=trained.train_seconds,
                 peak_memory_mb=trained.peak_memory_mb, trainable_params=trained.trainable_params, lr=trained.lr,
                 n_train=args.n_train, steps=args.steps, run_dir=str(run_dir))]


def read_results(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=COLUMNS)


def append_results(path: Path, rows: list[dict[str, object]]) -> pd.DataFrame:
    """Add ``rows`` (replacing rows of the same dataset/method/seed) and rewrite the CSV atomically."""
    frame = read_results(path)
    new = pd.DataFrame(rows).reindex(columns=COLUMNS)
    keys = set(zip(new["dataset"], new["method"], new["seed"]))
    keep = [(d, m, s) not in keys for d, m, s in zip(frame["dataset"], frame["method"], frame["seed"])]
    frame = pd.concat([frame[keep], new], ignore_index=True) if len(frame) else new
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g"))
    return frame


def summarise(frame: pd.DataFrame) -> dict[str, object]:
    """Mean accuracy per method, ABFT wins over vanilla, ABFT minus E2E, and the training-time ratio."""
    mean = frame.groupby("method")["accuracy"].mean().to_dict()
    pivot = frame.pivot_table(index=["dataset", "seed"], columns="method", values="accuracy")
    summary: dict[str, object] = {"mean_accuracy": mean, "pieces": len(frame)}
    if {"abft", "vanilla"} <= set(pivot.columns):
        both = pivot[["abft", "vanilla"]].dropna()
        summary["abft_minus_vanilla"] = float((both["abft"] - both["vanilla"]).mean())
        summary["abft_wins_over_vanilla"] = f"{int((both['abft'] > both['vanilla']).sum())} of {len(both)}"
    if {"abft", "e2e"} <= set(pivot.columns):
        both = pivot[["abft", "e2e"]].dropna()
        summary["abft_minus_e2e"] = float((both["abft"] - both["e2e"]).mean())
        seconds = frame.groupby("method")["train_seconds"].sum()
        summary["abft_over_e2e_train_time"] = float(seconds["abft"] / seconds["e2e"])
    return summary


def figure(frame: pd.DataFrame, title: str):
    import plotly.graph_objects as go

    order = [d for d in PAPER_DATASETS if d in set(frame["dataset"])] + sorted(set(frame["dataset"]) - set(PAPER_DATASETS))
    fig = go.Figure()
    for method in [m for m in METHODS if m in set(frame["method"])]:
        rows = frame[frame["method"] == method].groupby("dataset")["accuracy"].agg(["mean", "std", "count"])
        rows = rows.reindex(order)
        x = order + ["mean"]
        y = rows["mean"].tolist() + [rows["mean"].mean()]
        error = rows["std"].fillna(0).tolist() + [0]
        fig.add_bar(name=method, x=x, y=y, error_y={"type": "data", "array": error, "visible": True})
    fig.update_layout(title=title, barmode="group", yaxis_title="accuracy (label-space argmax)",
                      yaxis_range=[0, 1], template="plotly_white", width=900, height=480)
    return fig


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.piece:
        dataset, piece, seed = args.piece.split(":")
        started = time.perf_counter()
        rows = run_piece(args, dataset, piece, int(seed))
        # Wall time of this process only: a piece resumed after a kill counts the resumed part.
        append_results(args.out / "results.csv", [{**row, "piece_seconds": time.perf_counter() - started} for row in rows])
        return

    from abft_lens.plots import save_figure

    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    started = time.perf_counter()
    pieces = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for piece in dict.fromkeys(piece_of(m) for m in args.methods):
                pieces.append((dataset, piece, seed))
    for index, (dataset, piece, seed) in enumerate(pieces, 1):
        frame = read_results(results)
        done = set(zip(frame["dataset"], frame["method"].map(piece_of), frame["seed"]))
        if (dataset, piece, seed) in done:
            print(f"[{index}/{len(pieces)}] {dataset} {piece} seed {seed}: done, skipped")
            continue
        print(f"[{index}/{len(pieces)}] {dataset} {piece} seed {seed}", flush=True)
        child = [sys.executable, __file__, "--piece", f"{dataset}:{piece}:{seed}"]
        child += [a for a in (argv if argv is not None else sys.argv[1:])]
        subprocess.run(child, check=True)

    frame = read_results(results)
    frame = frame[frame["method"].isin(args.methods) & frame["dataset"].isin(args.datasets)]
    save_figure(figure(frame, f"{args.model}: ICL accuracy, k = {args.k}"), args.out / "results")
    summary = summarise(frame)
    wall = float(frame.loc[frame["method"] != "calibration", "piece_seconds"].sum())  # base rows share one piece
    write_json(args.out / "summary.json", {"command": command, **summary, "total_piece_seconds": round(wall, 1),
                                           "this_session_seconds": round(time.perf_counter() - started, 1),
                                           "settings": {k: str(v) for k, v in vars(args).items() if k != "piece"},
                                           "versions": package_versions()})
    print(frame[["dataset", "method", "seed", "accuracy", "macro_f1", "consistency", "unseen_label_accuracy",
                 "train_seconds"]].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
