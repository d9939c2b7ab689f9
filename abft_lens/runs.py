"""Run folders: every job writes its config (enough to repeat it), results and figures into one
folder. Files are written atomically (temp file + rename) so an interrupted job never leaves a
half-written file behind.

This module owns the run-folder format; every reader and writer of these files goes through it:

- ``config.json`` (``CONFIG_FILE``): ``{"config": <the job's dataclass>, "versions": ..., extras}``
  (``save_config``, ``load_config``, ``run_record``);
- ``run.log`` (``RUN_LOG``): the job's Python log (``run_log``);
- a fine-tuning run's ``metrics.jsonl`` (``METRICS_FILE``, one JSON line per optimiser step:
  ``append_metrics``, ``read_metrics``, ``write_json_lines``), ``checkpoints/step-NNNNNN/``
  (``CHECKPOINTS_DIR``, ``checkpoint_dirs``; written by ``abft_lens.training.checkpoints``: the trained
  tensors, ``state.json``, and ``state.pt`` (``RESUME_STATE_FILE``) where the run can resume from it) and,
  once finished, ``trained.safetensors`` (``TRAINED_FILE``: only the trained tensors, by parameter name,
  W_Q/W_K or a LoRA run's adapters; ``read_trained_tensors``, ``apply_tensors``, ``load_trained_model``;
  ``trained_tensor_files`` lists them by step, the kept checkpoints' included);
- ``lr_search.json`` (``LR_SEARCH_FILE``): a running lr search's finished trials, with the config as in
  ``config.json``; a killed search resumes from it, and it is gone once ``config.json`` holds the search;
- ``validation_trajectory.csv`` (``VALIDATION_TRAJECTORY_FILE``): validation accuracy per kept step
  (``abft_lens.training.trajectory``);
- an evaluation's ``partial_predictions/`` (``PARTIAL_PREDICTIONS_DIR``): the finished batches of an
  interrupted evaluation, gone once its results are written (``abft_lens.evaluation.partial``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from abft_lens.errors import AbftLensError, ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are read: `abft-lens --help` stays quick
    import pandas as pd
    from torch import Tensor

    from abft_lens.lora import LoraSettings

ConfigT = TypeVar("ConfigT")

CONFIG_FILE = "config.json"
RUN_LOG = "run.log"
PARTIAL_PREDICTIONS_DIR = "partial_predictions"  # an interrupted evaluation's finished batches
EVALUATE_RESUMABLE = (RUN_LOG, PARTIAL_PREDICTIONS_DIR)  # what `evaluate` goes on from in its out folder
METRICS_FILE = "metrics.jsonl"
LR_SEARCH_FILE = "lr_search.json"  # a running lr search's finished trials
TRAINED_FILE = "trained.safetensors"
CHECKPOINTS_DIR = "checkpoints"
RESUME_STATE_FILE = "state.pt"  # a checkpoint's optimiser and RNG state: only a resumable one has it
VALIDATION_TRAJECTORY_FILE = "validation_trajectory.csv"
_STEP_DIR = re.compile(r"^step-(\d{6})$")

_VERSIONED = ("abft-lens", "torch", "transformer-lens", "transformers", "peft", "bitsandbytes", "staicc", "pandas",
              "plotly")


def read_json_object(path: Path) -> dict[str, object]:
    """A JSON object saved by a job, or {} where the file is missing or is not one."""
    try:
        payload = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def save_config(run_dir: Path, config: Any, name: str = CONFIG_FILE, **extra: Any) -> None:
    """The dataclass ``config`` as JSON, with package versions and any ``extra`` records."""
    payload = {"config": dataclasses.asdict(config), "versions": package_versions(), **extra}
    write_json(run_dir / name, payload)


def with_overrides(config: ConfigT, overrides: dict[str, Any]) -> ConfigT:
    """``config`` with the given fields replaced; ``None`` means "not given" (a CLI flag left out).
    ``dataclasses.replace`` builds a new config, so its ``__post_init__`` validates the new values at once
    (a ``ConfigError``, before any work)."""
    return dataclasses.replace(config, **{key: value for key, value in overrides.items() if value is not None})


def check_out_dir(path: str | Path, overwrite: bool = False, resumable: Collection[str] = (RUN_LOG,)) -> Path:
    """``path`` if a job may write its output folder there, checked before any work: not an existing
    file, not under a file or a folder this process cannot write to, and, unless ``overwrite``, not an
    existing folder that already holds entries other than ``resumable`` ones (the job would silently
    replace them). Every job resumes a folder holding only a failed run's run.log (its log is appended
    to, nothing is replaced); `evaluate` also an interrupted evaluation's ``PARTIAL_PREDICTIONS_DIR``.
    Else ConfigError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out: {path} is a file, not a folder; choose another output folder (--out).")
    if path.is_dir() and not overwrite and any(entry.name not in resumable for entry in path.iterdir()):
        names = sorted(entry.name for entry in path.iterdir())
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ConfigError(f"out: {path} already exists and is not empty ({shown}); pass --overwrite to "
                          "replace its files, or choose another output folder (--out).")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out: cannot create {path}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out: cannot write to {existing} (permission denied), so not to {path}; choose "
                          "another output folder (--out).")
    return path


