"""Checkpoints of a running fine-tuning: ``checkpoints/step-NNNNNN/`` holds the trained tensors, the
optimiser, PID and RNG state; each directory is built aside and renamed into place, so a kill never
leaves a half-written one, and a resumed run continues to the same final weights.

By default only the newest checkpoint is kept, and none once the run has finished. With
``keep_checkpoints`` every one stays, so that the trajectory can be evaluated afterwards
(``abft_lens.training.trajectory``); the older ones lose their optimiser state (``state.pt``, twice the
size of the trained tensors under Adam), which only resuming needs, and only from the newest."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from abft_lens.runs import (
    CHECKPOINTS_DIR,
    RESUME_STATE_FILE,
    TRAINED_FILE,
    apply_tensors,
    checkpoint_dirs,
    checkpoint_name,
    read_trained_tensors,
)
from abft_lens.training.parameters import snapshot
from abft_lens.training.runner import FinetuneRunner


def _fsync_dir(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_checkpoint(run_dir: Path, runner: FinetuneRunner, keep: bool = False) -> Path:
    """``checkpoints/step-NNNNNN/`` with the trained tensors (safetensors), optimiser/RNG state and the
    PID/step record, built in a temporary directory and renamed into place. Older ones are removed, or with
    ``keep`` lose only their optimiser state (see the module doc)."""
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(runner.completed)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        save_file(snapshot(runner.params), str(staging / TRAINED_FILE))
        torch.save(runner.state_dict(), staging / RESUME_STATE_FILE)
        (staging / "state.json").write_text(json.dumps(
            {"step": runner.completed, "lr": runner.lr, "pid": runner.controller.state_dict()}, indent=1))
        for file in staging.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in root.iterdir():  # leftovers of a killed write, too
        if old.name.startswith(".step-"):
            shutil.rmtree(old, ignore_errors=True)
    for _, old in checkpoint_dirs(run_dir):
        if old != final:
            _retire(old, keep)
    return final


def _retire(checkpoint: Path, keep: bool) -> None:
    if keep:
        (checkpoint / RESUME_STATE_FILE).unlink(missing_ok=True)
    else:
        shutil.rmtree(checkpoint, ignore_errors=True)


def finish_checkpoints(run_dir: Path, keep: bool = False) -> None:
    """A finished run needs no checkpoint to resume from: remove them, or with ``keep`` their optimiser state."""
    if keep:
        for _, checkpoint in checkpoint_dirs(run_dir):
            _retire(checkpoint, keep=True)
    else:
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint a run can resume from (one with its optimiser state), or None."""
    resumable = [path for _, path in checkpoint_dirs(run_dir) if (path / RESUME_STATE_FILE).is_file()]
    return resumable[-1] if resumable else None


def restore_checkpoint(checkpoint: Path, runner: FinetuneRunner) -> None:
    apply_tensors(runner.model, read_trained_tensors(
        checkpoint / TRAINED_FILE, remedy=f"delete the checkpoint folder {checkpoint} and re-run with --resume "
                                          "(with no checkpoint left, the run starts over)"))
    runner.load_state_dict(torch.load(checkpoint / RESUME_STATE_FILE, weights_only=True))
