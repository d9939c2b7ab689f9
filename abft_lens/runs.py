"""Run folders: every job writes its config (enough to repeat it), results and figures into one
folder. Files are written atomically (temp file + rename) so an interrupted job never leaves a
half-written file behind."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")

_VERSIONED = ("abft-lens", "torch", "transformer-lens", "transformers", "staicc", "pandas", "plotly")


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


def save_config(run_dir: Path, config: Any, name: str = "config.json", **extra: Any) -> None:
    """The dataclass ``config`` as JSON, with package versions and any ``extra`` records."""
    payload = {"config": dataclasses.asdict(config), "versions": package_versions(), **extra}
    write_json(run_dir / name, payload)


def with_overrides(config: ConfigT, overrides: dict[str, Any]) -> ConfigT:
    """``config`` with the given fields replaced; ``None`` means "not given" (a CLI flag left out)."""
    return dataclasses.replace(config, **{key: value for key, value in overrides.items() if value is not None})


def load_config(path: Path, config_type: type[ConfigT]) -> ConfigT:
    """A config dataclass from a JSON file: either a bare mapping of fields or a run folder's
    ``config.json`` (fields under ``"config"``). Unknown fields are an error, not ignored."""
    payload = json.loads(Path(path).read_text())
    fields = payload.get("config", payload)
    known = {field.name for field in dataclasses.fields(config_type)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown} for {config_type.__name__}.")
    return config_type(**{key: tuple(value) if isinstance(value, list) else value
                          for key, value in fields.items()})
