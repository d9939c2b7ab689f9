"""Differences between two methods on the same test inputs, with paired bootstrap standard errors.

    .venv/bin/python benchmarks/paired_differences.py benchmarks/results/paper_claim_smollm2_bf16 \
        [--out FOLDER/paired_differences.csv] [--overwrite] [--n-boot 1000]

Every method of a benchmark's grid is evaluated on the same queries with the same demonstration sets
(one seed, one pool), so two methods' answers are paired input by input. The error of their difference
is then smaller than the two binomial errors combined (what a query's difficulty does to both cancels),
and it must resample whole queries, whose demonstration sets are not independent
(``abft_lens.evaluation.metrics.paired_difference``). For each data set and seed of ``FOLDER/results.csv``
this pairs, where both have predictions: ABFT, E2E, E2E-LoRA, ABFT-LoRA and calibration against vanilla,
and E2E, E2E-LoRA and ABFT-LoRA against ABFT. The predictions are each run folder's ``predictions.csv``
(vanilla's ``calibrated_label`` column for calibration); they are not committed (their size), so run
this on the folder the grid wrote. Pandas and torch only, no model: about a minute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from abft_lens.runs import atomic_write_text

PAIRS = [("vanilla", "abft"), ("vanilla", "e2e"), ("vanilla", "e2e-lora"), ("vanilla", "abft-lora"),
         ("vanilla", "calibration"), ("abft", "e2e"), ("abft", "e2e-lora"), ("abft", "abft-lora")]
COLUMNS = ["dataset", "seed", "first", "second", "first_accuracy", "second_accuracy", "accuracy_difference",
           "accuracy_difference_se", "first_macro_f1", "second_macro_f1", "macro_f1_difference",
           "macro_f1_difference_se", "n_inputs", "n_groups"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a benchmark folder with results.csv and runs/")
    parser.add_argument("--out", type=Path, help="default: FOLDER/paired_differences.csv")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    args = parser.parse_args(argv)
    if not (args.folder / "results.csv").is_file():
        parser.error(f"{args.folder} has no results.csv")
    if args.n_boot < 2:
        parser.error("--n-boot must be at least 2")
    args.out = args.out or args.folder / "paired_differences.csv"
    if args.out.suffix != ".csv" or args.out.is_dir():
        parser.error(f"--out {args.out} should name a .csv file")
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    return args


def method_answers(folder: Path, row: pd.Series) -> pd.DataFrame | None:
    """One method's answers (query, repeat, true_label, predicted_label) for a results row, or None when
    its run folder has no predictions here."""
    run = folder / "runs" / Path(str(row["run_dir"])).name
    path = run / "predictions.csv" if row["method"] in ("vanilla", "calibration") else \
        run / f"evaluate_{row['dataset']}" / "predictions.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)  # label words as written
    answer = "calibrated_label" if row["method"] == "calibration" else "predicted_label"
    return frame[["query", "repeat", "true_label"]].assign(predicted_label=frame[answer])


def paired_rows(folder: Path, n_boot: int = 1000) -> tuple[pd.DataFrame, list[str]]:
    """The table of differences, and what could not be paired (no predictions in the folder)."""
    import torch

    from abft_lens.evaluation.metrics import paired_difference

    results = pd.read_csv(folder / "results.csv", keep_default_na=False, dtype={"label_words": str})
    rows, missing = [], []
    for (dataset, seed), piece in results.groupby(["dataset", "seed"], sort=False):
        by_method = {row["method"]: row for _, row in piece.iterrows()}
        answers = {}
        for method, row in by_method.items():
            answers[method] = method_answers(folder, row)
            if answers[method] is None:
                missing.append(f"{dataset} {method} seed {seed}")
        words = str(piece["label_words"].iloc[0]).split(",")
        for first, second in PAIRS:
            a, b = answers.get(first), answers.get(second)
            if a is None or b is None:
                continue
            if not a[["query", "repeat", "true_label"]].equals(b[["query", "repeat", "true_label"]]):
                raise SystemExit(f"paired_differences.py: error: {dataset} seed {seed}: {first} and {second} "
                                 "were not evaluated on the same inputs")
            for method, answer in ((first, a), (second, b)):  # the file is the evaluation the row reports
                if abs((answer["predicted_label"] == answer["true_label"]).mean() - float(by_method[method]["accuracy"])) > 1e-5:
                    raise SystemExit(f"paired_differences.py: error: {dataset} seed {seed}: {method}'s predictions.csv "
                                     "does not give the accuracy results.csv reports")
            stray = sorted((set(a["predicted_label"]) | set(b["predicted_label"]) | set(a["true_label"])) - set(words))
            index = {word: i for i, word in enumerate(words + stray)}
            true, first_answers, second_answers = (torch.tensor([index[w] for w in column]) for column in
                                                   (a["true_label"], a["predicted_label"], b["predicted_label"]))
            difference = paired_difference(true, first_answers, second_answers, torch.tensor(a["query"].astype(int).values),
                                           len(index), n_boot=n_boot)
            rows.append(dict(dataset=dataset, seed=int(seed), first=first, second=second,
                             first_accuracy=float(by_method[first]["accuracy"]),
                             second_accuracy=float(by_method[second]["accuracy"]),
                             first_macro_f1=float(by_method[first]["macro_f1"]),
                             second_macro_f1=float(by_method[second]["macro_f1"]), **difference))
    return pd.DataFrame(rows, columns=COLUMNS), missing


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    table, missing = paired_rows(args.folder, args.n_boot)
    if missing:
        print(f"no predictions (not paired): {', '.join(missing)}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, table.round(6).to_csv(index=False))
    shown = table.assign(accuracy=table["accuracy_difference"].map("{:+.3f}".format) + " ± "
                         + table["accuracy_difference_se"].map("{:.3f}".format),
                         macro_f1=table["macro_f1_difference"].map("{:+.3f}".format) + " ± "
                         + table["macro_f1_difference_se"].map("{:.3f}".format))
    print(shown[["dataset", "seed", "first", "second", "accuracy", "macro_f1"]].to_string(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
