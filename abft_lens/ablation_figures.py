"""Figures of the ablation benchmark (benchmarks/bench_ablations.py; settings in ``abft_lens.ablations``),
drawn by `abft-lens figures` from the benchmark's folder: ``results.csv`` (one row per data set, setting and
seed), ``steps.csv`` (each run's per-step metrics) and ``validation.csv`` (validation accuracy at the kept
checkpoints of the lr runs). Each title names the paper's table or figure it redraws. The paper's own
numbers for these experiments are not in method.md, so none is drawn, except Table 1's GPT2-XL accuracy
(n_d = 512) beside Fig. 2, labelled as quoted."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from abft_lens.ablations import REMEDIES, TABLE4, is_lr_setting, is_size_setting, is_weight_setting
from abft_lens.benchmarking import collapsed_runs, seed_table
from abft_lens.choices import Method
from abft_lens.paper_numbers import PAPER_DATASET_ORDER, PAPER_GPT2_XL, PAPER_N_TRAIN
from abft_lens.plots import METHOD_COLOURS, PALETTE, error_bars, method_comparison
from abft_lens.runs import pid_input_counts

STEPS_FILE = "steps.csv"
VALIDATION_FILE = "validation.csv"


def read_ablation_tables(folder: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The benchmark folder's steps.csv and validation.csv, each None where it is missing or empty."""
    tables = []
    for path in (folder / STEPS_FILE, folder / VALIDATION_FILE):
        tables.append(pd.read_csv(path) if path.is_file() and path.stat().st_size else None)
    return tables[0], tables[1]


def in_dataset_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by data set in the paper's order (others after), stable."""
    rank = {name: index for index, name in enumerate(PAPER_DATASET_ORDER)}
    return frame.sort_values("dataset", key=lambda column: column.map(rank).fillna(len(rank)), kind="stable")


def compared_rows(results: pd.DataFrame, names) -> pd.DataFrame:
    """The rows of the settings ``names`` (the first is the reference, e.g. "paper") on the data sets where at
    least one of the others ran, in the order of ``names`` and the paper's data sets. The reference's pieces are
    shared with other experiments (the paper's ABFT runs on 8 data sets for the remedies, on 3 for Table 4): a
    mean over its 8 beside the ablations' 3 would compare different data sets."""
    order = {name: index for index, name in enumerate(names)}
    chosen = results[results["setting"].isin(order)]
    compared = chosen.loc[chosen["setting"] != names[0], "dataset"].unique()
    chosen = chosen[chosen["dataset"].isin(compared)]
    return in_dataset_order(chosen.sort_values("setting", key=lambda column: column.map(order), kind="stable"))


def settings_figure(results: pd.DataFrame, title: str) -> go.Figure:
    """Accuracy and macro-F1 per data set, one bar per setting (mean over seeds, their std as error bar; for
    one seed, accuracy's binomial standard error); a dagger over a bar where a seed collapsed onto one label,
    whose accuracy is then that label's share of the test set, not a win."""
    table = seed_table(results, by="setting")
    flagged = table[table["collapsed_seeds"] > 0]
    collapsed = set(zip(flagged["dataset"].astype(str), flagged["setting"], strict=True))
    if collapsed:
        title = f"{title}<br><sup>† a seed collapsed onto one label</sup>"
    figure = method_comparison(results, ("accuracy", "macro_f1"), method="setting", title=title, binomial=("accuracy",))
    for trace in figure.data:
        trace.text = ["†" if (dataset, trace.name) in collapsed else "" for dataset in trace.x]
        trace.textposition = "outside"
    return figure


