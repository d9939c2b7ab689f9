"""``report.html``: one page per run folder that opens offline from a file, and an index over many.

A report is drawn from the files a job saved, never from a model: ``config.json`` (config and
versions), ``heads.csv`` (find-heads), ``metrics.jsonl`` (fine-tuning), ``metrics.json`` and
``predictions.csv`` (evaluation), ``results.csv`` (benchmarks) and ``attention_examples.json`` (the
attention views, written by ``write_attention_examples``: the only part that needs a model, so the
jobs write it while they have one and ``abft-lens report --attention`` recomputes it). plotly.js is
loaded once per report from ``plotly.min.js`` beside it (the file the folder's other figures share).

Sections (``<section id=...>``; only those the folder's files allow): ``config``, ``heads``,
``attention``, ``training``, ``metrics``, ``labels``, ``robustness``, ``evaluations``, ``results``.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from abft_lens.benchmarking import binomial_standard_error
from abft_lens.runs import atomic_write_text, pid_input_counts, read_json_object, read_metrics, write_json

REPORT_FILE = "report.html"
INDEX_FILE = "index.html"
EXAMPLES_FILE = "attention_examples.json"
PLOTLY_FILE = "plotly.min.js"
N_EXAMPLES = 3
N_HEADS = 8
# Fractions whose standard error is binomial, and the metrics.json field holding their number of inputs.
BINOMIAL = {"accuracy": "n_inputs", "calibrated_accuracy": "n_inputs", "random_demo_accuracy": "n_inputs",
            "unseen_label_accuracy": "n_inputs", "zero_shot_accuracy": "n_queries"}
SHOWN_METRICS = ("accuracy", "macro_f1", "calibrated_accuracy", "calibrated_macro_f1", "unseen_label_accuracy",
                 "random_demo_accuracy", "zero_shot_accuracy", "unseen_label_macro_f1", "zero_shot_macro_f1",
                 "consistency", "consistency_templates", "consistency_demos", "induction_heads_per_prompt",
                 "induction_correct_mass", "induction_wrong_mass", "collapsed_onto", "n_inputs", "n_queries",
                 "demo_sets", "k", "mean_prompt_tokens", "seconds")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px; color: #222; padding: 0 1em; }
nav a { margin-right: 1em; } section { margin: 2em 0; border-top: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
table.sortable th { cursor: pointer; } th[data-order=asc]::after { content: " ▲"; } th[data-order=desc]::after { content: " ▼"; }
.scroll { max-height: 420px; overflow: auto; display: inline-block; } .note { color: #666; font-size: 13px; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
"""
_SORT_JS = """
document.querySelectorAll("table.sortable th").forEach((th, i) => th.addEventListener("click", () => {
  const table = th.closest("table"), body = table.tBodies[0], asc = th.dataset.order !== "asc";
  table.querySelectorAll("th").forEach(h => delete h.dataset.order); th.dataset.order = asc ? "asc" : "desc";
  const key = r => { const t = r.cells[i].textContent.trim(), x = parseFloat(t); return isNaN(x) ? t : x; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); })
    .forEach(r => body.appendChild(r));
}));
"""


# --- reading a run folder ---------------------------------------------------------------------------


def read_record(run_dir: Path) -> dict[str, object]:
    return read_json_object(run_dir / "config.json")


def run_kind(run_dir: Path) -> str:
    """finetune, evaluate, find-heads, benchmark, or "" (not a run folder)."""
    if (run_dir / "metrics.jsonl").is_file() or (run_dir / "trained.safetensors").is_file():
        return "finetune"
    if (run_dir / "metrics.json").is_file():
        return "evaluate"
    if (run_dir / "heads.csv").is_file() and "config" in read_record(run_dir):
        return "find-heads"
    if (run_dir / "results.csv").is_file():
        return "benchmark"
    return ""


def read_metrics_lines(path: Path) -> pd.DataFrame:
    return pd.DataFrame(read_metrics(path))


