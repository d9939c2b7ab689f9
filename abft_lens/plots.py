"""Plotly figures. Each is saved as interactive HTML; a static PNG is written too when asked for and
a browser for kaleido is available (``save_figure`` says why when it is not)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from abft_lens.benchmarking import binomial_standard_error
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


def figure_file(path_without_suffix: Path, suffix: str) -> Path:
    """``path_without_suffix`` with ``suffix`` appended, not swapped in: a run folder's figure such as
    ``training_sst2_lr=0.001_seed42`` has no suffix of its own to replace."""
    return path_without_suffix.with_name(f"{path_without_suffix.name}{suffix}")


def save_figure(figure: go.Figure, path_without_suffix: Path, png: bool = False) -> list[Path]:
    """Write ``.html`` (always) and ``.png`` (if ``png``); returns the files written."""
    html = figure_file(path_without_suffix, ".html")
    # The figures must open offline, so plotly.js is written once beside them, not linked to a CDN.
    bundle = html.parent / "plotly.min.js"
    if not bundle.exists():
        atomic_write_text(bundle, get_plotlyjs())
    atomic_write_text(html, figure.to_html(include_plotlyjs="directory", full_html=True))
    written = [html]
    if png:
        target = figure_file(path_without_suffix, ".png")
        try:
            _write_png(figure, target)
        except Exception as error:  # kaleido raises its own types for a missing browser
            raise RuntimeError(
                f"Could not write {target} (static export needs kaleido, the `figures` extra, and a "
                f"Chrome/Chromium browser, e.g. `apt-get install chromium`): {error}. "
                f"The HTML figure {html} was written."
            ) from error
        written.append(target)
    return written


def _write_png(figure: go.Figure, target: Path, attempts: int = 2) -> None:
    """``figure.write_image``, tried twice: on a machine busy with training, kaleido's browser page sometimes
    has not loaded its own scripts when the export starts ("ReferenceError: kaleido_scopes is not defined"),
    and the same export a moment later works. A missing kaleido or browser fails both tries."""
    for attempt in range(attempts):
        try:
            figure.write_image(target)
            return
        except Exception:
            if attempt == attempts - 1:
                raise


def error_bars(spread) -> dict[str, object]:
    """A bar trace's ``error_y`` from its bars' spreads (NaN where a bar has none). plotly draws a missing
    error as a flat cap, which reads as "no spread": a trace none of whose bars has one draws no error bars."""
    values = [None if pd.isna(value) else float(value) for value in spread]
    return {"type": "data", "array": values, "visible": any(value is not None for value in values)}


# One colour per method or setting, in order of first appearance, for every figure: the Table 4 bars and the Fig. 5
# lines of the same settings then match.
PALETTE = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D")
# One colour per method in every figure that compares methods (the LoRA variants a lighter shade of theirs).
METHOD_COLOURS = {"vanilla": "#9D9D9D", "calibration": "#72B7B2", "abft": "#F58518", "e2e": "#4C78A8",
                  "abft-lora": "#FFBF79", "e2e-lora": "#9ECAE9"}


def plotted_metrics(results: pd.DataFrame, metrics: tuple[str, ...]) -> list[str]:
    """The panels ``method_comparison`` draws, top to bottom: the ``metrics`` that ``results`` has values of."""
    return [m for m in metrics if m in results and results[m].notna().any()]


def method_comparison(
    results: pd.DataFrame,
    metrics: tuple[str, ...] = ("accuracy", "macro_f1", "consistency"),
    method: str = "method",
    group: str = "dataset",
    title: str | None = None,
    colours: dict[str, str] | None = None,
    binomial: tuple[str, ...] = (),
) -> go.Figure:
    """Grouped bars comparing methods: one panel per metric, one group of bars per ``group`` value
    (data set), one bar colour per ``method`` (``colours`` by name, else a fixed palette), both in
    their order of first appearance. Several rows per (group, method), e.g. seeds, are averaged and
    their standard deviation drawn as error bars. A single row has no spread to show: for the metrics in
    ``binomial`` (shares of the ``n_inputs`` scored inputs) its bar carries the binomial standard error,
    for the others none. Metrics missing from ``results`` (or all NaN) are left out."""
    from plotly.subplots import make_subplots

    missing = [column for column in (method, group) if column not in results]
    if missing:
        raise ValueError(f"results has no column(s) {missing}; columns are {list(results.columns)}.")
    shown = plotted_metrics(results, metrics)
    if not shown:
        raise ValueError(f"results has none of the metrics {list(metrics)}.")
    stats = results.groupby([group, method], sort=False)[shown].agg(["mean", "std"])
    if binomial and "n_inputs" in results:  # where no spread exists (one row with the metric): the binomial error
        inputs = results.groupby([group, method], sort=False)["n_inputs"].mean()
        for metric in (m for m in binomial if m in shown):
            spread = stats[(metric, "std")]
            stats[(metric, "std")] = spread.fillna(binomial_standard_error(stats[(metric, "mean")], inputs))
    groups = list(dict.fromkeys(results[group]))
    methods = list(dict.fromkeys(results[method]))
    figure = make_subplots(rows=len(shown), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                           subplot_titles=[m.replace("_", " ") for m in shown])
    for row, metric in enumerate(shown, start=1):
        for index, name in enumerate(methods):
            present = [g for g in groups if (g, name) in stats.index]
            means = [stats.loc[(g, name), (metric, "mean")] for g in present]
            stds = [stats.loc[(g, name), (metric, "std")] for g in present]
            figure.add_trace(go.Bar(
                x=[str(g) for g in present], y=means, name=str(name), legendgroup=str(name),
                showlegend=row == 1, marker_color=(colours or {}).get(name, PALETTE[index % len(PALETTE)]),
                error_y=error_bars(stds),
                hovertemplate=f"{name}<br>%{{x}}<br>{metric} %{{y:.3f}}<extra></extra>",
            ), row=row, col=1)
        # In the order of ``groups`` even where the first method lacks a group (plotly would take the
        # traces' order of appearance), so that shapes drawn at a group's position land on it.
        figure.update_xaxes(categoryorder="array", categoryarray=[str(g) for g in groups], row=row, col=1)
        fraction = results[metric].dropna().between(0, 1).all()
        figure.update_yaxes(title_text=metric, range=[0, 1] if fraction else None, row=row, col=1)
    # Each extra title line (a <br> subtitle) needs room above the first panel's own title.
    title_lines = (title or "").count("<br>")
    figure.update_layout(barmode="group", template="plotly_white", title=title or "Methods compared",
                         height=260 * len(shown) + 120 + 30 * title_lines,
                         width=max(720, 45 * len(groups) * len(methods)),
                         margin={"t": 90 + 30 * title_lines}, legend_title_text=method)
    return figure


def __getattr__(name: str):
    """``plots.attention_view`` and ``plots.pattern_view`` (abft_lens.attention_view), imported on first use:
    they need torch, which the table figures above do not."""
    if name in ("attention_view", "pattern_view", "attention_figure"):
        from abft_lens import attention_view as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
