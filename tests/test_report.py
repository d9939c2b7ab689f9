"""The attention view and the run reports: their numbers, the files they write, and what a real browser
shows (headless Chromium: no JavaScript errors, every section, one trace per head, the prompt's token
count, a menu that switches heads, a screenshot that is not blank). The tiny random GPT-2 does the
plumbing; the tests on the embedded model are marked slow."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from abft_lens.attention_view import (
    AttentionExample,
    attention_figure,
    capture_example,
    parse_heads,
    pattern_view,
)
from abft_lens.cli import main
from abft_lens.data import split_pools
from abft_lens.errors import HeadSelectionError
from abft_lens.forward import query_attention_rows
from abft_lens.prompts import build_prompts
from abft_lens.report import (
    EXAMPLES_FILE,
    build_index,
    build_report,
    capture_examples,
    standard_errors,
    standard_errors_note,
    write_attention_examples,
)

from browser import browser, png_colour_stats, probe, screenshot

needs_browser = pytest.mark.skipif(browser() is None, reason="no chromium/chrome on PATH (apt-get install chromium): "
                                                            "the browser tests need one")

# Reads the attention view's first plot, opens its menu, picks the second head, reads it again.
SWITCH_HEADS_JS = """
const gd = document.querySelector('.js-plotly-plot');
const read = () => ({title: gd.querySelector('.gtitle').textContent,
                     shown: gd.data.filter(t => t.type === 'heatmap' && t.visible).map(t => [t.meta.head, t.meta.model]),
                     z: gd.data.filter(t => t.type === 'heatmap' && t.visible)[0].z.flat().filter(v => v !== null)});
const heatmaps = gd.data.filter(t => t.type === 'heatmap');
const result = {n_plots: document.querySelectorAll('.js-plotly-plot').length,
                heads: [...new Set(heatmaps.map(t => t.meta.head))], n_heatmaps: heatmaps.length,
                n_tokens: heatmaps[0].meta.n_tokens,
                token_cells: [...[...gd.querySelectorAll('.hm')][0].querySelectorAll('text')].filter(t => t.textContent).length,
                before: read()};