def bootstrap_unit(predictions: pd.DataFrame | None) -> str | None:
    """What ``standard_errors`` resamples for the bootstrap: "queries" where ``predictions`` says which query
    each input belongs to, "inputs" where it does not, None where there are no answers to resample."""
    if predictions is None or not len(predictions) or not {"true_label", "predicted_label"} <= set(predictions.columns):
        return None
    return "queries" if "query" in predictions.columns else "inputs"


def standard_errors(metrics: Mapping[str, object], predictions: pd.DataFrame | None = None,
                    n_boot: int = 200) -> dict[str, float]:
    """Standard errors of the metrics. With predictions: a bootstrap of accuracy and macro-F1 over whole
    queries (each with all its demonstration sets, which are not independent) where the file gives the
    query, else of macro-F1 over the inputs (``bootstrap_unit``); macro-F1 over the evaluation's label space
    (the words of ``predicted_distribution``). The other accuracies: binomial over their inputs (lower bounds)."""
    errors = {}
    for name, count in BINOMIAL.items():
        value, n = metrics.get(name), metrics.get(count)
        if isinstance(value, (int, float)) and isinstance(n, (int, float)) and n > 0:
            errors[name] = binomial_standard_error(value, n)
    unit = bootstrap_unit(predictions)
    if unit is not None:
        # Imported here: a report of a run without predictions should not pay for torch and the evaluation package.
        import torch

        from abft_lens.evaluation.metrics import bootstrap_standard_errors, encode_labels

        words, (true, predicted) = encode_labels(metrics.get("predicted_distribution") or {},
                                                 predictions["true_label"], predictions["predicted_label"], strays=True)
        # Only which inputs share a query matters, so the query column is read as labels, whatever its type.
        groups = (torch.from_numpy(pd.factorize(predictions["query"])[0]) if unit == "queries"
                  else torch.arange(len(true)))
        bootstrapped = bootstrap_standard_errors(true, predicted, groups, len(words), n_boot=n_boot)
        errors["macro_f1"] = bootstrapped["macro_f1"]
        if unit == "queries":
            errors["accuracy"] = bootstrapped["accuracy"]
    return errors


def standard_errors_note(predictions: pd.DataFrame | None) -> str:
    """How ``standard_errors`` computed its errors for these predictions, in a sentence or two."""
    bootstrap = {"queries": "a bootstrap over whole queries for accuracy and macro-F1; ",
                 "inputs": "a bootstrap over the inputs for macro-F1; ",
                 None: ""}[bootstrap_unit(predictions)]
    return (f"Standard errors: {bootstrap}binomial over the inputs for the other accuracies. The demonstration "
            "sets of one query are not independent, so an error over inputs is a lower bound.")


# --- attention examples -----------------------------------------------------------------------------


def write_attention_examples(run_dir: Path, examples: Sequence) -> Path:
    path = Path(run_dir) / EXAMPLES_FILE
    write_json(path, {"examples": [example.to_dict() for example in examples]})
    return path


def read_attention_examples(run_dir: Path) -> list:
    from abft_lens.attention_view import AttentionExample

    path = Path(run_dir) / EXAMPLES_FILE
    if not path.is_file():
        return []
    return [AttentionExample.from_dict(item) for item in json.loads(path.read_text())["examples"]]


def example_prompts(model, dataset: str, label_words=None, pool_seed: int = 42, k: int = 4, seed: int = 42,
                    n: int = N_EXAMPLES):
    """Held-out prompts to look at: the first ``n`` test-pool queries, demonstrations from the demo pool
    (as `evaluate` builds them)."""
    from abft_lens.data import load_dataset, split_pools
    from abft_lens.prompts import build_prompts

    data = load_dataset(dataset, tuple(label_words) if label_words else None)
    pools = split_pools(data, seed=pool_seed)
    return build_prompts(model.tokenizer, data, pools.test, n_prompts=min(n, len(pools.test)), k=k, seed=seed,
                         demo_pool=pools.demo, max_length=model.cfg.n_ctx)