def induction_heads_figure(steps: pd.DataFrame, title: str) -> go.Figure:
    """Per data set (columns): the mean induction heads per prompt, the PID's input (top), and the punishment
    weight A (bottom) per optimiser step, one line per setting, the mean over seeds (``runs.pid_input_counts``:
    steps logged before ``induction_heads`` existed give the flagged heads their PID counted)."""
    datasets = list(dict.fromkeys(in_dataset_order(steps)["dataset"]))
    settings = list(dict.fromkeys(steps["setting"]))
    figure = make_subplots(rows=2, cols=len(datasets), shared_xaxes=True, subplot_titles=datasets,
                           vertical_spacing=0.08, horizontal_spacing=0.06)
    steps = steps.assign(induction_heads=pid_input_counts(steps))
    mean = steps.groupby(["dataset", "setting", "step"], sort=False)[["induction_heads", "punish_weight"]].mean()
    for column, dataset in enumerate(datasets, start=1):
        for index, setting in enumerate(settings):
            if (dataset, setting) not in mean.droplevel("step").index:
                continue
            part = mean.loc[(dataset, setting)].reset_index()
            for row, value in ((1, "induction_heads"), (2, "punish_weight")):
                figure.add_trace(go.Scatter(x=part["step"], y=part[value], mode="lines+markers", name=setting,
                                            legendgroup=setting, showlegend=row == 1 and column == 1,
                                            line={"color": PALETTE[index % len(PALETTE)]}), row=row, col=column)
    figure.update_yaxes(title_text="induction heads per prompt", row=1, col=1)
    figure.update_yaxes(title_text="punishment weight A", row=2, col=1)
    figure.update_xaxes(title_text="optimiser step", row=2)
    figure.update_layout(template="plotly_white", title=title, width=max(700, 480 * len(datasets)), height=650)
    return figure


