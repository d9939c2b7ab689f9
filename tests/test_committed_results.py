"""The committed benchmark results agree with their run records and with what RESULTS.md quotes.

The bf16 grid (issues 13-15) commits a results table, each run's evaluation ``metrics.json`` and a
hand-written table in benchmarks/RESULTS.md. An audit once found 24 places where the text and the tables
disagreed; these tests make such a drift fail CI. They read files only (no model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from abft_lens.data import load_dataset
from abft_lens.evaluation.records import collapsed_word, evaluation_metrics_path

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "benchmarks" / "results" / "paper_claim_smollm2_bf16"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
DISPLAY_NAMES = {"SST-2": "sst2", "SST-5": "sst5", "TREC": "trec", "SUBJ": "subj", "MR": "mr", "FP": "fp",
                 "TEE": "tee", "TEH": "teh"}


@pytest.fixture(scope="module")
def grid() -> pd.DataFrame:
    return pd.read_csv(GRID / "results.csv")


def _evaluation_metrics(row: pd.Series) -> dict | None:
    """The ``metrics.json`` the row was read from; None where its folder was not committed."""
    path = ROOT / evaluation_metrics_path(str(row["run_dir"]), row["method"], row["dataset"])
    return json.loads(path.read_text()) if path.is_file() else None


def test_every_grid_row_used_the_data_sets_paper_label_words(grid):
    # Issue 13: SUBJ had been scored with StaICC's false/true instead of the paper's objective/subjective.
    for dataset, words in grid.groupby("dataset")["label_words"]:
        assert set(words) == {",".join(load_dataset(dataset).label_words)}, dataset


def test_grid_rows_match_their_run_records_and_collapse_rule(grid):
    checked = 0
    for _, row in grid.iterrows():
        metrics = _evaluation_metrics(row)
        if metrics is None:
            continue
        prefix = "calibrated_" if row["method"] == "calibration" else ""
        assert row["accuracy"] == pytest.approx(metrics[f"{prefix}accuracy"], abs=1e-5), row["run_dir"]  # results.csv keeps 6 digits
        assert row["macro_f1"] == pytest.approx(metrics[f"{prefix}macro_f1"], abs=1e-5), row["run_dir"]  # results.csv keeps 6 digits
        predicted = metrics[f"{prefix}predicted_distribution"]
        assert json.loads(row["predicted_distribution"]) == pytest.approx(predicted)
        expected = collapsed_word(predicted, metrics["true_distribution"])
        assert (None if pd.isna(row["collapsed_onto"]) else row["collapsed_onto"]) == expected, row["run_dir"]
        assert metrics[f"{prefix}collapsed_onto"] == expected, row["run_dir"]
        checked += 1
    assert checked >= 10  # the run folders are committed from SST-2 on


def _section_tables(path: Path, heading: str) -> list[list[str]]:
    """The Markdown tables of the section of ``path`` that starts at ``heading`` (until the next "## " or
    "### " heading), each as its lines."""
    text = path.read_text()
    section = text[text.index(heading):].splitlines()[1:]
    headings = (i for i, line in enumerate(section) if line.startswith(("## ", "### ")))  # not a "# comment"
    section = section[:next(headings, len(section))]
    tables, current = [], []
    for line in [*section, ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables, current = [*tables, current], []
    return tables


def _by_first_cell(tables: list[list[str]]) -> dict[str, str]:
    """Each table as Markdown text, keyed by its header's first cell."""
    return {table[0].split("|")[1].strip(): "\n".join(table) + "\n" for table in tables}


def _grid_section_tables() -> list[list[str]]:
    """The Markdown tables of RESULTS.md's bf16 grid section."""
    return _section_tables(RESULTS_MD, "### The three-seed grid in bf16")


def _results_md_grid_rows() -> list[dict[str, str]]:
    """The rows of RESULTS.md's per-seed bf16 grid table (its header starts with "data set"), as
    {column: cell}."""
    table = next(table for table in _grid_section_tables() if table[0].startswith("| data set |"))
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:5] == ["data set", "method", "seed", "accuracy", "macro-F1"], header
    assert set(table[1]) <= set("|-: "), "the line under the header is the separator"
    rows = [dict(zip(header, [cell.strip() for cell in line.strip("|").split("|")], strict=True))
            for line in table[2:]]
    unknown = {row["data set"] for row in rows} - set(DISPLAY_NAMES)
    assert not unknown, f"data sets not in DISPLAY_NAMES: {unknown}"
    return rows


