"""Checkpoints of a running fine-tuning: ``checkpoints/step-NNNNNN/`` holds the trained tensors, the
optimiser, PID and RNG state; each directory is built aside and renamed into place, so a kill never
leaves a half-written one, and a resumed run continues to the same final weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from abft_lens.runs import CHECKPOINTS_DIR, TRAINED_FILE, apply_tensors, read_trained_tensors
from abft_lens.training.parameters import snapshot
from abft_lens.training.runner import FinetuneRunner

_STEP_DIR = re.compile(r"^step-(\d{6})$")


def _fsync_dir(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_checkpoint(run_dir: Path, runner: FinetuneRunner) -> Path:
    """``checkpoints/step-NNNNNN/`` with the trained tensors (safetensors), optimiser/RNG state and the
    PID/step record, built in a temporary directory and renamed into place; older ones are removed."""
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{runner.completed:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        save_file(snapshot(runner.params), str(staging / TRAINED_FILE))
        torch.save(runner.state_dict(), staging / "state.pt")
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
    for old in root.iterdir():
        match = _STEP_DIR.match(old.name)
        if old != final and (match or old.name.startswith(".step-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


def restore_checkpoint(checkpoint: Path, runner: FinetuneRunner) -> None:
    apply_tensors(runner.model, read_trained_tensors(
        checkpoint / TRAINED_FILE, remedy=f"delete the checkpoint folder {checkpoint} and re-run with --resume "
                                          "(with no checkpoint left, the run starts over)"))
    runner.load_state_dict(torch.load(checkpoint / "state.pt", weights_only=True))
