"""`abft-lens figures`: redraw the paper's figures on our models from saved folders.

It reads what earlier jobs wrote under the given roots (default ``runs/``, ``benchmarks/results/`` and
``analysis/results/``) and writes each figure as offline HTML and, where kaleido and a browser are
present, PNG:

- ``heads_<name>_<value>``: layer x head heatmaps of every find-heads table (``heads.csv`` of a run
  folder, or ``find_heads_*.csv``);
- ``accuracy_<name>``: accuracy per data set and method from a benchmark's ``results.csv``
  (``benchmarks/bench_paper_claim.py``), with the paper's own GPT2-XL numbers (Table 1, method.md
  section 8) drawn beside ours and labelled as quoted, and ``macro_f1_<name>``, the same for macro-F1
  (which the paper does not quote); the mean over seeds with their std as error bars;
- ``robustness_<name>``: prediction consistency, unseen-label and 0-shot accuracy from the same table,
  and ``ood_<name>``: out-of-domain harm from the benchmark's ``ood.csv`` beside it;
- ``cost_<name>``: accuracy and macro-F1 of each fine-tuning method (full-rank and LoRA) beside its
  Param.*, seconds per step and peak memory (the paper's Table 2), where two or more methods recorded them;
- ``table2_cost_<root>``: Param.*, step time and activation memory per method and model from every
  ``benchmarks/bench_cost.py`` folder under a root;
- ``icl_tests_<name>``: flipped-label and symbol-label accuracy and the memorised share (issue 15) from
  the same table, where its runs measured them;
- ``training_<name>``: correct and wrong label mass of the induction heads per step of every
  fine-tuning run folder (``metrics.jsonl``);
- from the ablation benchmark's ``results.csv`` (``benchmarks/bench_ablations.py``; a table with a
  ``setting`` column) instead of the above: ``table4_<name>``, ``fig5_<name>``, ``fig6_<dataset>_<name>``,
  ``fig2_<name>``, ``remedies_<name>`` and ``lr_choice_<name>`` (``abft_lens.ablation_figures``).

Other packages add figures without ``abft_lens`` importing them: a command plugin (entry-point
group ``abft_lens.commands``) calls ``register_figure_source(fn)`` from its ``register(app)``; ``fn(roots,
out, png)`` draws what it finds under ``roots`` into ``out`` and returns the files written.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from abft_lens.ablation_figures import ablation_figures, read_ablation_tables
from abft_lens.figure_sources import _SOURCES, FigureSource, figure_sources, register_figure_source  # noqa: F401
from abft_lens.paper_numbers import PAPER_DATASET_ORDER, PAPER_GPT2_XL
from abft_lens.benchmarking import binomial_standard_error, collapsed_runs
from abft_lens.plots import (
    METHOD_COLOURS,
    error_bars,
    figure_file,
    head_heatmap,
    method_comparison,
    plotted_metrics,
    save_figure,
)
from abft_lens.runs import METRICS_FILE, read_json_object, read_metrics


# Run folders, and the results committed with the repository (benchmarks, analysis).
DEFAULT_ROOTS = (Path("runs"), Path("benchmarks/results"), Path("analysis/results"))

SCORE_COLUMNS = ("layer", "head", "label_mass", "correctness", "pass_rate", "n_prompts")
ROBUSTNESS_METRICS = ("consistency", "unseen_label_accuracy", "zero_shot_accuracy")
# Issue 15: following the prompt's mapping (flipped words, neutral symbols) against the memorised one.
ICL_TEST_METRICS = ("accuracy", "flipped_accuracy", "flipped_memorised_share", "symbols_accuracy")
# Issue 14: what each fine-tuning method cost, beside what it gained (the paper's Table 2).
TRAINED_METHODS = ("abft", "e2e", "abft-lora", "e2e-lora")
COST_METRICS = ("accuracy", "macro_f1", "full_precision_params", "seconds_per_step", "peak_memory_mb")


def paper_table() -> pd.DataFrame:
    """The quoted GPT2-XL accuracies as fractions, one row per (dataset, method)."""
    return pd.DataFrame([{"dataset": d, "method": m, "accuracy": v / 100} for m, row in PAPER_GPT2_XL.items()
                         for d, v in row.items()])


def accuracy_with_paper(results: pd.DataFrame, title: str = "Accuracy per data set",
                        metric: str = "accuracy") -> go.Figure:
    """Grouped bars: our methods (solid, mean over seeds with the seed std as error bar, or for one seed
    the accuracy's binomial standard error where ``n_inputs`` is known; a bar whose
    runs collapsed onto one label is marked "collapsed") and, for accuracy, the paper's GPT2-XL numbers
    (hatched, "GPT2-XL, quoted from the paper") for the same data sets."""
    results = results.assign(collapsed=collapsed_runs(results), seed=results["seed"] if "seed" in results else 0)
    results = results.assign(n_inputs=results["n_inputs"] if "n_inputs" in results else float("nan"))
    ours = results.groupby(["dataset", "method"], sort=False).agg(
        mean=(metric, "mean"), std=(metric, "std"), seeds=("seed", "nunique"), collapsed=("collapsed", "sum"),
        n_inputs=("n_inputs", "mean"),
    ).reset_index()
    if metric == "accuracy":  # one seed: the binomial standard error of the accuracy instead of a seed std
        binomial = binomial_standard_error(ours["mean"], ours["n_inputs"])
        ours["std"] = ours["std"].where(ours["seeds"] > 1, binomial)
    if ours["std"].notna().any():
        one_seed = ("for one seed the binomial standard error (a lower bound: queries repeat)" if metric == "accuracy"
                    else "none for one seed")
        title += f"<br><sup>error bars: std over seeds; {one_seed}</sup>"
    datasets = [d for d in PAPER_DATASET_ORDER if d in set(ours["dataset"])]
    datasets += [d for d in dict.fromkeys(ours["dataset"]) if d not in datasets]
    figure = go.Figure()
    methods = [m for m in METHOD_COLOURS if m in set(ours["method"])]
    methods += [m for m in dict.fromkeys(ours["method"]) if m not in methods]
    for method in methods:
        part = ours[ours["method"] == method].set_index("dataset").reindex(datasets)
        marks = ["collapsed" if count and count > 0 else "" for count in part["collapsed"].fillna(0)]
        figure.add_trace(go.Bar(x=datasets, y=part["mean"], name=f"{method} (ours)",
                                marker_color=METHOD_COLOURS.get(method), text=marks, textposition="outside",
                                # Upright, plotly shrinks an outside label to the bar's width: unreadable.
                                textangle=-90, constraintext="none", cliponaxis=False,
                                textfont={"size": 10}, customdata=part["seeds"],
                                hovertemplate="%{x}: %{y:.3f} (%{customdata} seeds) %{text}",
                                error_y=error_bars(part["std"])))
    if metric != "accuracy":  # the paper quotes accuracy only
        figure.update_layout(barmode="group", template="plotly_white", title=title, yaxis_title=metric,
                             yaxis_range=[0, 1], width=max(700, 110 * len(datasets) + 300), height=480)
        return figure
    paper = paper_table()
    for method in PAPER_GPT2_XL:
        part = paper[paper["method"] == method].set_index("dataset").reindex(datasets)
        colour = METHOD_COLOURS[method]
        name = f"{method} (GPT2-XL, quoted from the paper)"
        figure.add_trace(go.Bar(x=datasets, y=part["accuracy"], name=name,
                                marker={"color": "white", "line": {"color": colour, "width": 2},
                                        "pattern": {"shape": "/", "fgcolor": colour}}))
    figure.update_layout(barmode="group", template="plotly_white", title=title, yaxis_title="accuracy",
                         yaxis_range=[0, 1], width=max(700, 110 * len(datasets) + 300), height=480,
                         legend={"font": {"size": 10}})
    return figure


def training_figure(metrics: pd.DataFrame, title: str) -> go.Figure:
    figure = go.Figure()
    for column, dash, what in (("correct_mass", "solid", "correct labels"),
                               ("wrong_mass", "dash", "wrong labels")):
        figure.add_trace(go.Scatter(x=metrics["step"], y=metrics[column], mode="lines+markers", name=what,
                                    line={"dash": dash}))
    figure.update_layout(template="plotly_white", title=title, xaxis_title="optimiser step",
                         yaxis_title="mean label mass of flagged heads", width=700, height=420)
    return figure


@dataclass
class FiguresReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what was found but could not be drawn, and why


def figure_name(path: Path, root: Path) -> str:
    """A file-name-safe name for a saved folder or table: its path below ``root``, a table's without its
    suffix. A folder's name is kept whole: ``sst2_lr=0.001_seed42`` and ``sst2_lr=0.01_seed42`` must not both
    become ``sst2_lr=0``."""
    relative = path.relative_to(root) if path.is_relative_to(root) else path
    parts = list(relative.parts)
    if parts and path.is_file():
        parts[-1] = Path(parts[-1]).stem
    parts = [p for p in parts if p not in ("heads", "results")]
    return "_".join(parts or [path.resolve().name]).replace(" ", "-")


def _save(report: FiguresReport, figure: go.Figure, target: Path, png: bool) -> None:
    try:
        report.written += save_figure(figure, target, png=png)
    except RuntimeError as error:  # PNG export unavailable: the HTML was written
        report.written.append(figure_file(target, ".html"))
        report.skipped.append(str(error))


@contextmanager
def png_session(png: bool = True) -> Iterator[None]:
    """Keep one browser open for every PNG written inside the block (kaleido's sync server): about 3x
    faster than a browser per figure. Without kaleido or a browser it does nothing, and each
    ``save_figure`` reports the problem itself."""
    started = False
    if png:
        try:
            import kaleido

            kaleido.start_sync_server(silence_warnings=True)
            started = True
        except Exception:
            started = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            yield
    finally:
        if started:
            _stop_png_server(kaleido)


PNG_SERVER_CLOSE_SECONDS = 60.0


def _stop_png_server(kaleido, timeout_s: float = PNG_SERVER_CLOSE_SECONDS) -> None:
    """Close kaleido's sync server, waiting at most ``timeout_s``. ``stop_sync_server`` joins the server's
    thread, which closes the browser; once (2026-12-06, the CPU busy with training) that join never
    returned after every figure had been written, and ``abft-lens figures`` hung. After the wait the server
    is marked closed, so that kaleido's own close at exit does not wait for it again; its thread is a
    daemon and ends with the process."""
    stopper = threading.Thread(target=kaleido.stop_sync_server, kwargs={"silence_warnings": True},
                               daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    if stopper.is_alive():
        print(f"note: the PNG export's browser did not close within {timeout_s:g} s; left to close at exit",
              file=sys.stderr)
        from kaleido._sync_server import GlobalKaleidoServer  # the singleton behind stop_sync_server

        GlobalKaleidoServer()._initialized = False


def _robustness_figures(report: FiguresReport, results: pd.DataFrame, ood_path: Path, name: str, out: Path,
                        png: bool) -> None:
    """``robustness_<name>``: consistency, unseen-label and 0-shot accuracy per data set and method (the
    calibration rows reuse the vanilla forwards, so they are left out); ``ood_<name>``: out-of-domain harm
    per training data set, from the benchmark's ``ood.csv`` beside its results."""
    from abft_lens.evaluation import out_of_domain_harm  # torch-heavy: imported only when drawing

    measured = in_paper_order(results[results["method"] != "calibration"], "dataset")
    shown = tuple(m for m in ROBUSTNESS_METRICS if m in measured and measured[m].notna().any())
    if shown:
        # Unseen-label accuracy is a share of the scored inputs; consistency is not, and the 0-shot test asks
        # each query once, so n_inputs is not its count.
        _save(report, method_comparison(measured, shown, title=f"Robustness and label bias: {name}",
                                        colours=METHOD_COLOURS, binomial=("unseen_label_accuracy",)),
              out / f"robustness_{name}", png)
    if ood_path.is_file():
        harm = in_paper_order(out_of_domain_harm(pd.read_csv(ood_path)).dropna(subset=["harm"]), "trained_on")
        if len(harm):
            title = f"Out-of-domain harm: {name}<br><sup>vanilla minus fine-tuned accuracy on the other data sets, " \
                    f"by training data set (mean, std over them)</sup>"
            _save(report, method_comparison(harm, ("harm",), group="trained_on", title=title, colours=METHOD_COLOURS),
                  out / f"ood_{name}", png)


def _icl_test_figure(report: FiguresReport, results: pd.DataFrame, name: str, out: Path, png: bool) -> None:
    """``icl_tests_<name>``: per data set and method, the ordinary accuracy beside the accuracy with the
    label words flipped by a derangement and replaced by symbols (scored against the prompt's mapping),
    and the share of flipped answers that keep the words' usual meaning; only the runs that ran them."""
    if "flipped_accuracy" not in results or results["flipped_accuracy"].isna().all():
        return
    # Calibration rows of older tables carried vanilla's tests (the same forwards): left out.
    tested = in_paper_order(results[results["flipped_accuracy"].notna() & (results["method"] != "calibration")],
                            "dataset")
    title = (f"In-context learning that memorising cannot pass: {name}<br><sup>flipped: label words permuted "
             "(demonstrations and answer key); symbols: neutral one-token labels;<br>memorised share: flipped "
             "answers that give the usual meaning; dashed: chance (1 / number of labels);<br>error bars: std over "
             "seeds, or for one seed the binomial standard error (a lower bound: queries repeat)</sup>")
    figure = method_comparison(tested, ICL_TEST_METRICS, title=title, colours=METHOD_COLOURS,
                               binomial=ICL_TEST_METRICS)
    if "label_words" in tested:
        _draw_chance(figure, tested, plotted_metrics(tested, ICL_TEST_METRICS))
    _save(report, figure, out / f"icl_tests_{name}", png)


def _draw_chance(figure: go.Figure, results: pd.DataFrame, panels: list[str]) -> None:
    """A dashed line at chance, 1 / the number of label words, across each data set's group of bars in
    every accuracy panel (``panels``: the figure's metrics, top to bottom)."""
    labels = results.groupby("dataset", sort=False)["label_words"].first().str.split(",").str.len()
    for row, metric in enumerate(panels, start=1):
        if not metric.endswith("accuracy"):
            continue
        for position, count in enumerate(labels):
            if pd.isna(count):  # label words not recorded: no line
                continue
            figure.add_shape(type="line", x0=position - 0.45, x1=position + 0.45, y0=1 / count, y1=1 / count,
                             line={"dash": "dash", "color": "black", "width": 1}, row=row, col=1)


def _cost_figure(report: FiguresReport, results: pd.DataFrame, name: str, out: Path, png: bool) -> None:
    """``cost_<name>``, the paper's Table 2 on our model: per data set and fine-tuning method (full-rank and
    LoRA ABFT and E2E), accuracy and macro-F1 beside what the training cost: the parameters held in full
    precision with gradients (the paper's Param.*; E2E's include the LM head), seconds per optimiser step and
    peak memory. Drawn where at least two methods recorded their cost."""
    if "full_precision_params" not in results:
        return
    trained = results[results["full_precision_params"].notna() & results["method"].isin(TRAINED_METHODS)]
    # Times and memory compare only on one device: a table whose pieces ran on a GPU and on a CPU shows the
    # device most of them ran on.
    device = trained["device"].fillna("unknown").mode() if "device" in trained else pd.Series(dtype=str)
    if len(device):
        trained = trained[trained["device"].fillna("unknown") == device.iloc[0]]
    if trained["method"].nunique() < 2:
        return
    on = f" on {device.iloc[0]}" if len(device) else ""
    title = (f"Accuracy against training cost (the paper's Table 2): {name}<br><sup>Param.*: parameters in full "
             f"precision with gradients;<br>time per optimiser step and peak memory{on} (mean, std over seeds)</sup>")
    _save(report, method_comparison(in_paper_order(trained), COST_METRICS, title=title, colours=METHOD_COLOURS,
                                    binomial=("accuracy",)), out / f"cost_{name}", png)


def method_cost_figure(root: Path) -> go.Figure | None:
    """``table2_cost``, from every ``benchmarks/bench_cost.py`` folder under ``root`` (``cost.csv`` beside a
    ``summary.json`` naming the model): per model, each method's Param.* (log scale), seconds per optimiser
    step (mean and std over the measured rounds; the warm-up round left out) and activation memory of one
    micro-batch. None where no such folder is found."""
    frames = []
    for path in sorted(root.rglob("cost.csv")):
        rounds = pd.read_csv(path)
        if not {"round", "method", "seconds_per_step", "full_precision_params"} <= set(rounds.columns):
            continue
        model = read_json_object(path.parent / "summary.json").get("model", path.parent.name)
        once = rounds.loc[rounds["round"] == 0, ["method", "full_precision_params", "saved_activation_mb"]]
        timed = rounds.loc[rounds["round"] > 0, ["method", "seconds_per_step"]]
        frames.append(timed.merge(once, on="method").assign(model=model))
    if not frames:
        return None
    title = ("What each fine-tuning method costs (the paper's Table 2 columns)<br><sup>Param.*: parameters in full "
             "precision with gradients (E2E's include the LM head);<br>seconds of one optimiser step of 32 prompts; "
             "activation memory of one micro-batch of 8</sup>")
    metrics = ("full_precision_params", "seconds_per_step", "saved_activation_mb")
    figure = method_comparison(pd.concat(frames), metrics, group="model", title=title, colours=METHOD_COLOURS)
    figure.update_yaxes(type="log", row=1, col=1)
    return figure


def in_paper_order(table: pd.DataFrame, dataset_column: str = "dataset") -> pd.DataFrame:
    """Rows sorted by data set in the paper's order and by method (vanilla, calibration, abft, e2e), others
    after them in their own order, so that every figure lists both the same way."""
    dataset_rank = table[dataset_column].map({d: i for i, d in enumerate(PAPER_DATASET_ORDER)})
    method_rank = table["method"].map({m: i for i, m in enumerate(METHOD_COLOURS)})
    ranks = pd.DataFrame({"dataset": dataset_rank.fillna(len(PAPER_DATASET_ORDER)),
                          "method": method_rank.fillna(len(METHOD_COLOURS))}, index=table.index)
    return table.loc[ranks.sort_values(["dataset", "method"], kind="stable").index]


def make_figures(roots: Sequence[Path] = DEFAULT_ROOTS, out: Path = Path("figures"),
                 png: bool = True) -> FiguresReport:
    """Draw every figure the saved folders under ``roots`` allow (see the module doc) into ``out``."""
    with png_session(png):
        return _make_figures(roots, out, png)


def _make_figures(roots: Sequence[Path], out: Path, png: bool) -> FiguresReport:
    out.mkdir(parents=True, exist_ok=True)
    report = FiguresReport()
    for root in [Path(r) for r in roots if Path(r).exists()]:
        tables = sorted(set(root.rglob("heads.csv")) | set(root.rglob("find_heads_*.csv")))
        for path in tables:
            table = pd.read_csv(path)
            # Only find-heads score tables (every head once); a fine-tuning run's fixed head set and
            # the gradient analysis' heads.csv are other tables under the same name.
            if not set(SCORE_COLUMNS) <= set(table.columns) or len(table) < 2 \
                    or len(table) != table["layer"].nunique() * table["head"].nunique() \
                    or table.duplicated(["layer", "head"]).any():
                continue
            name = figure_name(path.parent if path.name == "heads.csv" else path, root)
            for value in ("label_mass", "correctness"):
                _save(report, head_heatmap(table, value, title=f"{value.replace('_', ' ')} per head: {name}"),
                      out / f"heads_{name}_{value}", png)
        for path in sorted(root.rglob("results.csv")):
            results = pd.read_csv(path)
            if not {"dataset", "method", "accuracy"} <= set(results.columns):
                continue
            name = figure_name(path.parent, root)
            if "setting" in results.columns:  # the ablation benchmark's: its own figures
                for stem, figure in ablation_figures(results, *read_ablation_tables(path.parent), name=name).items():
                    _save(report, figure, out / f"{stem}_{name}", png)
                continue
            if "run_dir" in results:
                # Completed from its run folders where older than its collapse and count columns, and its
                # collapse flags derived again by the current rule.
                from abft_lens.evaluation.records import with_prediction_columns  # imports torch: only here

                results = with_prediction_columns(results, base=path.parent)
            _save(report, accuracy_with_paper(results, title=f"Accuracy per data set: {name} (k = 4)"),
                  out / f"accuracy_{name}", png)
            if "macro_f1" in results and results["macro_f1"].notna().any():  # issue 13: beside accuracy
                _save(report, accuracy_with_paper(results, title=f"Macro-F1 per data set: {name} (k = 4)",
                                                  metric="macro_f1"), out / f"macro_f1_{name}", png)
            _robustness_figures(report, results, path.parent / "ood.csv", name, out, png)
            _icl_test_figure(report, results, name, out, png)
            _cost_figure(report, results, name, out, png)
        cost = method_cost_figure(root)
        if cost is not None:
            _save(report, cost, out / f"table2_cost_{figure_name(root, root)}", png)
        for path in sorted(root.rglob(METRICS_FILE)):
            metrics = pd.DataFrame(read_metrics(path))
            if metrics.empty or not {"step", "correct_mass", "wrong_mass"} <= set(metrics.columns):
                continue
            name = figure_name(path.parent, root)
            _save(report, training_figure(metrics, f"Induction heads' label mass during training: {name}"),
                  out / f"training_{name}", png)
    for name, source in figure_sources():
        try:
            report.written += source(list(roots), out, png)
        except Exception as error:  # one plugin's failure must not lose the other figures
            report.skipped.append(f"{name}: {type(error).__name__}: {error}")
    return report
