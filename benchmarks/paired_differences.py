"""Differences between two methods on the same test inputs, with paired bootstrap standard errors.

    .venv/bin/python benchmarks/paired_differences.py benchmarks/results/paper_claim_smollm2_bf16 \
        [--out FOLDER/paired_differences.csv] [--n-boot 1000]

Every method of a benchmark's grid is evaluated on the same queries with the same demonstration sets
(one seed, one pool), so two methods' answers are paired input by input. The error of their difference
must resample whole queries, whose demonstration sets are not independent, and keeps each input's two
answers together, so what a query's difficulty does to both cancels
(``abft_lens.evaluation.metrics.paired_difference``). For each data set and seed of ``FOLDER/results.csv``
this pairs, where both have predictions: ABFT, E2E, E2E-LoRA, ABFT-LoRA and calibration against vanilla,
and E2E, E2E-LoRA and ABFT-LoRA against ABFT; on the ordinary test and on the ICL tests (symbols,
flipped). The answers are each evaluation's ``predictions.csv`` / ``predictions_icl_<test>.csv``
(vanilla's ``calibrated_label`` column for calibration), scored over the label words its ``metrics.json``
gives, and checked against the accuracy and macro-F1 results.csv reports. Prediction files are not
committed (their size), so run this on the folder the grid wrote; rows it cannot recompute there are kept
from an existing --out table, so the table only grows. Pandas and torch only, no model: about a minute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from abft_lens.benchmarking import run_script
from abft_lens.errors import ConfigError, DataError
from abft_lens.runs import atomic_write_text, check_out_file

PAIRS = [("vanilla", "abft"), ("vanilla", "e2e"), ("vanilla", "e2e-lora"), ("vanilla", "abft-lora"),
         ("vanilla", "calibration"), ("abft", "e2e"), ("abft", "e2e-lora"), ("abft", "abft-lora")]
# test -> (prediction file suffix, results.csv prefix of its accuracy / macro-F1 columns)
TESTS = {"ordinary": ("", ""), "symbols": ("_icl_symbols", "symbols_"), "flipped": ("_icl_flipped", "flipped_")}
KEYS = ["dataset", "seed", "test", "first", "second"]
COLUMNS = KEYS + ["first_accuracy", "second_accuracy", "accuracy_difference", "accuracy_difference_se",
                  "first_macro_f1", "second_macro_f1", "macro_f1_difference", "macro_f1_difference_se",
                  "n_inputs", "n_groups"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a benchmark folder with results.csv and runs/")
    parser.add_argument("--out", type=Path, help="default: FOLDER/paired_differences.csv (its rows are kept "
                                                 "where this run cannot recompute them)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    args = parser.parse_args(argv)
    if not (args.folder / "results.csv").is_file():
        parser.error(f"{args.folder} has no results.csv")
    if args.n_boot < 2:
        parser.error("--n-boot must be at least 2")
    args.out = args.out or args.folder / "paired_differences.csv"
    try:
        check_out_file(args.out, (".csv",), overwrite=True)  # replaced only by a table holding all its rows
    except ConfigError as error:
        parser.error(str(error))
    return args


def evaluation_folder(folder: Path, row: pd.Series) -> Path:
    """Where a results row's evaluation wrote its predictions and metrics.json."""
    run = folder / "runs" / Path(str(row["run_dir"])).name
    return run if row["method"] in ("vanilla", "calibration") else run / f"evaluate_{row['dataset']}"


def method_answers(folder: Path, row: pd.Series, test: str) -> tuple[pd.DataFrame, list[str]] | None:
    """One method's answers on a test (query, repeat, true_label, predicted_label) and the test's label
    words, or None when its evaluation has no such predictions here."""
    evaluation = evaluation_folder(folder, row)
    path = evaluation / f"predictions{TESTS[test][0]}.csv"
    if not path.is_file() or (row["method"] == "calibration" and test != "ordinary"):
        return None
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)  # label words as written
    answer = "calibrated_label" if row["method"] == "calibration" else "predicted_label"
    if answer not in frame.columns:
        raise DataError(f"{path} has no {answer} column")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    words = metrics.get(f"{test}_label_words") if test != "ordinary" else list(metrics.get("predicted_distribution") or {})
    if not words:
        raise DataError(f"{evaluation / 'metrics.json'} does not give the label words of its {test} test")
    return frame[["query", "repeat", "true_label"]].assign(predicted_label=frame[answer]), [str(w) for w in words]