# RESULTS.md's grid columns, by the results.csv values they quote.
GRID_COLUMNS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "flipped": "flipped acc. (memorised)",
                "symbols": "symbols acc. / macro-F1", "zero_shot_accuracy": "0-shot acc."}


def cell_of(row: dict[str, str], column: str) -> str:
    return row[GRID_COLUMNS[column]]


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+", cell)]


def test_results_md_quotes_the_committed_grid(grid):
    rows = _results_md_grid_rows()
    assert len(rows) >= 20
    indexed = grid.set_index(["dataset", "method", "seed"])
    for row in rows:
        method = row["method"].split(" (")[0].lower()
        key = (DISPLAY_NAMES[row["data set"]], method, int(row["seed"]))
        assert key in indexed.index, f"RESULTS.md quotes {key}, which results.csv does not have"
        committed = indexed.loc[key]
        quoted = {column: _numbers(cell_of(row, column)) for column in GRID_COLUMNS}
        expected = {"accuracy": [committed["accuracy"]], "macro_f1": [committed["macro_f1"]],
                    "flipped": [committed["flipped_accuracy"], committed["flipped_memorised_share"]],
                    "symbols": [committed["symbols_accuracy"], committed["symbols_macro_f1"]],
                    "zero_shot_accuracy": [committed["zero_shot_accuracy"]]}
        for column, numbers in quoted.items():
            if not numbers:
                assert cell_of(row, column) == "-", (key, column)  # not measured for this row
                continue
            assert numbers == pytest.approx(expected[column], abs=0.0006), (key, column)


def test_results_md_seed_tables_are_the_committed_grid_s_three_seed_data_sets(grid, bench):
    """RESULTS.md's mean ± std tables are what the benchmark's seed_table_markdown draws from results.csv,
    over the data sets where vanilla, calibration, ABFT and E2E have three seeds."""
    rows = grid[grid["method"].isin(["vanilla", "calibration", "abft", "e2e"])]
    seeds = rows.groupby("dataset")["seed"].nunique()
    rows = rows[rows["dataset"].isin(seeds[seeds == 3].index)]
    quoted = _by_first_cell(_grid_section_tables())
    for metric in ("accuracy", "macro_f1"):
        assert quoted[metric] == bench.seed_table_markdown(bench.seed_table(rows), metric), metric


def _readme_headline_tables() -> dict[str, str]:
    """The Markdown tables of the README's "What ABFT does on the embedded model" section, by their first
    header cell."""
    return _by_first_cell(_section_tables(ROOT / "README.md", "## What ABFT does on the embedded model"))


def test_readme_headline_tables_are_the_committed_bf16_grid(grid, bench):
    """The README's headline is seed_table_markdown of the bf16 grid: the four methods on every data set,
    mean ± std over the seeds each has, with the collapsed flags (issue 13)."""
    rows = grid[grid["method"].isin(["vanilla", "calibration", "abft", "e2e"])]
    assert rows["dataset"].nunique() == 8
    tables = _readme_headline_tables()
    for metric in ("accuracy", "macro_f1"):
        assert tables[metric] == bench.seed_table_markdown(bench.seed_table(rows), metric), metric


def test_readme_seed_42_robustness_row_is_the_committed_tables():
    """Unseen-label accuracy from the bf16 grid's seed 42, prediction consistency from the fp32 table (the
    bf16 grid did not rerun it): each the mean over the 8 data sets."""
    bf16 = pd.read_csv(GRID / "results.csv")
    fp32 = pd.read_csv(ROOT / "benchmarks" / "results" / "paper_claim_smollm2" / "results.csv")
    sources = {"unseen-label accuracy": (bf16[bf16["seed"] == 42], "unseen_label_accuracy"),
               "prediction consistency": (fp32, "consistency")}
    table = _readme_headline_tables()["seed 42, mean over 8 data sets"].splitlines()
    for label, (frame, column) in sources.items():
        per_dataset = frame.groupby(["method", "dataset"])[column].mean()
        means = per_dataset.groupby("method").mean()
        line = next(line for line in table if line.startswith(f"| {label}"))
        cells = [cell.strip() for cell in line.strip("|").split("|")][1:]
        for method, cell in zip(("vanilla", "calibration", "abft", "e2e"), cells, strict=True):
            if cell == "-":
                assert pd.isna(means.get(method)), (label, method)
            else:
                assert per_dataset[method].size == 8, (label, method)
                assert float(cell) == pytest.approx(means[method], abs=0.0006), (label, method)
