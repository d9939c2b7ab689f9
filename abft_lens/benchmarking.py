"""What the resumable benchmark scripts (benchmarks/bench_paper_claim.py, benchmarks/bench_ablations.py)
share: a results table that finished pieces are appended to under a file lock (so a re-run skips them and
parallel processes may share it), the loop that runs the pieces left, each in a fresh subprocess or in this
process with one model, the statistics over seeds that every claim is checked with, and the peak-memory
sampler of the speed benchmarks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path

import pandas as pd

from abft_lens.errors import AbftLensError, DataError, one_line
from abft_lens.runs import atomic_write_text

METRICS = ("accuracy", "macro_f1")


# --- the results table ---------------------------------------------------------------------------------


def read_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """The CSV at ``path``, or an empty table with ``columns`` when there is none yet."""
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=list(columns))


def append_rows(path: Path, rows: list[dict[str, object]], columns: list[str], keys: tuple[str, ...]) -> pd.DataFrame:
    """Add ``rows`` to the CSV at ``path`` (replacing rows with the same ``keys``) and rewrite it atomically,
    under a lock: pieces of one benchmark may run in parallel processes."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        frame = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=columns)
        new = pd.DataFrame(rows).reindex(columns=columns)
        new_keys = set(new[list(keys)].itertuples(index=False, name=None))
        keep = [key not in new_keys for key in frame[list(keys)].itertuples(index=False, name=None)]
        frame = pd.concat([frame[keep], new], ignore_index=True) if len(frame) else new
        atomic_write_text(path, exact_integers(frame).to_csv(index=False, float_format="%.6g"))
    return frame


def exact_integers(frame: pd.DataFrame, significant_digits: int = 6) -> pd.DataFrame:
    """``frame`` with the columns a CSV's ``float_format`` of ``significant_digits`` would misprint as
    numbers it writes in full.

    A row's None (e.g. lora_rank of a full fine-tuning) makes its column object-typed, whose floats escape
    ``float_format`` (16 came out 16.0): back to numbers. A column of counts with an empty cell is float,
    and counts of more digits are rounded (13271040 came out 1.3271e+07): whole-number columns that hold
    such a count become integers. Other columns keep their types."""
    frame = frame.infer_objects()
    for column in frame.select_dtypes("float").columns:
        values = frame[column].dropna()
        whole = len(values) and (values == values.round()).all() and (values.abs() < 2**53).all()
        if whole and (values.abs() >= 10**significant_digits).any():
            frame[column] = frame[column].astype("Int64")
    return frame


# --- running the pieces ----------------------------------------------------------------------------------


def timed_rows(rows_of: Callable[[], list[dict[str, object]]]) -> list[dict[str, object]]:
    """``rows_of()``'s rows, each with the wall time of the call (``piece_seconds``). A piece resumed after a
    kill counts its resumed part only."""
    started = time.perf_counter()
    rows = rows_of()
    return [{**row, "piece_seconds": time.perf_counter() - started} for row in rows]


def piece_keys(frame: pd.DataFrame, keys: Sequence[str]) -> list[tuple]:
    """Each row's piece: the values of its ``keys`` columns, the seed as an int (a CSV may read it as float)."""
    return list(zip(*(frame[key].astype(int) if key == "seed" else frame[key] for key in keys), strict=True))


def run_script(main: Callable[[], None]) -> None:
    """A benchmark script's entry point: bad input (an ``AbftLensError``, found before the work starts) is one
    line on stderr and exit status 2, as in the CLI."""
    try:
        main()
    except AbftLensError as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        sys.exit(2)


def check_finished_precision(frame: pd.DataFrame, keys: Sequence[str], pieces: Iterable[tuple], precision: str) -> None:
    """Before a benchmark resumes: the finished pieces of ``pieces`` that it will skip ran in ``precision``
    (this run's, resolved), or a ``DataError`` names them. A results table keys its rows by data set,
    method or setting and seed, not precision, so a resumed run in another precision would otherwise mix the
    two in one table (and compare their timings) without saying so. A row without a precision is fp32, the
    only precision before the column existed."""
    if frame.empty:
        return
    wanted = set(pieces)
    finished = frame[[key in wanted for key in piece_keys(frame, keys)]]
    ran_in = finished.get("precision", pd.Series(index=finished.index, dtype=object)).astype(object).fillna("fp32")
    other = finished[ran_in != precision]
    if len(other):
        example = " ".join(str(other.iloc[0][key]) for key in keys)
        raise DataError(f"{len(other)} finished piece(s) of this command ran in {', '.join(sorted(set(ran_in[other.index])))} "
                        f"(e.g. {example}), and this run would use {precision}: pass --precision "
                        f"{ran_in[other.index].iloc[0]}, or --out another folder.")


def run_pieces(pieces: Sequence[Hashable], finished: Callable[[], set],
               run_in_process: Callable[[Hashable, object], None] | None = None,
               child_command: Callable[[Hashable], list[str]] | None = None, model=None,
               load_model: Callable[[], object] | None = None) -> None:
    """Run every piece of ``pieces`` that ``finished()`` (read again before each: parallel processes may
    share the results) does not hold, with a progress line. With ``child_command``, each in a fresh
    subprocess (its peak memory is then its own); else in this process by ``run_in_process(piece, model)``
    with one model (``model``, else ``load_model()``, loaded only if a piece is left), whose W_Q/W_K are
    restored (and LoRA adapters removed) after each piece, so the model is left as it was given."""
    if child_command is None and set(pieces) <= finished():
        return
    in_process = None if child_command is not None else _InProcess(model if model is not None else load_model())
    for index, piece in enumerate(pieces, 1):
        label = " ".join(str(part) for part in (piece if isinstance(piece, tuple) else (piece,)))
        if piece in finished():
            print(f"[{index}/{len(pieces)}] {label}: done, skipped")
            continue
        print(f"[{index}/{len(pieces)}] {label}", flush=True)
        if in_process is None:
            subprocess.run(child_command(piece), check=True)
        else:
            in_process.run(run_in_process, piece)