def check_out_file(path: str | Path, suffixes: tuple[str, ...], overwrite: bool = False, why: str = "") -> Path:
    """``path`` if a job may write its output file there, checked before any work: it ends in one of
    ``suffixes`` (``why`` says why, in the error), is not a folder, is not an existing file unless
    ``overwrite``, and its folder can be created and written to (``check_out_dir``). Else ConfigError."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"out: {path} should end in {suffixes[0]}{f' ({why})' if why else ''}.")
    if path.is_dir():
        raise ConfigError(f"out: {path} is a folder; name a file, e.g. {path / ('out' + suffixes[0])}.")
    if path.exists() and not overwrite:
        raise ConfigError(f"out: {path} already exists; pass --overwrite to replace it, or choose another file (--out).")
    check_out_dir(path.parent if str(path.parent) else Path("."), overwrite=True)
    return path


def load_config(path: Path, config_type: type[ConfigT]) -> ConfigT:
    """A config dataclass from a JSON file: either a bare mapping of fields or a run folder's
    ``config.json`` (fields under ``"config"``). Unknown fields are an error, not ignored."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"config: cannot read {path} as JSON: {error}") from None
    fields = payload.get("config", payload) if isinstance(payload, dict) else None
    if not isinstance(fields, dict):
        raise ConfigError(f"config: {path} holds no mapping of {config_type.__name__} fields.")
    known = {field.name for field in dataclasses.fields(config_type)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown} for {config_type.__name__}.")
    return config_type(**{key: tuple(value) if isinstance(value, list) else value
                          for key, value in fields.items()})


# --- a run's record and log ---------------------------------------------------------------------------


def run_payload(run_dir: str | Path) -> dict[str, Any]:
    """A job's whole ``config.json``: its ``"config"`` mapping and the records saved beside it (a fine-tuning
    run's chosen ``lr``, ...); an error naming the folder if it has none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise AbftLensError(f"{run_dir} is not a fine-tuning run folder (no {CONFIG_FILE}).")
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise AbftLensError(f"Cannot read {path} as JSON: {error}") from None
    if not isinstance(payload, dict):
        raise AbftLensError(f"{path} holds no job config (no \"config\" mapping).")
    return payload


def run_record(run_dir: str | Path) -> dict[str, Any]:
    """The config fields of a job's ``config.json`` (its ``"config"`` mapping); an error naming the
    folder if it has none."""
    path = Path(run_dir) / CONFIG_FILE
    payload = run_payload(run_dir)
    record = payload.get("config", {})
    if not isinstance(record, dict):
        raise AbftLensError(f"{path} holds no job config (no \"config\" mapping).")
    return record


LOGGER_NAME = "abft_lens"


@contextmanager
def run_log(run_dir: str | Path, job: str) -> Iterator[logging.Logger]:
    """Log the ``abft_lens`` loggers' records (INFO and up) to ``run_dir/run.log`` for the duration,
    appending, so a resumed run's log continues the first one's. Yields the job's logger."""
    path = Path(run_dir) / RUN_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger(LOGGER_NAME)
    previous_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    logger = logging.getLogger(f"{LOGGER_NAME}.{job}")
    try:
        yield logger
    except BaseException as error:
        logger.error("stopped: %s: %s", type(error).__name__, error)
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


