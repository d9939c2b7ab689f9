"""Errors a user can act on. The CLI prints these as one clear message, without a stack trace."""


def one_line(text: str) -> str:
    """A message on one line (the CLI and the benchmark scripts print an error as one line)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class AbftLensError(Exception):
    """Base class for problems with the user's input or environment (not bugs)."""


class ModelLoadError(AbftLensError):
    """A model name or path that cannot be loaded here."""


class DataError(AbftLensError):
    """A data set, label space or pool that cannot give the prompts asked for."""


class LabelTokenError(DataError):
    """A label word that is not a single token under the model's tokenizer."""


class PromptTooLongError(DataError):
    """A prompt longer than the model's context window."""


class HeadSelectionError(AbftLensError):
    """An empty or malformed head set."""


class ConfigError(AbftLensError, ValueError):
    """A config field with an invalid value (a CLI flag, a config file's field or a Python argument).
    Also a ``ValueError``, which is what a bad argument is to Python callers."""