def initial_weights_figure(results: pd.DataFrame, title: str) -> go.Figure:
    """Accuracy (mean over seeds; the colour) over the initial punishment weight A0 and the reward weight B0,
    with PID (left) and without (right). Each cell's text gives macro-F1 beside accuracy, and a dagger where a
    seed collapsed onto one label: a high accuracy that is one label's share is no win."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("with PID", "without PID (A fixed at A0)"),
                           horizontal_spacing=0.12)
    results = results.assign(collapsed=collapsed_runs(results))
    for column, pid in enumerate((True, False), start=1):
        part = results[results["pid"].astype(bool) == pid]
        if part.empty:
            continue
        cells = part.groupby(["initial_punish_weight", "reward_weight"]).agg(
            accuracy=("accuracy", "mean"), macro_f1=("macro_f1", "mean"), collapsed=("collapsed", "any"))
        text = [f"{row.accuracy:.3f}{' †' if row.collapsed else ''}<br>F1 {row.macro_f1:.3f}"
                for row in cells.itertuples()]
        grid = cells["accuracy"].unstack().sort_index()
        labels = pd.Series(text, index=cells.index).unstack().reindex(index=grid.index, columns=grid.columns)
        figure.add_trace(go.Heatmap(z=grid.to_numpy(), x=[f"{b:g}" for b in grid.columns],
                                    y=[f"{a:g}" for a in grid.index], zmin=0, zmax=1, colorscale="Viridis",
                                    text=labels.fillna("").to_numpy(), texttemplate="%{text}",
                                    colorbar={"title": "accuracy"}, showscale=column == 2,
                                    hovertemplate="A0 %{y}, B0 %{x}: accuracy %{z:.3f}<extra></extra>"),
                         row=1, col=column)
        figure.update_xaxes(title_text="B0 (reward weight)", type="category", row=1, col=column)
        figure.update_yaxes(title_text="A0 (initial punishment weight)", type="category", row=1, col=column)
    figure.update_layout(template="plotly_white", title=title, width=900, height=460)
    return figure


def training_size_figure(results: pd.DataFrame, title: str) -> go.Figure:
    """Accuracy against the training prompts n_d per data set (columns): each fine-tuning method present, ABFT
    and the paper's E2E baseline (E2E-LoRA) by default (mean over seeds, their
    std as error bars, or for one seed the binomial standard error, a lower bound where queries repeat with
    other demonstrations; † over a point where a seed collapsed onto one label), vanilla ICL as a flat line,
    and the paper's GPT2-XL Table 1 accuracy at n_d = 512 (quoted) as open markers."""
    datasets = list(dict.fromkeys(in_dataset_order(results)["dataset"]))
    figure = make_subplots(rows=1, cols=len(datasets), subplot_titles=datasets, shared_yaxes=True)
    trained = results[results["method"] != "vanilla"]
    methods = [method for method in get_args(Method) if method in set(trained["method"])]
    sizes = sorted(trained["n_train"].dropna().unique()) or [PAPER_N_TRAIN]
    for column, dataset in enumerate(datasets, start=1):
        first = column == 1
        for method in methods:
            part = trained[(trained["dataset"] == dataset) & (trained["method"] == method)]
            if part.empty:
                continue
            stats = seed_table(part, by="n_train").set_index("n_train").sort_index()
            error = stats["accuracy_std"].where(stats["seeds"] > 1, stats["accuracy_se"])
            marks = ["†" if collapsed else "" for collapsed in stats["collapsed_seeds"] > 0]
            figure.add_trace(go.Scatter(x=stats.index, y=stats["accuracy_mean"], mode="lines+markers+text",
                                        text=marks, textposition="top center",
                                        name=f"{method} (ours)", legendgroup=method, showlegend=first,
                                        line={"color": METHOD_COLOURS[method]}, error_y=error_bars(error)),
                             row=1, col=column)
        vanilla = results[(results["dataset"] == dataset) & (results["method"] == "vanilla")]["accuracy"]
        if len(vanilla):
            figure.add_trace(go.Scatter(x=[min(sizes), max(sizes)], y=[vanilla.mean()] * 2, mode="lines",
                                        name="vanilla (ours)", legendgroup="vanilla", showlegend=first,
                                        line={"color": METHOD_COLOURS["vanilla"], "dash": "dash"}), row=1, col=column)
        for method in ("vanilla", "abft"):
            quoted = PAPER_GPT2_XL[method].get(dataset)
            if quoted is not None:
                figure.add_trace(go.Scatter(x=[PAPER_N_TRAIN], y=[quoted / 100], mode="markers",
                                            name=f"{method} (GPT2-XL, Table 1, quoted)", legendgroup=f"paper {method}",
                                            showlegend=first, marker={"symbol": "circle-open", "size": 11,
                                                                      "color": METHOD_COLOURS[method]}), row=1, col=column)
        figure.update_xaxes(title_text="training prompts n_d", type="log", tickvals=sizes,
                            ticktext=[f"{size:g}" for size in sizes], row=1, col=column)
    figure.update_yaxes(title_text="accuracy", range=[0, 1], row=1, col=1)
    figure.update_layout(template="plotly_white", title={"text": title, "y": 0.95, "yanchor": "top"},
                         width=max(700, 480 * len(datasets)), height=520, margin={"t": 150})
    return figure


def lr_choice_figure(validation: pd.DataFrame, results: pd.DataFrame, title: str) -> go.Figure:
    """Per data set (columns): validation accuracy at each kept step of each lr's full-length run (lines; step 8
    is the 8-step search's trial) and its test accuracy after the last step (open markers, right of it)."""
    datasets = list(dict.fromkeys(in_dataset_order(validation)["dataset"]))
    figure = make_subplots(rows=1, cols=len(datasets), subplot_titles=datasets, shared_yaxes=True)
    mean = validation.groupby(["dataset", "lr", "step"])["validation_accuracy"].mean()
    test = results.groupby(["dataset", "lr"])["accuracy"].mean()
    lrs = sorted(validation["lr"].unique())
    last = int(validation["step"].max())
    for column, dataset in enumerate(datasets, start=1):
        for index, lr in enumerate(lrs):
            if (dataset, lr) not in mean.droplevel("step").index:
                continue
            part, colour = mean.loc[(dataset, lr)], PALETTE[index % len(PALETTE)]
            figure.add_trace(go.Scatter(x=part.index, y=part.values, mode="lines+markers", name=f"lr {lr:g}: validation",
                                        legendgroup=f"{lr}", showlegend=column == 1, line={"color": colour}),
                             row=1, col=column)
            if (dataset, lr) in test.index:
                figure.add_trace(go.Scatter(x=[last + 1], y=[test.loc[(dataset, lr)]], mode="markers",
                                            name=f"lr {lr:g}: test (last step)", legendgroup=f"{lr}",
                                            showlegend=column == 1, marker={"symbol": "diamond-open", "size": 11,
                                                                            "color": colour}), row=1, col=column)
        figure.update_xaxes(title_text="optimiser step", row=1, col=column)
    figure.update_yaxes(title_text="accuracy", row=1, col=1)
    figure.update_layout(template="plotly_white", title=title, width=max(700, 420 * len(datasets)), height=450)
    return figure