# --- metrics.jsonl -------------------------------------------------------------------------------------


def read_metrics(path: str | Path, up_to_step: float = math.inf) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl`` (a file, or the run folder holding one) of steps <= ``up_to_step``,
    in file order. A line cut short by a kill is dropped; a missing file has no lines."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", math.inf) <= up_to_step:
                rows.append(row)
    return rows


def pid_input_counts(steps: pd.DataFrame) -> pd.Series:
    """Each logged step's PID input: ``induction_heads`` (the induction heads per prompt among the loss's
    heads); a step logged before that column existed gives ``flagged_heads``, which the PID counted then
    (the same count with the paper's per-prompt filter, all heads given the loss without it)."""
    if "induction_heads" not in steps:
        return steps["flagged_heads"]
    return steps["induction_heads"].fillna(steps["flagged_heads"])


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """One more line of ``metrics.jsonl``, on disk (fsync) before the step counts as logged."""
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_json_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with these lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


# --- fine-tuning run folders: which folders are runs -----------------------------------------------------


def is_run_dir(path: Path) -> bool:
    """A fine-tuning run folder: a ``config.json`` written by ``save_config`` (fields under
    ``"config"``; a Hugging Face model directory's config.json has none) and a checkpoint."""
    config = path / CONFIG_FILE
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        payload = json.loads(config.read_text())
    except ValueError:
        return False
    has_checkpoint = any(path.glob("*.safetensors")) or any(path.glob("checkpoint*"))
    return isinstance(payload, dict) and "config" in payload and has_checkpoint


def check_not_broken_run_dir(path: Path) -> None:
    """A folder with a fine-tuning run's files (trained.safetensors, checkpoints/) but no run config.json,
    or with a run config.json but no trained tensors, is a damaged or unfinished run folder, not a Hugging
    Face model directory: an error naming it, before any model loads."""
    if not path.is_dir() or is_run_dir(path):
        return
    config = path / CONFIG_FILE
    try:
        payload = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, ValueError):
        payload = None  # unreadable
    if isinstance(payload, dict) and "config" in payload:
        raise AbftLensError(f"{path} holds a job's config.json but no trained.safetensors and no checkpoint: it "
                            "is not a finished fine-tuning run (nor a model directory). Pass a finished run "
                            "folder, or re-run the fine-tuning.")
    run_files = [name for name in (TRAINED_FILE, CHECKPOINTS_DIR) if (path / name).exists()]
    if not run_files or isinstance(payload, dict):  # a model directory (a Hugging Face config.json)
        return
    problem = "has a config.json that cannot be read" if config.is_file() else "has no config.json"
    raise AbftLensError(f"{path} looks like a fine-tuning run folder (it has {' and '.join(run_files)}) but "
                        f"{problem}, so its base model and settings are unknown. Pass a complete run folder, "
                        "or re-run the fine-tuning.")


# --- checkpoints and trained tensors ----------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """A run's published ``checkpoints/step-NNNNNN/`` folders as (step, folder), in step order (one being
    written, ``.step-*``, is not published yet)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted((int(match.group(1)), path) for path in root.iterdir() if (match := _STEP_DIR.match(path.name)))