class _InProcess:
    """One model for every piece: its W_Q/W_K as given, put back after each piece (and a LoRA piece's
    adapters removed); CUDA peak memory counted per piece."""

    def __init__(self, model) -> None:
        from abft_lens.training import snapshot, trainable_parameters

        self.model, self.base = model, snapshot(trainable_parameters(model, "qk"))
        self.device = next(model.parameters()).device

    def run(self, run_in_process: Callable[[Hashable, object], None], piece: Hashable) -> None:
        import torch

        from abft_lens.lora import has_lora, remove_lora
        from abft_lens.training import apply_tensors

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            run_in_process(piece, self.model)
        finally:
            if has_lora(self.model):
                remove_lora(self.model, merge=False)
            apply_tensors(self.model, self.base)


# --- statistics over seeds ---------------------------------------------------------------------------------


def binomial_standard_error(share: float | pd.Series, n: float | pd.Series) -> float | pd.Series:
    """The standard error sqrt(p (1 - p) / n) of a share ``p`` of ``n`` independent inputs: what one seed's
    accuracy can be trusted to, where there is no seed spread to show. Inputs that repeat a query with
    other demonstrations are not independent, so there it is a lower bound (by up to sqrt(repeats))."""
    return (share * (1 - share) / n) ** 0.5


def collapsed_runs(frame: pd.DataFrame) -> pd.Series:
    """Per row, whether that run collapsed onto one label (``collapsed_onto`` set); all False for a table older
    than that column."""
    if "collapsed_onto" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["collapsed_onto"].notna()


def seed_table(frame: pd.DataFrame, by: str = "method") -> pd.DataFrame:
    """Per (dataset, ``by``): mean and standard deviation over seeds of accuracy and macro-F1, the number of
    seeds, the binomial standard error of one run's accuracy, and how many seeds collapsed."""
    frame = frame.assign(collapsed=collapsed_runs(frame))
    grouped = frame.groupby(["dataset", by])
    table = grouped[list(METRICS)].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table["seeds"] = grouped["seed"].nunique()
    table["collapsed_seeds"] = grouped["collapsed"].sum().astype(int)
    n_inputs = grouped["n_inputs"].mean() if "n_inputs" in frame else pd.Series(float("nan"), index=table.index)
    mean = table["accuracy_mean"]
    table["accuracy_se"] = binomial_standard_error(mean, n_inputs)
    return table.reset_index()


def compare(table: pd.DataFrame, first: str, second: str, metric: str, by: str = "method",
            known_std: pd.Series | None = None) -> pd.DataFrame:
    """``first`` minus ``second`` (values of ``seed_table``'s ``by`` column) per data set on ``metric``, and
    whether the difference is beyond the spread: larger than the sum of the two seed standard deviations
    with 2+ seeds, else (one seed) larger than two binomial standard errors of the difference (accuracy's SE
    stands in for macro-F1's) and, where ``known_std`` gives ``metric``'s seed standard deviation on a data
    set from another benchmark's seeds, than twice that: the sum of the two sides' spreads, had each been run
    on more seeds. A binomial error alone understates what a reseed moves where the seeds spread widely."""
    wide = table.pivot(index="dataset", columns=by)
    if first not in table[by].values or second not in table[by].values:
        return pd.DataFrame()
    both = pd.DataFrame({
        "difference": wide[(f"{metric}_mean", first)] - wide[(f"{metric}_mean", second)],
        "spread": wide[(f"{metric}_std", first)].fillna(0) + wide[(f"{metric}_std", second)].fillna(0),
        "se": (wide[("accuracy_se", first)] ** 2 + wide[("accuracy_se", second)] ** 2) ** 0.5,
        "seeds": wide[("seeds", first)].combine(wide[("seeds", second)], min),
    }).dropna(subset=["difference"])
    one_seed = 2 * both["se"]
    if known_std is not None:
        # The larger of the two; a data set known_std lacks (NaN) keeps two standard errors.
        one_seed = pd.concat([one_seed, 2 * known_std.reindex(both.index)], axis=1).max(axis=1)
    both["margin"] = both["spread"].where(both["seeds"] >= 2, one_seed)
    both["beyond_spread"] = both["difference"].abs() > both["margin"]
    both["verdict"] = [("ahead" if d > 0 else "behind") if beyond else "within the spread"
                       for d, beyond in zip(both["difference"], both["beyond_spread"], strict=True)]
    return both.reset_index()


# --- memory ------------------------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory of this process during a block, sampled by a thread every ``interval``
    seconds (and once more at the end); ``added_mb`` is the peak above the resident size at the start.
    Blurred by the allocator reusing freed pages: a measure to report beside exact counts, not alone."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil  # a dev dependency: only the benchmarks measure memory this way

        self.process, self.interval = psutil.Process(), interval
        self.baseline = self.peak = 0
        self.running = False

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def added_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20
