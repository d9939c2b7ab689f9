"""Training dynamics: the per-step metrics that `abft_lens.training` writes to each run's
metrics.jsonl (for ABFT and E2E alike: ``correct_mass`` and ``wrong_mass``, the mean label mass
of the heads flagged on each prompt of the step's pseudo-batch, measured in that step's forward,
i.e. before its update), gathered into one table. The files are read through ``abft_lens.runs``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from abft_lens.errors import AbftLensError
from abft_lens.runs import METRICS_FILE, run_record
from abft_lens.runs import read_metrics as read_metrics_lines


def read_metrics(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """One row per (run, step): ``method`` (from the run's config; the folder name is added when two
    runs share a method), ``run``, ``step`` and every logged metric."""
    frames = []
    for run_dir in run_dirs:
        path = Path(run_dir) / METRICS_FILE
        if not path.is_file():
            raise AbftLensError(f"{run_dir} has no {METRICS_FILE}.")
        frame = pd.DataFrame(read_metrics_lines(path))
        for column in ("step", "correct_mass", "wrong_mass"):
            if column not in frame:
                raise AbftLensError(f"{path} has no '{column}' field; is it a metrics file of abft_lens.training?")
        frames.append(frame.assign(method=str(run_record(run_dir).get("method", "?")), run=Path(run_dir).name))
    if not frames:
        raise AbftLensError("No run folders given.")
    table = pd.concat(frames, ignore_index=True)
    per_method = table.groupby("method")["run"].nunique()
    shared = table["method"].isin(per_method[per_method > 1].index)
    table.loc[shared, "method"] = table.loc[shared, "method"] + " (" + table.loc[shared, "run"] + ")"
    first = ["method", "run", "step", "correct_mass", "wrong_mass"]
    return table[first + [c for c in table.columns if c not in first]].sort_values(["method", "step"], kind="stable")