def ablation_figures(results: pd.DataFrame, steps: pd.DataFrame | None = None,
                     validation: pd.DataFrame | None = None, name: str = "") -> dict[str, go.Figure]:
    """Every figure the benchmark's tables allow, by file stem: ``table4``, ``fig5``, ``fig6_<dataset>``,
    ``fig2``, ``remedies``, ``lr_choice``. ``name`` (the benchmark's folder) goes into the titles."""
    suffix = f": {name}" if name else ""
    figures: dict[str, go.Figure] = {}
    table4 = compared_rows(results, [s.name for s in TABLE4])
    if table4["setting"].nunique() > 1:
        figures["table4"] = settings_figure(table4, f"Table 4 (paper): ABFT ablations{suffix}<br><sup>full ABFT "
                                                    "(paper), no PID (A = 0.5 fixed), no head filter (all heads), "
                                                    "reward only (A = 0), punish only (B = 0)<br>the paper finds punish "
                                                    "only below vanilla ICL</sup>")
    if steps is not None and len(steps):
        ablated = compared_rows(steps, [s.name for s in TABLE4])
        if len(ablated):
            figures["fig5"] = induction_heads_figure(ablated, f"Fig. 5 (paper): induction heads per step under the "
                                                            f"Table 4 ablations{suffix}")
    weights = results[results["setting"].map(is_weight_setting) & results["method"].eq("abft")]
    for dataset, part in in_dataset_order(weights).groupby("dataset", sort=False):
        if part[["initial_punish_weight", "reward_weight"]].drop_duplicates().shape[0] > 1:
            figures[f"fig6_{dataset}"] = initial_weights_figure(
                part, f"Fig. 6 (paper): {dataset} accuracy over the initial weights (A0, B0){suffix}"
                         "<br><sup>colour and first line: accuracy (mean over seeds); F1: macro-F1; † collapsed "
                         "onto one label</sup>")
    sizes = results[results["setting"].map(is_size_setting)]
    if sizes["setting"].nunique() > 1:
        figures["fig2"] = training_size_figure(sizes, f"Fig. 2 (paper): accuracy against the training prompts "
                                                      f"n_d{suffix}<br><sup>e2e-lora: the paper's E2E baseline "
                                                      f"(LoRA r = 16 on q/k); e2e: full-rank W_Q/W_K<br>error "
                                                      f"bars: seed std, "
                                                      f"or for one seed the binomial standard error (a lower bound: "
                                                      f"queries repeat)<br>† a seed collapsed onto one label</sup>")
    remedies = compared_rows(results, [s.name for s in REMEDIES])
    if remedies["setting"].nunique() > 1:
        figures["remedies"] = settings_figure(remedies, f"Remedies for where ABFT stalls{suffix}<br><sup>issue "
                                                        f"18, not in the paper: each against the paper's "
                                                        f"ABFT</sup>")
    lr_runs = results[results["setting"].map(is_lr_setting)]
    # Every setting run with --keep-checkpoints writes validation rows; only the lr runs' choose an lr.
    validation = validation[validation["setting"].map(is_lr_setting)] if validation is not None else None
    if validation is not None and len(validation) and len(lr_runs):
        figures["lr_choice"] = lr_choice_figure(validation, lr_runs, f"Choosing the lr (issue 18): validation "
                                                                     f"accuracy per kept step, test at the end{suffix}")
    return figures
