"""Results tables and the run folders they point to: a benchmark row names its run folder (``run_dir``),
whose evaluation ``metrics.json`` holds more than the row. Tables written before the predicted-label
columns existed are completed from there, so that every table shows the collapse flag and the count
behind its standard errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from abft_lens.evaluation.metrics import collapsed_label

BASE_MODEL_METHODS = ("vanilla", "calibration")  # evaluated in the base model's folder, not a run's
RECORD_COLUMNS = ("predicted_distribution", "collapsed_onto", "n_inputs", "label_words")


def evaluation_metrics_path(run_dir: str | Path, method: str, dataset: str) -> Path:
    """Where a row's evaluation was written: the base model's own ``metrics.json`` for vanilla and
    calibration, the run's ``evaluate_<dataset>/metrics.json`` for a fine-tuned model."""
    run_dir = Path(run_dir)
    return run_dir / "metrics.json" if method in BASE_MODEL_METHODS else run_dir / f"evaluate_{dataset}" / "metrics.json"


def collapsed_word(predicted: dict[str, float], true: dict[str, float]) -> str | None:
    """The label word a predicted distribution collapsed onto (``collapsed_label``'s rule), from the
    ``{word: share}`` distributions a ``metrics.json`` holds; None when it did not collapse."""
    words = list(predicted)
    top = collapsed_label(*(torch.tensor([d[w] for w in words], dtype=torch.float64) for d in (predicted, true)))
    return None if top is None else words[top]


def _found(relative: Path, base: Path | None) -> Path | None:
    """``relative`` as it is (from the working directory), else under ``base`` or one of its parents
    (a table's run folders are named from the directory the benchmark ran in, usually the repository's)."""
    for start in ([Path()] + ([base, *base.resolve().parents] if base is not None else [])):
        if (start / relative).is_file():
            return start / relative
    return None


def with_prediction_columns(frame: pd.DataFrame, base: Path | None = None) -> pd.DataFrame:
    """``frame`` with ``RECORD_COLUMNS``; rows without a predicted distribution get all four from their
    run folder's ``metrics.json`` (a calibration row its calibrated distribution) where the folder is
    found (from the working directory, else from ``base``, e.g. the table's folder, or a parent of it).
    Every row whose folder is found has its collapse flag derived again by ``collapsed_label``'s rule, so
    a table follows the current rule, not the one its pieces were written under; rows whose folder is
    not found keep the flag they have."""
    frame = frame.reindex(columns=list(dict.fromkeys([*frame.columns, *RECORD_COLUMNS]))).copy()
    for column in ("predicted_distribution", "collapsed_onto", "label_words"):
        frame[column] = frame[column].astype(object)
    if "run_dir" not in frame:
        return frame
    for index, row in frame.iterrows():
        path = _found(evaluation_metrics_path(str(row["run_dir"]), row["method"], row["dataset"]), base)
        if path is None:
            continue
        metrics = json.loads(path.read_text())
        key = "calibrated_predicted_distribution" if row["method"] == "calibration" else "predicted_distribution"
        predicted = metrics[key]
        collapsed = collapsed_word(predicted, metrics["true_distribution"])
        if pd.isna(row["predicted_distribution"]):
            frame.loc[index, list(RECORD_COLUMNS)] = [json.dumps(predicted), collapsed, metrics["n_inputs"],
                                                      ",".join(predicted)]
        else:
            frame.at[index, "collapsed_onto"] = collapsed
    return frame