def capture_examples(models: Mapping[str, object], prompts, heads="top:8", threshold: str = "paper",
                     tau: float = 2.0) -> list:
    from abft_lens.attention_view import capture_example

    return [capture_example(models, prompts, heads, index, threshold, tau, title=f"held-out prompt {index}")
            for index in range(len(prompts))]


def models_of_run(run_dir: Path, device: str | None = None) -> dict[str, object]:
    """The models a run folder's attention views show: base and fine-tuned for a fine-tuning run (or an
    evaluation of one), else the one model."""
    from abft_lens.models import load_model

    record = read_record(run_dir).get("config", {})
    source = record.get("model_or_run", record.get("model"))
    if source is None:
        raise ValueError(f"{run_dir}/config.json names no model.")
    kind = run_kind(run_dir)
    trained_run = run_dir if kind == "finetune" else Path(str(source))
    if kind == "finetune" or (trained_run / "trained.safetensors").is_file():
        from abft_lens.training import load_trained_model

        base = read_record(trained_run).get("config", {}).get("model")
        return {"base": load_model(base, device=device), "fine-tuned": load_trained_model(trained_run, device=device)}
    return {"model": load_model(str(source), device=device)}


def compute_attention_examples(run_dir: Path, models: Mapping[str, object] | None = None,
                               device: str | None = None) -> Path:
    """Capture and save the attention views of a run folder (loads its models unless given)."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    config = record.get("config", {})
    models = models or models_of_run(run_dir, device)
    first = next(iter(models.values()))
    pool_seed = record.get("pools_seed", config.get("pool_seed", config.get("seed", 42)))
    prompts = example_prompts(first, config.get("dataset", "sst2"), config.get("label_words"), int(pool_seed),
                              int(config.get("k", 4)), int(config.get("seed", 42)))
    heads: object = f"top:{N_HEADS}"
    if run_kind(run_dir) == "find-heads":
        table = pd.read_csv(run_dir / "heads.csv")
        heads = [(int(l), int(h)) for l, h in zip(table["layer"].head(N_HEADS), table["head"].head(N_HEADS))]
    examples = capture_examples(models, prompts, heads, str(config.get("threshold", "paper")),
                                float(config.get("tau", 2.0)))
    return write_attention_examples(run_dir, examples)


# --- the page ---------------------------------------------------------------------------------------


class _Page:
    def __init__(self, title: str) -> None:
        self.title, self.sections, self.n_figures = title, [], 0

    def section(self, anchor: str, heading: str, body: str) -> None:
        self.sections.append((anchor, heading, body))

    def figure(self, figure: go.Figure) -> str:
        self.n_figures += 1
        return figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{self.n_figures}")

    def render(self, plotly_src: str | None) -> str:
        nav = " ".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h, _ in self.sections)
        body = "\n".join(f'<section id="{a}"><h2>{html.escape(h)}</h2>\n{b}\n</section>' for a, h, b in self.sections)
        script = f'<script src="{plotly_src}"></script>' if plotly_src and self.n_figures else ""
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"{script}<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1><nav>{nav}</nav>\n"
                f"{body}\n<script>{_SORT_JS}</script></body></html>\n")


def _table(frame: pd.DataFrame, sortable: bool = True, scroll: bool = False) -> str:
    table = frame.to_html(index=False, border=0, classes="sortable" if sortable else None, na_rep="-",
                          float_format=lambda x: f"{x:.4g}")
    return f'<div class="scroll">{table}</div>' if scroll else table


def _mapping_table(mapping: Mapping[str, object]) -> str:
    rows = [(key, json.dumps(value) if isinstance(value, (list, dict)) else value) for key, value in mapping.items()]
    return _table(pd.DataFrame(rows, columns=["field", "value"]).astype(str), sortable=False)


def training_curves(metrics: pd.DataFrame, title: str) -> go.Figure:
    """Loss, the PID-controlled punish weight A, induction heads per prompt (the PID's input,
    ``runs.pid_input_counts``), and the flagged heads' mass on correct and wrong labels, per optimiser step."""
    from plotly.subplots import make_subplots

    panels = [("loss", ("loss",)), ("A (punish weight)", ("punish_weight",)),
              ("induction heads per prompt", ("induction_heads",)),
              ("label mass of flagged heads", ("correct_mass", "wrong_mass"))]
    if "flagged_heads" in metrics:
        metrics = metrics.assign(induction_heads=pid_input_counts(metrics))
    figure = make_subplots(rows=2, cols=2, subplot_titles=[name for name, _ in panels], vertical_spacing=0.14)
    for i, (_, columns) in enumerate(panels):
        for column in columns:
            if column in metrics:
                figure.add_trace(go.Scatter(x=metrics["step"], y=metrics[column], mode="lines+markers",
                                            name=column, line={"dash": "dash" if column == "wrong_mass" else None}),
                                 row=i // 2 + 1, col=i % 2 + 1)
    figure.update_xaxes(title_text="optimiser step", row=2)
    figure.update_layout(template="plotly_white", title=title, width=1000, height=650)
    return figure


def label_distribution_figure(metrics: Mapping[str, object]) -> go.Figure:
    figure = go.Figure()
    for key, name in (("true_distribution", "true"), ("predicted_distribution", "predicted"),
                      ("calibrated_predicted_distribution", "predicted, calibrated")):
        if isinstance(metrics.get(key), dict):
            shares = metrics[key]
            figure.add_trace(go.Bar(x=list(shares), y=list(shares.values()), name=name,
                                    hovertemplate="%{x}: %{y:.3f}<extra>" + name + "</extra>"))
    figure.update_layout(barmode="group", template="plotly_white", title="Label distribution", yaxis_title="share",
                         yaxis_range=[0, 1], width=620, height=380)
    return figure


def robustness_figure(metrics: Mapping[str, object], errors: Mapping[str, float]) -> go.Figure | None:
    shown = [m for m in ("consistency", "consistency_templates", "consistency_demos", "random_demo_accuracy",
                         "unseen_label_accuracy", "zero_shot_accuracy", "calibrated_accuracy")
             if isinstance(metrics.get(m), (int, float))]
    if not shown:
        return None
    figure = go.Figure(go.Bar(x=[m.replace("_", " ") for m in shown], y=[metrics[m] for m in shown],
                              error_y={"type": "data", "array": [errors.get(m, 0) for m in shown]}))
    figure.update_layout(template="plotly_white", title="Calibration, consistency and unseen labels",
                         yaxis_range=[0, 1], width=720, height=400)
    return figure


def _attention_section(page: _Page, run_dir: Path) -> None:
    from abft_lens.attention_view import attention_figure

    examples = read_attention_examples(run_dir)
    if not examples:
        page.section("attention", "Attention views", f'<p class="note">No {EXAMPLES_FILE} in this folder; '
                     f"<code>abft-lens report {html.escape(str(run_dir))} --attention</code> computes the views "
                     "(it loads the model).</p>")
        return
    note = ('<p class="note">Tokens of held-out prompts coloured by the attention of the query\'s last token; '
            "boxes: demonstration labels (green: the query's label, red: another). The menu at the top right "
            "switches heads. S: label mass; a head above the threshold counts as an induction head.</p>")
    page.section("attention", "Attention views", note + "".join(page.figure(attention_figure(e)) for e in examples))


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from the folder's saved files (see the module doc); returns its path."""
    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    if not kind:
        from abft_lens.errors import ConfigError

        raise ConfigError(f"report: {run_dir} is not a run folder (no metrics.jsonl, metrics.json, heads.csv "
                          "with a config.json, or results.csv).")
    record = read_record(run_dir)
    config = record.get("config", {})
    what = config.get("model_or_run", config.get("model", ""))
    page = _Page(f"{kind}: {what} on {config.get('dataset', '')} ({run_dir.name})" if config else f"{kind}: {run_dir}")
    if config:
        extra = {k: v for k, v in record.items() if k not in ("config", "versions", "design_choices")}
        page.section("config", "Config and versions",
                     "<details><summary>config, package versions and the run record</summary>"
                     "<div class='figures'><div><h3>config</h3>" + _mapping_table(config) + "</div><div><h3>versions</h3>"
                     + _mapping_table(record.get("versions", {})) + "</div><div><h3>run record</h3>"
                     + _mapping_table(extra) + "</div></div></details>")
    if (run_dir / "heads.csv").is_file():
        table = pd.read_csv(run_dir / "heads.csv")
        body = _table(table, scroll=True)
        if kind == "find-heads" and {"layer", "head", "label_mass", "correctness"} <= set(table.columns):
            from abft_lens.plots import head_heatmap

            body += "<div class='figures'>" + "".join(page.figure(head_heatmap(table, value)) for value in
                                                      ("label_mass", "correctness")) + "</div>"
        page.section("heads", "Heads" if kind == "find-heads" else "Fixed head set", body)
    if kind in ("find-heads", "finetune", "evaluate"):
        _attention_section(page, run_dir)
    if kind == "finetune":
        metrics = read_metrics_lines(run_dir / "metrics.jsonl")
        body = page.figure(training_curves(metrics, "Training")) if not metrics.empty else "<p>No steps logged.</p>"
        search = record.get("lr_search")
        if isinstance(search, dict) and search.get("trials"):
            body += "<h3>lr search</h3>" + _table(pd.DataFrame(search["trials"]))
        page.section("training", "Training curves", body)
        evaluations = sorted(p.parent for p in run_dir.glob("*/metrics.json"))
        if evaluations:
            rows = []
            for folder in evaluations:
                build_report(folder)
                m = json.loads((folder / "metrics.json").read_text())
                rows.append(f"<tr><td><a href='{folder.name}/{REPORT_FILE}'>{html.escape(folder.name)}</a></td>"
                            f"<td>{m.get('accuracy', float('nan')):.3f}</td><td>{m.get('macro_f1', float('nan')):.3f}</td></tr>")
            page.section("evaluations", "Evaluations of this run", "<table><thead><tr><th>folder</th><th>accuracy</th>"
                         f"<th>macro-F1</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    if kind == "evaluate":
        metrics = json.loads((run_dir / "metrics.json").read_text())
        # Words as written: "true" stays a word and "None" or "nan" do not become missing values.
        predictions = (pd.read_csv(run_dir / "predictions.csv", dtype={"true_label": str, "predicted_label": str},
                                   keep_default_na=False)
                       if (run_dir / "predictions.csv").is_file() else None)
        errors = standard_errors(metrics, predictions)
        rows = [(name, metrics[name], errors.get(name)) for name in SHOWN_METRICS if name in metrics]
        note = f"<p class='note'>{html.escape(standard_errors_note(predictions))}</p>"
        page.section("metrics", "Metrics", _table(pd.DataFrame(rows, columns=["metric", "value", "standard error"])
                                                  .astype(object), sortable=False) + note)
        page.section("labels", "Predicted labels", page.figure(label_distribution_figure(metrics)))
        robust = robustness_figure(metrics, errors)
        if robust is not None:
            page.section("robustness", "Calibration and consistency", page.figure(robust))
    if kind == "benchmark":
        summary = read_json_object(run_dir / "summary.json")  # the benchmark's command, settings and versions
        if summary:
            headline = {k: v for k, v in summary.items() if k not in ("command", "settings", "versions")}
            page.section("config", "Command, settings and versions",
                         f"<p><code>{html.escape(str(summary.get('command', '')))}</code></p>"
                         "<details><summary>settings, package versions and the summary</summary>"
                         "<div class='figures'><div><h3>settings</h3>" + _mapping_table(summary.get("settings", {}))
                         + "</div><div><h3>versions</h3>" + _mapping_table(summary.get("versions", {}))
                         + "</div><div><h3>summary</h3>" + _mapping_table(headline) + "</div></div></details>")
        results = pd.read_csv(run_dir / "results.csv")
        body = _table(results, scroll=True)
        if {"dataset", "method", "accuracy"} <= set(results.columns):
            from abft_lens.figures import accuracy_with_paper

            body += page.figure(accuracy_with_paper(results))
        page.section("results", "Results", body)
    bundle = run_dir / PLOTLY_FILE
    if page.n_figures and not bundle.exists():
        atomic_write_text(bundle, get_plotlyjs())
    path = run_dir / REPORT_FILE
    atomic_write_text(path, page.render(PLOTLY_FILE))
    return path


def write_job_report(run_dir: Path, models: Mapping[str, object] | None = None, attention: bool = True,
                     device: str | None = None) -> Path | None:
    """What a job calls at its end: the attention views (with ``models``, or loading the run's), then the
    report. A failure here is reported on stderr and does not fail the job, whose results are written."""
    try:
        if attention:
            compute_attention_examples(run_dir, models, device)
        return build_report(run_dir)
    except Exception as error:  # the job's own results are safe; say why the page is missing
        print(f"warning: {Path(run_dir) / REPORT_FILE} not written: {type(error).__name__}: {error}", file=sys.stderr)
        return None


# --- the index ---------------------------------------------------------------------------------------


def run_folders(root: Path) -> list[Path]:
    found = {path.parent for name in ("config.json", "results.csv") for path in Path(root).rglob(name)}
    return sorted(folder for folder in found if run_kind(folder))


def _headline(folder: Path, kind: str) -> str:
    if kind == "evaluate":
        m = json.loads((folder / "metrics.json").read_text())
        return f"accuracy {m.get('accuracy', float('nan')):.3f}, macro-F1 {m.get('macro_f1', float('nan')):.3f}"
    if kind == "finetune":
        metrics = read_metrics_lines(folder / "metrics.jsonl")
        if metrics.empty or "loss" not in metrics:
            return "no steps"
        return f"{len(metrics)} steps, loss {metrics['loss'].iloc[0]:.3f} -> {metrics['loss'].iloc[-1]:.3f}"
    if kind == "find-heads":
        top = pd.read_csv(folder / "heads.csv").head(3)
        return "top heads " + ", ".join(f"L{l}H{h}" for l, h in zip(top["layer"], top["head"]))
    return f"{len(pd.read_csv(folder / 'results.csv'))} result rows"


def build_index(root: str | Path, rebuild: bool = False) -> Path:
    """``root/index.html``: every run folder under ``root``, with a link to its report (built from the
    saved files where it is missing, or for all with ``rebuild``)."""
    root = Path(root)
    rows = []
    for folder in run_folders(root):
        kind = run_kind(folder)
        if rebuild or not (folder / REPORT_FILE).is_file():
            build_report(folder)
        config = read_record(folder).get("config", {})
        relative = folder.relative_to(root).as_posix() or "."
        rows.append({"run": f"<a href='{html.escape(relative)}/{REPORT_FILE}'>{html.escape(relative)}</a>", "kind": kind,
                     "model": html.escape(str(config.get("model_or_run", config.get("model", "")))),
                     "dataset": html.escape(str(config.get("dataset", ""))),
                     "method": html.escape(str(config.get("method", ""))), "headline": _headline(folder, kind)})
    page = _Page(f"Runs under {root}")
    table = pd.DataFrame(rows, columns=["run", "kind", "model", "dataset", "method", "headline"])
    page.section("runs", f"{len(rows)} run folders", table.to_html(index=False, border=0, escape=False,
                                                                  classes="sortable"))
    path = root / INDEX_FILE
    atomic_write_text(path, page.render(None))
    return path
