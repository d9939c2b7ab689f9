"""The enumerated settings of the jobs, as ``Literal`` types, in a module that imports nothing heavy:
the config dataclasses annotate their fields with them (``config.validate_config`` reads the choices
from the annotation), and the CLI checks a flag against them before torch or a model is loaded."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

from abft_lens.errors import ConfigError

ThresholdKind = Literal["paper", "uniform"]
RankBy = Literal["pass_rate", "label_mass", "correctness"]
Precision = Literal["auto", "fp32", "bf16"]
ResolvedPrecision = Literal["fp32", "bf16"]
WeightDtype = Literal["float32", "bfloat16"]
# What fine-tuning trains: ABFT or the end-to-end cross-entropy (E2E), on W_Q/W_K themselves or as LoRA
# adapters on the q/k projections (the paper's E2E baseline, and its ABFT recipe for models over 10B).
Method = Literal["abft", "e2e", "abft-lora", "e2e-lora"]
LORA_METHODS = ("abft-lora", "e2e-lora")
# How a training prompt's k demonstrations are drawn: "random" (the paper's), or at least one of them carries
# the query's label, so that the ABFT reward term has a correct label to act on: "label_covering" forces one
# such demonstration and draws the rest at random (the query's label is then over-represented);
# "label_covering_resampled" redraws random sets until one holds the label (random's mix, given coverage).
TrainingDemos = Literal["random", "label_covering", "label_covering_resampled"]
# The PID controller's input: "count" (the paper's: mean flagged heads per prompt) or "relative" (that count
# over its value at the first step, times a fixed reference count: the same gains on any number of heads).
PidInput = Literal["count", "relative"]


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        shown = ", ".join("None" if choice is None else str(choice) for choice in choices)
        raise ConfigError(f"{name} must be one of {shown}; got {value!r}.")


def checked(field: str, choices):
    """A typer option callback: the value, if given, must be one of the ``Literal``'s; otherwise the same
    one-line ``ConfigError`` the config would raise, but while the command line is parsed (before the
    job's modules, torch and the model are imported)."""
    def callback(value):
        if value is not None:
            check_choice(field, value, get_args(choices))
        return value

    return callback