def trained_tensor_files(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every set of trained tensors a run folder holds, as (step, file) in step order: each checkpoint's and,
    once the run has finished, ``trained.safetensors`` at its last step (which it replaces, if a checkpoint
    of that step was kept)."""
    run_dir = Path(run_dir)
    files = {step: folder / TRAINED_FILE for step, folder in checkpoint_dirs(run_dir) if (folder / TRAINED_FILE).is_file()}
    if (run_dir / TRAINED_FILE).is_file():
        files[int(run_record(run_dir).get("steps", max(files, default=0)))] = run_dir / TRAINED_FILE
    return sorted(files.items())


# --- trained tensors and the trained model ----------------------------------------------------------------


def read_trained_tensors(path: str | Path, remedy: str | None = None) -> dict[str, Tensor]:
    """The tensors of a ``trained.safetensors`` (a finished run's or a checkpoint's). A file that cannot
    be read (truncated by a full disk, damaged) is an ``AbftLensError`` naming it and what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        remedy = remedy or (f"delete it and re-run the fine-tuning with `abft-lens finetune --config "
                            f"{path.parent / CONFIG_FILE} --resume` (it continues from the last checkpoint if one "
                            "is left, else starts over)")
        raise AbftLensError(f"Cannot read the trained tensors in {path}: {error}. The file is truncated or "
                            f"damaged; {remedy}.") from error


def apply_tensors(model, tensors: dict[str, Tensor]) -> None:
    """Copy ``tensors`` into the model's parameters of the same names (in place, so views of a fused
    parameter write into it)."""
    import torch

    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise AbftLensError(f"The trained tensors name parameters this model does not have: {unknown[:3]}...")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise AbftLensError(f"{name}: trained tensor has shape {tuple(tensor.shape)}, the model's "
                                    f"parameter {tuple(params[name].shape)}.")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def read_finished_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A finished fine-tuning run's config fields and its trained tensors (by parameter name); an error
    naming the folder if it is not one, or has not finished."""
    run_dir = Path(run_dir)
    trained = run_dir / TRAINED_FILE
    if not (run_dir / CONFIG_FILE).is_file():
        raise AbftLensError(f"{run_dir} is not a fine-tuning run folder (no {CONFIG_FILE}).")
    if not trained.is_file():
        raise AbftLensError(f"{run_dir} has no {TRAINED_FILE}: the run has not finished. Resume it with "
                            f"`abft-lens finetune --config {run_dir / CONFIG_FILE} --resume`.")
    record = run_record(run_dir)
    return record, read_trained_tensors(trained)


def lora_settings_of(record: dict[str, Any]) -> LoraSettings | None:
    """The LoRA adapter a run's config fields describe (None for a full-rank run)."""
    from abft_lens.choices import LORA_METHODS
    from abft_lens.lora import LoraSettings

    if record.get("method") not in LORA_METHODS:
        return None
    try:
        return LoraSettings(int(record["lora_rank"]), float(record["lora_alpha"]), float(record["lora_dropout"]))
    except (KeyError, TypeError, ValueError) as error:
        raise AbftLensError(f"The run's config is a LoRA run ({record.get('method')}) without a valid lora_rank, "
                            f"lora_alpha and lora_dropout: {error}") from None


def load_trained_model(run_dir: str | Path, device: str | None = None, dtype: str = "float32", merge: bool = True):
    """The base model named in the run's config.json with the run's trained tensors applied (``dtype``:
    how the weights are held, float32 or bfloat16).

    A LoRA run's adapters are attached and loaded; with ``merge`` (the default) their update is then added
    to W_Q/W_K and the adapters removed, so the model is a plain one whose fine-tuned weights every tool
    reads as for a full-rank run; ``merge=False`` keeps the adapters as they were trained (the same
    logits up to float rounding). The base is loaded in ``dtype`` even for a run trained over 4-bit
    weights (``load_in_4bit``): the adapter is applied to the unquantised base."""
    from abft_lens.lora import attach_lora, remove_lora
    from abft_lens.models import DEFAULT_MODEL, load_model
    from abft_lens.precision import WEIGHT_DTYPES

    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(WEIGHT_DTYPES)}; got {dtype!r}.")
    record, tensors = read_finished_run(run_dir)  # before the model loads: a damaged file fails at once
    model_name = record.get("model", DEFAULT_MODEL)
    if not isinstance(model_name, str):
        raise AbftLensError(f"{Path(run_dir) / CONFIG_FILE}: field 'model' must be a model name; got {model_name!r}.")
    lora = lora_settings_of(record)
    model = load_model(model_name, device=device, dtype=WEIGHT_DTYPES[dtype])
    if lora is not None:
        attach_lora(model, lora, seed=0)  # the initial values do not matter: the run's tensors replace them
    apply_tensors(model, tensors)
    if lora is not None and merge:
        remove_lora(model, merge=True)
    model.eval()
    return model
