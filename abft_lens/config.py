"""The one validator every job config dataclass runs in ``__post_init__``.

A bad value (a CLI flag, a field of a ``--config`` file, a Python argument) is a ``ConfigError`` naming
the field and the value, raised when the config is made: ``runs.with_overrides`` builds a new config
(``dataclasses.replace`` runs ``__post_init__``), so the CLI rejects a bad flag before any model loads
or data is read, not after the computation that first uses it.

- every field annotated with a ``Literal`` (or ``Literal | None``) must be one of its choices, read from
  the annotation with ``typing.get_args``: a new enumerated field is checked without more code;
- the named integer fields must be integers at least 1 (``positive``), at least 0 (``non_negative``),
  or None or at least 1 (``optional_positive``); the named float fields finite and above 0
  (``positive_float``);
- a config with a ``precision`` field (and maybe ``dtype``) gets ``precision.check_precision_fields``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, Union, get_args, get_origin

from abft_lens.choices import check_choice
from abft_lens.errors import ConfigError


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) annotation allows; None for any other."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if members and all(get_origin(arg) is Literal for arg in members):
            choices = tuple(value for arg in members for value in get_args(arg))
            return choices + (None,) if len(members) < len(get_args(annotation)) else choices
    return None


@functools.cache
def _literal_fields(config_type: type) -> dict[str, tuple[Any, ...]]:
    hints = typing.get_type_hints(config_type)
    fields = {}
    for field in dataclasses.fields(config_type):
        choices = literal_choices(hints.get(field.name))
        if choices is not None:
            fields[field.name] = choices
    return fields


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}{' (or None)' if allow_none else ''}; "
                          f"got {value!r}.")


def check_positive_float(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a number > 0; got {value!r}.")


def check_precision(precision: str, dtype: str = "float32") -> None:
    """``precision.check_precision_fields`` (which raises ValueError) as a ``ConfigError``."""
    from abft_lens.precision import check_precision_fields  # imports torch: only when a config is made

    try:
        check_precision_fields(precision, dtype)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_config(config: Any, *, positive: Iterable[str] = (), non_negative: Iterable[str] = (),
                    optional_positive: Iterable[str] = (), positive_float: Iterable[str] = ()) -> None:
    """Check the dataclass ``config`` as described in the module doc; the first bad field raises."""
    for name, choices in _literal_fields(type(config)).items():
        check_choice(name, getattr(config, name), choices)
    for name in positive:
        check_int(name, getattr(config, name), 1)
    for name in non_negative:
        check_int(name, getattr(config, name), 0)
    for name in optional_positive:
        check_int(name, getattr(config, name), 1, allow_none=True)
    for name in positive_float:
        check_positive_float(name, getattr(config, name))
    if hasattr(config, "precision"):
        check_precision(config.precision, getattr(config, "dtype", "float32"))