def paired_rows(folder: Path, n_boot: int = 1000) -> tuple[pd.DataFrame, list[str]]:
    """The table of differences, and the evaluations that have no predictions in the folder."""
    import torch

    from abft_lens.evaluation.metrics import accuracy, encode_labels, macro_f1, paired_difference

    results = pd.read_csv(folder / "results.csv")
    rows, missing = [], []
    for (dataset, seed), piece in results.groupby(["dataset", "seed"], sort=False):
        by_method = {row["method"]: row for _, row in piece.iterrows()}
        for test, (_, prefix) in TESTS.items():
            answers = {method: method_answers(folder, row, test) for method, row in by_method.items()}
            missing += [f"{dataset} {method} seed {seed} ({test})" for method, found in answers.items()
                        if found is None and not (method == "calibration" and test != "ordinary")]
            for first, second in PAIRS:
                if answers.get(first) is None or answers.get(second) is None:
                    continue
                (a, words), (b, second_words) = answers[first], answers[second]
                where = f"{dataset} seed {seed}, {test} test, {first} and {second}"
                if words != second_words or not a[["query", "repeat", "true_label"]].equals(b[["query", "repeat", "true_label"]]):
                    raise DataError(f"{where} were not evaluated on the same inputs and label words")
                try:
                    _, (true, first_answers, second_answers) = encode_labels(
                        words, a["true_label"], a["predicted_label"], b["predicted_label"])
                except DataError as error:
                    raise DataError(f"{where}: {error}") from None
                for method, predicted in ((first, first_answers), (second, second_answers)):
                    reported = by_method[method][[f"{prefix}accuracy", f"{prefix}macro_f1"]].astype(float)
                    measured = (accuracy(true, predicted), macro_f1(true, predicted, len(words)))
                    if any(abs(m - r) > 1e-5 for m, r in zip(measured, reported)):
                        raise DataError(f"{where}: {method}'s predictions give accuracy / macro-F1 "
                                        f"{measured[0]:.6f} / {measured[1]:.6f}, results.csv reports "
                                        f"{reported.iloc[0]:.6f} / {reported.iloc[1]:.6f}")
                difference = paired_difference(true, first_answers, second_answers,
                                               torch.from_numpy(pd.factorize(a["query"])[0]), len(words), n_boot=n_boot)
                rows.append(dict(dataset=dataset, seed=int(seed), test=test, first=first, second=second,
                                 first_accuracy=accuracy(true, first_answers), second_accuracy=accuracy(true, second_answers),
                                 first_macro_f1=macro_f1(true, first_answers, len(words)),
                                 second_macro_f1=macro_f1(true, second_answers, len(words)), **difference))
    return pd.DataFrame(rows, columns=COLUMNS), missing


def merged(computed: pd.DataFrame, out: Path) -> pd.DataFrame:
    """``computed`` with the rows of an existing ``out`` table it does not recompute (their predictions are
    gone from this folder), in the computed rows' order and then the kept ones'."""
    if not out.is_file():
        return computed
    kept = pd.read_csv(out)
    if list(kept.columns) != COLUMNS:
        raise DataError(f"{out} is not a paired-differences table (other columns); choose another --out")
    done = set(computed[KEYS].itertuples(index=False, name=None))
    kept = kept[[key not in done for key in kept[KEYS].itertuples(index=False, name=None)]]
    return pd.concat([computed, kept], ignore_index=True) if len(kept) else computed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    computed, missing = paired_rows(args.folder, args.n_boot)
    if computed.empty:
        raise DataError(f"{args.folder}: no two methods of one data set and seed have predictions here "
                        "(they are not committed: run this on the folder the grid wrote)")
    if missing:
        print(f"no predictions here, not paired: {', '.join(missing)}")
    table = merged(computed, args.out)
    atomic_write_text(args.out, table.round(6).to_csv(index=False))
    shown = computed.assign(accuracy=computed["accuracy_difference"].map("{:+.3f}".format) + " ± "
                            + computed["accuracy_difference_se"].map("{:.3f}".format),
                            macro_f1=computed["macro_f1_difference"].map("{:+.3f}".format) + " ± "
                            + computed["macro_f1_difference_se"].map("{:.3f}".format))
    print(shown[KEYS + ["accuracy", "macro_f1"]].to_string(index=False))
    print(f"wrote {args.out}: {len(computed)} rows computed, {len(table) - len(computed)} kept from before")


if __name__ == "__main__":
    run_script(main)
