"""Plotly figures. Each is saved as interactive HTML; a static PNG is written too when asked for and
a browser for kaleido is available (``save_figure`` says why when it is not)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from abft_lens.runs import atomic_write_text


def head_heatmap(table: pd.DataFrame, value: str = "correctness", title: str | None = None) -> go.Figure:
    """A layer x head heatmap of one column of a head-score table."""
    grid = table.pivot(index="layer", columns="head", values=value).sort_index()
    hover = table.pivot(index="layer", columns="head", values="rank").sort_index() if "rank" in table else None
    figure = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[str(h) for h in grid.columns], y=[str(layer) for layer in grid.index],
        colorscale="RdBu" if value == "correctness" else "Viridis",
        zmid=0 if value == "correctness" else None,
        customdata=hover.to_numpy() if hover is not None else None,
        hovertemplate="layer %{y}, head %{x}<br>" + value + " %{z:.3f}"
                      + ("<br>rank %{customdata}" if hover is not None else "") + "<extra></extra>",
        colorbar={"title": value},
    ))
    figure.update_layout(title=title or f"{value} per head", xaxis_title="head", yaxis_title="layer",
                         template="plotly_white", width=520, height=720)
    return figure


def save_figure(figure: go.Figure, path_without_suffix: Path, png: bool = False) -> list[Path]:
    """Write ``.html`` (always) and ``.png`` (if ``png``); returns the files written."""
    html = path_without_suffix.with_suffix(".html")
    # The figures must open offline, so plotly.js is written once beside them, not linked to a CDN.
    bundle = html.parent / "plotly.min.js"
    if not bundle.exists():
        atomic_write_text(bundle, get_plotlyjs())
    atomic_write_text(html, figure.to_html(include_plotlyjs="directory", full_html=True))
    written = [html]
    if png:
        target = path_without_suffix.with_suffix(".png")
        try:
            figure.write_image(target)
        except Exception as error:  # kaleido raises its own types for a missing browser
            raise RuntimeError(
                f"Could not write {target} (static export needs kaleido and a Chrome/Chromium "
                f"browser): {error}. The HTML figure {html} was written."
            ) from error
        written.append(target)
    return written