const click = el => el.dispatchEvent(new MouseEvent('click', {bubbles: true}));
click(gd.querySelector('.updatemenu-header'));
await new Promise(r => setTimeout(r, 300));
const buttons = gd.querySelectorAll('.updatemenu-dropdown-button');
result.n_buttons = buttons.length;
click(buttons[1]);
await new Promise(r => setTimeout(r, 500));
result.after = read();
return result;
"""


def _example(models=("model",)) -> AttentionExample:
    rows = np.array([[0.5, 0.1, 0.2, 0.1, 0.1], [0.2, 0.3, 0.1, 0.3, 0.1]])
    return AttentionExample(tokens=["<s>", "a", " pos", "b", " neg"], label_positions=[2, 4], correct=[True, False],
                            demo_labels=["pos", "neg"], query_label="pos", threshold=0.25, threshold_kind="paper",
                            heads=[(1, 0), (0, 3)], rows={name: rows.copy() for name in models})


@pytest.fixture(scope="module")
def tiny_prompts(tiny_gpt2, sst2):
    pools = split_pools(sst2, seed=42)
    return build_prompts(tiny_gpt2.tokenizer, sst2, pools.test, n_prompts=3, k=2, seed=42, demo_pool=pools.demo)


# --- numbers ---------------------------------------------------------------------------------------


def test_head_specs_are_lists_or_top_n_and_bad_ones_are_errors():
    assert parse_heads("L20H5, l18h6") == [(20, 5), (18, 6)]
    assert parse_heads("top:8") == 8
    assert parse_heads([(1, 2)]) == [(1, 2)]
    for bad in ("L20", "top:0", "top:x", "L1H1,L1H1", ""):
        with pytest.raises(HeadSelectionError):
            parse_heads(bad)


def test_label_mass_is_the_attention_on_the_label_positions():
    example = _example()
    assert example.label_mass("model") == pytest.approx([0.2 + 0.1, 0.1 + 0.1])
    assert example.correct_mass("model") == pytest.approx([0.2, 0.1])
    assert example.wrong_mass("model") == pytest.approx([0.1, 0.1])


def test_example_round_trips_through_json():
    example = _example(("base", "fine-tuned"))
    again = AttentionExample.from_dict(json.loads(json.dumps(example.to_dict())))
    assert again.heads == example.heads and again.models == ["base", "fine-tuned"]
    assert np.allclose(again.rows["base"], example.rows["base"])


def test_figure_has_one_trace_and_one_menu_entry_per_head_with_s_and_threshold_in_the_title():
    figure = attention_figure(_example())
    heatmaps = [t for t in figure.data if t.type == "heatmap"]
    assert [t.meta["head"] for t in heatmaps] == ["L1H0", "L0H3"]
    assert [t.visible for t in heatmaps] == [True, False]
    assert [b.label for b in figure.layout.updatemenus[0].buttons] == ["L1H0", "L0H3"]
    assert "S = 0.300" in figure.layout.title.text and "threshold 0.250" in figure.layout.title.text
    assert "S = 0.200" in figure.layout.updatemenus[0].buttons[1].args[1]["title.text"]
    colours = {shape.line.color for shape in figure.layout.shapes}
    assert {"#1a9850", "#d73027"} <= colours  # correct and wrong labels boxed


def test_two_models_are_drawn_side_by_side_and_switched_together():
    figure = attention_figure(_example(("base", "fine-tuned")))
    heatmaps = [t for t in figure.data if t.type == "heatmap"]
    assert [(t.meta["head"], t.meta["model"]) for t in heatmaps][:2] == [("L1H0", "base"), ("L1H0", "fine-tuned")]
    visible = figure.layout.updatemenus[0].buttons[1].args[0]["visible"]
    assert visible[:4] == [False, False, True, True]


def test_captured_rows_are_the_query_rows_and_top_n_takes_the_largest_label_mass(tiny_gpt2, tiny_prompts):
    example = capture_example({"model": tiny_gpt2}, tiny_prompts, "top:3", index=1)
    batch = tiny_prompts.collate([1])
    with torch.inference_mode():
        rows = query_attention_rows(tiny_gpt2, batch, range(tiny_gpt2.cfg.n_layers))[0]
    mass = rows[:, :, list(tiny_prompts[1].label_positions)].sum(-1)
    assert sorted(mass.flatten().tolist(), reverse=True)[:3] == pytest.approx(example.label_mass("model").tolist(),
                                                                            abs=1e-5)
    layer, head = example.heads[0]
    assert example.rows["model"][0] == pytest.approx(rows[layer, head].numpy(), abs=1e-6)
    assert len(example.tokens) == len(tiny_prompts[1].tokens)
    assert example.rows["model"].sum(-1) == pytest.approx(np.ones(3), abs=1e-5)


def test_full_pattern_last_row_is_the_query_row(tiny_gpt2, tiny_prompts):
    figure = pattern_view(tiny_gpt2, tiny_prompts, "L1H2", index=0)
    example = capture_example({"model": tiny_gpt2}, tiny_prompts, "L1H2", index=0)
    pattern = np.asarray(figure.data[0].z)
    assert pattern.shape == (len(example.tokens), len(example.tokens))
    assert pattern[-1] == pytest.approx(example.rows["model"][0], abs=1e-6)
    assert np.triu(pattern, 1) == pytest.approx(0)  # causal


def test_standard_errors_are_binomial_for_accuracy_and_bootstrapped_for_macro_f1():
    predictions = pd.DataFrame({"true_label": ["a", "b"] * 50, "predicted_label": ["a"] * 70 + ["b"] * 30})
    errors = standard_errors({"accuracy": 0.6, "n_inputs": 100, "zero_shot_accuracy": 0.5, "n_queries": 25},
                             predictions)
    assert errors["accuracy"] == pytest.approx((0.6 * 0.4 / 100) ** 0.5)
    assert errors["zero_shot_accuracy"] == pytest.approx(0.1)
    assert 0.01 < errors["macro_f1"] < 0.1
    # Every prediction 'a' on a 50/50 set: macro-F1 = p / (1 + p) for the share p of true 'a', so its
    # standard error is binomial(p) / (1 + p)^2 = 0.05 / 2.25 = 0.022, not accuracy's 0.05.
    one_word = pd.DataFrame({"true_label": ["a", "b"] * 50, "predicted_label": ["a"] * 100})
    errors = standard_errors({"predicted_distribution": {"a": 1.0, "b": 0.0}}, one_word)
    assert errors["macro_f1"] == pytest.approx(0.05 / 2.25, rel=0.25)  # 200 resamples: about 5% noise
    # The label space is the evaluation's, not the words the file happens to show: a third label 'c' that
    # nobody predicted scores 0 and scales macro-F1 (and its error) by 2/3; counted over the shown words
    # the error would be 3/2 of that.
    errors = standard_errors({"predicted_distribution": {"a": 1.0, "b": 0.0, "c": 0.0}}, one_word)
    assert errors["macro_f1"] == pytest.approx(2 / 3 * 0.05 / 2.25, rel=0.25)
    # A word the distribution lacks (a hand-edited file, an older run) joins the label space, no KeyError.
    stray = one_word.assign(predicted_label=["a"] * 99 + ["c"])
    assert standard_errors({"predicted_distribution": {"a": 1.0, "b": 0.0}}, stray)["macro_f1"] == pytest.approx(
        2 / 3 * 0.05 / 2.25, rel=0.25)


def test_standard_errors_resample_whole_queries_when_the_predictions_give_them():
    # 100 queries, each shown with 2 demonstration sets and answered alike: the error is that of 100
    # inputs (0.05 at accuracy 0.5), not the binomial of 200 (0.035).
    answers = pd.DataFrame({"query": list(range(100)) * 2, "true_label": ["a", "b"] * 100,
                            "predicted_label": (["a"] * 60 + ["b"] * 40) * 2})
    metrics = {"accuracy": 0.5, "n_inputs": 200, "predicted_distribution": {"a": 0.6, "b": 0.4}}
    errors = standard_errors(metrics, answers, n_boot=1000)
    assert errors["accuracy"] == pytest.approx(0.05, rel=0.1)  # 1000 resamples: about 2% noise
    inputs = answers.drop(columns="query")
    alone = standard_errors(metrics, inputs, n_boot=1000)
    assert alone["accuracy"] == pytest.approx(0.5 / 200 ** 0.5)  # binomial over the 200 inputs
    assert errors["macro_f1"] / alone["macro_f1"] == pytest.approx(2 ** 0.5, rel=0.15)
    # Query ids are only group labels: any type (a hand-edited file's "q7") gives the same groups.
    named = answers.assign(query=[f"q{q}" for q in answers["query"]])
    assert standard_errors(metrics, named, n_boot=1000) == pytest.approx(errors)
    # The page says what was computed.
    assert "whole queries for accuracy and macro-F1" in standard_errors_note(answers)
    assert "over the inputs for macro-F1" in standard_errors_note(inputs)
    assert "bootstrap" not in standard_errors_note(None) and "bootstrap" not in standard_errors_note(answers[:0])


# --- run folders ------------------------------------------------------------------------------------


def _finetune_folder(root, examples):
    run = root / "finetune_run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"model": "tiny", "dataset": "sst2", "method": "abft"},
                                                 "versions": {"torch": torch.__version__}, "status": "finished",
                                                 "lr_search": {"trials": [{"lr": 1e-3, "validation_accuracy": 0.5}]}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(dict(step=s, loss=1 / s, punish_weight=0.5 + 0.1 * s,
                                                               flagged_heads=3.0, correct_mass=0.3 + 0.01 * s,
                                                               wrong_mass=0.2)) + "\n" for s in (1, 2, 3)))
    write_attention_examples(run, examples)
    evaluation = run / "evaluate_sst2"
    evaluation.mkdir()
    (evaluation / "config.json").write_text(json.dumps({"config": {"model_or_run": str(run), "dataset": "sst2"}}))
    (evaluation / "metrics.json").write_text(json.dumps({
        "accuracy": 0.75, "macro_f1": 0.74, "n_inputs": 8, "n_queries": 4, "demo_sets": 2, "k": 2,
        "predicted_distribution": {"negative": 0.4, "positive": 0.6}, "true_distribution": {"negative": 0.5, "positive": 0.5},
        "consistency": 0.9, "consistency_templates": 0.85, "consistency_demos": 0.95}))
    pd.DataFrame({"true_label": ["negative", "positive"] * 4, "predicted_label": ["positive"] * 5 + ["negative"] * 3}
                 ).to_csv(evaluation / "predictions.csv", index=False)
    return run


def test_report_loads_plotly_once_from_beside_it_and_rebuilds_from_saved_files(tmp_path):
    run = _finetune_folder(tmp_path, [_example(("base", "fine-tuned"))])
    page = build_report(run).read_text()
    assert page.count("<script src=\"plotly.min.js\">") == 1 and len(page) < 1_000_000
    assert (run / "plotly.min.js").stat().st_size > 1_000_000
    for section in ("config", "attention", "training", "evaluations"):
        assert f'<section id="{section}">' in page
    assert (run / "evaluate_sst2" / "report.html").is_file()
    (run / EXAMPLES_FILE).unlink()
    assert "--attention" in build_report(run).read_text()  # says how to get the views back


def test_report_reads_label_words_that_pandas_would_turn_into_booleans_or_missing_values(tmp_path):
    # A data set whose label words are "true" / "None": read back as bool or NaN they would leave the label
    # space (a KeyError, or a macro-F1 error over the wrong labels); the page shows the error of the words.
    evaluation = tmp_path / "evaluate_words"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"accuracy": 0.6, "macro_f1": 0.5, "n_inputs": 100,
                                                         "predicted_distribution": {"true": 0.7, "None": 0.3}}))
    predictions = pd.DataFrame({"true_label": ["true", "None"] * 50, "predicted_label": ["true"] * 70 + ["None"] * 30})
    predictions.to_csv(evaluation / "predictions.csv", index=False)
    expected = standard_errors({"predicted_distribution": {"true": 0.7, "None": 0.3}}, predictions)["macro_f1"]
    row = re.search(r"<td>macro_f1</td>\s*<td>[^<]*</td>\s*<td>([^<]*)</td>", build_report(evaluation).read_text())
    assert row and float(row.group(1)) == pytest.approx(expected, rel=1e-3)


def test_index_lists_every_run_folder_with_a_link_to_its_report(tmp_path):
    _finetune_folder(tmp_path / "runs", [_example()])
    page = build_index(tmp_path / "runs").read_text()
    assert "finetune_run/report.html" in page and "finetune_run/evaluate_sst2/report.html" in page
    assert "loss 1.000 -> 0.333" in page and "accuracy 0.750" in page


def test_show_attention_rejects_bad_input_before_loading_a_model(tmp_path, capsys):
    taken = tmp_path / "taken.html"
    taken.write_text("keep me")
    cases = [(["--heads", "L1"], "is not a head"), (["--out", str(taken)], "already exists; pass --overwrite"),
             (["--out", str(tmp_path / "x.png")], "should end in .html"), (["--prompt", "99999"], "past the test pool"),
             (["--pattern", "L1H1,L2H2"], "name one head"), (["--tau", "0"], "tau must be a number > 0"),
             (["--threshold", "nonsense"], "threshold must be one of")]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["show-attention", "no-such-model", "--out", str(tmp_path / "a.html"), *args])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error
    assert taken.read_text() == "keep me"


def _cli(args: list[str]) -> None:
    """``abft-lens ARGS`` in this process; it must succeed (typer ends with SystemExit(0))."""
    try:
        main(args)
    except SystemExit as stop:
        assert stop.code in (0, None), f"abft-lens {' '.join(args)} exited {stop.code}"


def test_report_command_rebuilds_a_folder_and_writes_an_index(tmp_path, capsys):
    run = _finetune_folder(tmp_path / "runs", [_example()])
    _cli(["report", str(run)])
    assert (run / "report.html").is_file() and "Report:" in capsys.readouterr().out
    _cli(["report", "--index", str(tmp_path / "runs")])
    assert (tmp_path / "runs" / "index.html").is_file()
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path)])
    assert stop.value.code == 2 and "not a run folder" in capsys.readouterr().err


# --- in the browser ---------------------------------------------------------------------------------


@needs_browser
def test_attention_view_in_a_browser_switches_heads_and_is_not_blank(tiny_gpt2, tiny_prompts, tmp_path):
    example = capture_example({"model": tiny_gpt2}, tiny_prompts, "L0H1,L1H3,L1H0", index=0)
    page = tmp_path / "view.html"
    attention_figure(example).write_html(page, include_plotlyjs=True)
    seen = probe(page, SWITCH_HEADS_JS)
    assert seen["errors"] == [] and "exception" not in seen, seen
    assert seen["n_heatmaps"] == 3 and seen["heads"] == ["L0H1", "L1H3", "L1H0"] and seen["n_buttons"] == 3
    assert seen["n_tokens"] == seen["token_cells"] == len(tiny_prompts[0].tokens)
    assert seen["before"]["shown"] == [["L0H1", "model"]] and seen["after"]["shown"] == [["L1H3", "model"]]
    assert seen["after"]["title"] != seen["before"]["title"] and "L1H3" in seen["after"]["title"]
    assert seen["after"]["z"] != seen["before"]["z"]
    assert seen["after"]["z"] == pytest.approx(example.rows["model"][1].tolist(), abs=1e-6)
    width, height, colours, ink = png_colour_stats(screenshot(page, tmp_path / "view.png", 1100, 600))
    assert (width, height) == (1100, 600) and colours > 20 and ink > 0.05


@needs_browser
def test_report_in_a_browser_has_every_section_and_sortable_tables(tiny_gpt2, tiny_prompts, tmp_path):
    examples = capture_examples({"base": tiny_gpt2, "fine-tuned": tiny_gpt2}, tiny_prompts, "top:4")
    run = _finetune_folder(tmp_path, examples)
    build_report(run)
    seen = probe(run / "report.html", """
        const table = document.querySelector('#config table.sortable, table.sortable');
        return {sections: [...document.querySelectorAll('section')].map(s => s.id),
                plots: document.querySelectorAll('.js-plotly-plot').length,
                attention_heatmaps: [...document.querySelectorAll('#attention .js-plotly-plot')]
                    .map(p => p.data.filter(t => t.type === 'heatmap').length),
                scripts: [...document.querySelectorAll('script[src]')].map(s => s.getAttribute('src'))};""")
    assert seen["errors"] == [] and "exception" not in seen, seen
    assert seen["sections"] == ["config", "attention", "training", "evaluations"]
    assert seen["attention_heatmaps"] == [8, 8, 8]  # 4 heads x (base, fine-tuned), per prompt
    assert seen["plots"] == 4 and seen["scripts"] == ["plotly.min.js"]
    evaluation = probe(run / "evaluate_sst2" / "report.html", """
        const th = [...document.querySelectorAll('#metrics th')];
        return {sections: [...document.querySelectorAll('section')].map(s => s.id),
                plots: document.querySelectorAll('.js-plotly-plot').length,
                metrics: [...document.querySelectorAll('#metrics tbody tr')].map(r => r.cells[0].textContent)};""")
    assert evaluation["errors"] == [], evaluation
    assert evaluation["sections"] == ["config", "attention", "metrics", "labels", "robustness"]
    assert evaluation["plots"] == 2 and evaluation["metrics"][:2] == ["accuracy", "macro_f1"]
    width, height, colours, ink = png_colour_stats(screenshot(run / "report.html", tmp_path / "report.png", 1200, 1600))
    assert colours > 20 and ink > 0.05


@needs_browser
def test_show_attention_on_a_finetune_run_draws_base_and_fine_tuned(tiny_gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _cli(["finetune", str(tiny_gpt2_dir), "--dataset", "sst2", "--n-train", "4", "--n-val", "4", "--k", "2",
          "--lr", "1e-2", "--batch-size", "2", "--steps", "1", "--heads", "all", "--out", str(run)])
    assert (run / "report.html").is_file() and (run / EXAMPLES_FILE).is_file()
    assert f"Report: {run / 'report.html'}" in capsys.readouterr().out
    out = tmp_path / "view.html"
    _cli(["show-attention", str(run), "--prompt", "1", "--heads", "top:3", "--pattern", "L1H0", "--out", str(out)])
    page = out.read_text()
    assert page.count("window.PlotlyConfig") == 1  # plotly.js inline once, for both figures
    seen = probe(out, SWITCH_HEADS_JS)
    assert seen["errors"] == [] and "exception" not in seen, seen
    assert seen["n_plots"] == 3  # the view, and the full pattern under each model
    assert seen["n_heatmaps"] == 6 and seen["before"]["shown"][1][1] == "fine-tuned"
    assert seen["after"]["title"] != seen["before"]["title"]


@pytest.mark.slow
@needs_browser
def test_show_attention_on_the_embedded_model_in_a_browser(smollm2, tmp_path):
    from abft_lens.report import example_prompts

    out = tmp_path / "view.html"
    _cli(["show-attention", "smollm2-135m", "--dataset", "sst2", "--prompt", "3", "--heads", "L20H5,L18H6,L23H8",
          "--out", str(out)])
    prompt = example_prompts(smollm2, "sst2", n=4)[3]
    seen = probe(out, SWITCH_HEADS_JS)
    assert seen["errors"] == [] and "exception" not in seen, seen
    assert seen["heads"] == ["L20H5", "L18H6", "L23H8"] and seen["n_heatmaps"] == 3
    assert seen["n_tokens"] == seen["token_cells"] == len(prompt.tokens)
    assert seen["after"]["z"] != seen["before"]["z"]


@pytest.mark.slow
@needs_browser
def test_find_heads_on_the_embedded_model_leaves_a_report_with_attention_views(smollm2, tmp_path):
    from abft_lens.find_heads import FindHeadsConfig, find_heads

    result = find_heads(FindHeadsConfig(n_prompts=4, out=str(tmp_path / "run")), model=smollm2, progress=False)
    seen = probe(result.run_dir / "report.html", """
        return {sections: [...document.querySelectorAll('section')].map(s => s.id),
                heads: [...document.querySelectorAll('#attention .js-plotly-plot')]
                    .map(p => p.data.filter(t => t.type === 'heatmap').map(t => t.meta.head))};""")
    assert seen["errors"] == [], seen
    assert seen["sections"] == ["config", "heads", "attention"]
    top = [f"L{l}H{h}" for l, h in result.scores.select(top=8)]
    assert seen["heads"] == [top] * 3
