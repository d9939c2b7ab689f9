"""The registry of figure sources that `abft-lens figures` draws besides its own (see abft_lens.figures).
Plugins (our `analysis/`) register here when the CLI starts, so this module imports nothing heavy: a
command line must not pay for pandas and plotly before it is even parsed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

FigureSource = Callable[[Sequence[Path], Path, bool], list[Path]]
_SOURCES: list[tuple[str, FigureSource]] = []


def register_figure_source(name: str, source: FigureSource) -> None:
    """Add a figure source; registering the same name again replaces it."""
    _SOURCES[:] = [(n, s) for n, s in _SOURCES if n != name] + [(name, source)]


def figure_sources() -> list[tuple[str, FigureSource]]:
    return list(_SOURCES)
