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

from abft_lens.errors import ConfigError

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
    """``config`` with the given fields replaced; ``None`` means "not given" (a CLI flag left out).
    ``dataclasses.replace`` builds a new config, so its ``__post_init__`` validates the new values at once
    (a ``ConfigError``, before any work)."""
    return dataclasses.replace(config, **{key: value for key, value in overrides.items() if value is not None})


def check_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` if a job may write its output folder there, checked before any work: not an existing
    file, not under a file or a folder this process cannot write to, and, unless ``overwrite``, not an
    existing folder that already holds files (the job would silently replace them). Else ConfigError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out: {path} is a file, not a folder; choose another output folder (--out).")
    if path.is_dir() and not overwrite and any(path.iterdir()):
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
