"""Plotly figures of the analysis: per-layer cosines with ABFT, the E2E gradient's path components,
per-head cosines, the sign test, the training dynamics and the interpolation landscape. Each
function takes the tidy tables the analysis returns and gives a ``plotly.graph_objects.Figure``;
``abft_lens.plots.save_figure`` writes them as offline HTML."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from abft_lens.plots import PALETTE

COLOURS = {"full": "#4C78A8", "label": "#F58518", "correct": "#54A24B", "wrong": "#E45756", "rest": "#9D755D",
           "abft": "#F58518", "e2e": "#4C78A8"}


def layer_cosines(layers: pd.DataFrame, title: str = "cosine(E2E gradient, ABFT gradient) per layer") -> go.Figure:
    """Bars per layer: cosine of the ABFT gradient with the whole E2E gradient, its label-attention
    path and the rest."""
    figure = go.Figure()
    for part, name in (("full", "whole E2E gradient"), ("label", "E2E label-attention path"), ("rest", "E2E rest")):
        figure.add_trace(go.Bar(x=layers["layer"], y=layers[f"cos_{part}_abft"], name=name,
                                marker_color=COLOURS[part],
                                hovertemplate=f"layer %{{x}}<br>{name}: cos %{{y:.3f}}<extra></extra>"))
    figure.update_layout(barmode="group", template="plotly_white", title=title, xaxis_title="layer",
                         yaxis_title="cosine with the ABFT gradient", yaxis_range=[-1, 1], width=1000, height=420)
    return figure


def layer_components(layers: pd.DataFrame, title: str = "E2E gradient on W_Q/W_K by path") -> go.Figure:
    """Top: the norm of each path part per layer. Bottom: each part's projection share of the whole
    (<part, full> / ||full||^2; correct + wrong + rest = 1)."""
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                           subplot_titles=("norm of each part", "projection share of the whole gradient"))
    for part, name in (("correct", "query row -> correct labels"), ("wrong", "query row -> wrong labels"),
                       ("rest", "rest"), ("full", "whole")):
        figure.add_trace(go.Bar(x=layers["layer"], y=layers[f"norm_{part}"], name=name, marker_color=COLOURS[part],
                                legendgroup=part), row=1, col=1)
        if part != "full":
            figure.add_trace(go.Bar(x=layers["layer"], y=layers[f"share_{part}_projection"], name=name,
                                    marker_color=COLOURS[part], legendgroup=part, showlegend=False), row=2, col=1)
    figure.update_yaxes(type="log", title_text="norm", row=1, col=1)
    figure.update_yaxes(title_text="share", row=2, col=1)
    figure.update_xaxes(title_text="layer", row=2, col=1)
    figure.update_layout(barmode="group", template="plotly_white", title=title, width=1000, height=700)
    return figure


def head_cosines(heads: pd.DataFrame, title: str = "cosine(E2E, ABFT) on the selected heads") -> go.Figure:
    """Per selected head (flagged on most prompts): cosine with ABFT of the whole E2E gradient and
    of its label path, on the head's W_Q rows and its KV group's W_K rows."""
    chosen = heads[heads["selected"]] if heads["selected"].any() else heads.nlargest(10, "pass_rate")
    labels = [f"L{layer}H{head}" for layer, head in zip(chosen["layer"], chosen["head"], strict=True)]
    figure = go.Figure()
    for column, name, colour in (("cos_full_abft_q", "W_Q, whole", COLOURS["full"]),
                                 ("cos_label_abft_q", "W_Q, label path", COLOURS["label"]),
                                 ("cos_full_abft_k", "W_K (KV group), whole", "#72B7B2"),
                                 ("cos_label_abft_k", "W_K (KV group), label path", "#FF9DA6")):
        figure.add_trace(go.Bar(x=labels, y=chosen[column], name=name, marker_color=colour,
                                customdata=np.stack([chosen["pass_rate"], chosen["label_mass"]], axis=-1),
                                hovertemplate="%{x}: cos %{y:.3f}<br>pass rate %{customdata[0]:.2f}, "
                                              "label mass %{customdata[1]:.2f}<extra>" + name + "</extra>"))
    figure.update_layout(barmode="group", template="plotly_white", title=title, yaxis_range=[-1, 1],
                         yaxis_title="cosine", width=max(700, 60 * len(labels)), height=420)
    return figure


def sign_test_figure(sign: pd.DataFrame, title: str = "Does a descent step raise correct and lower wrong label "
                                                      "attention? (induction heads)") -> go.Figure:
    """Fraction of (prompt, head) pairs per criterion and direction, with bootstrap-over-prompts
    intervals; 0.5 is a coin flip."""
    figure = go.Figure()
    names = {"e2e": "E2E, per-prompt step", "e2e_mean": "E2E, mean-gradient step", "abft": "ABFT (reference)"}
    colours = {"e2e": COLOURS["e2e"], "e2e_mean": "#72B7B2", "abft": COLOURS["abft"]}
    for direction, group in sign.groupby("direction", sort=False):
        figure.add_trace(go.Bar(
            x=group["criterion"], y=group["fraction"], name=names.get(direction, direction),
            marker_color=colours.get(direction),
            error_y={"type": "data", "symmetric": False, "array": group["bootstrap_high"] - group["fraction"],
                     "arrayminus": group["fraction"] - group["bootstrap_low"]},
            customdata=np.stack([group["successes"], group["pairs"], group["wilson_low"], group["wilson_high"]], -1),
            hovertemplate="%{x}: %{y:.3f} (%{customdata[0]}/%{customdata[1]})<br>Wilson "
                          "[%{customdata[2]:.3f}, %{customdata[3]:.3f}]<extra></extra>"))
    figure.add_hline(y=0.5, line_dash="dot", line_color="grey")
    figure.update_layout(barmode="group", template="plotly_white", title=title, yaxis_range=[0, 1],
                         yaxis_title="fraction of (prompt, head) pairs", width=800, height=420)
    return figure


def dynamics_figure(metrics: pd.DataFrame, title: str = "Induction heads' label attention during training"
                    ) -> go.Figure:
    """Correct (solid) and wrong (dashed) label mass of the flagged heads per step, one colour per
    method; ``metrics`` has columns method, step, correct_mass, wrong_mass."""
    figure = go.Figure()
    for index, (method, group) in enumerate(metrics.groupby("method", sort=False)):
        colour = COLOURS.get(method, PALETTE[index % len(PALETTE)])
        for column, dash, what in (("correct_mass", "solid", "correct labels"), ("wrong_mass", "dash", "wrong labels")):
            figure.add_trace(go.Scatter(x=group["step"], y=group[column], mode="lines+markers", name=f"{method}: {what}",
                                        line={"color": colour, "dash": dash}))
    figure.update_layout(template="plotly_white", title=title, xaxis_title="optimiser step (metrics of the step's batch)",
                         yaxis_title="mean label mass of flagged heads", width=800, height=450)
    return figure


def landscape_figure(grid: pd.DataFrame, marks: dict[str, tuple[float, float]] | None = None,
                     title: str = "Accuracy on the weight plane") -> go.Figure:
    """Contour of accuracy over (l_E, l_A); ``marks`` names points (base, ABFT, E2E, best mix)."""
    table = grid.pivot(index="l_abft", columns="l_e2e", values="accuracy").sort_index()
    figure = go.Figure(go.Contour(
        x=table.columns.to_numpy(), y=table.index.to_numpy(), z=table.to_numpy(), colorscale="Viridis",
        contours={"showlabels": True, "labelfont": {"color": "white"}}, colorbar={"title": "accuracy"},
        hovertemplate="l_E %{x:.2f}, l_A %{y:.2f}<br>accuracy %{z:.3f}<extra></extra>"))
    symbols = {"base": "circle", "ABFT": "square", "E2E": "diamond", "best mix": "star"}
    names_at: dict[tuple[float, float], list[str]] = {}
    for name, point in (marks or {}).items():  # one label per point: "E2E = best mix" where they coincide
        names_at.setdefault(point, []).append(name)
    for (l_e2e, l_abft), names in names_at.items():
        figure.add_trace(go.Scatter(x=[l_e2e], y=[l_abft], mode="markers+text", text=[" = ".join(names)],
                                    textposition="top center", name=" = ".join(names), showlegend=False,
                                    marker={"size": 13, "color": "white", "symbol": symbols.get(names[0], "x"),
                                            "line": {"color": "black", "width": 1.5}},
                                    textfont={"color": "white"}))
    figure.update_layout(template="plotly_white", title=title, width=700, height=620,
                         xaxis_title="l_E (towards the E2E weights)", yaxis_title="l_A (towards the ABFT weights)")
    return figure
