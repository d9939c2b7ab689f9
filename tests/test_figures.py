"""`abft-lens figures`: figures from saved folders, HTML always, real PNG images where a browser exists."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from abft_lens.figures import accuracy_with_paper, make_figures, paper_table, register_figure_source
from plotted import plotted_traces

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_available() -> bool:
    return importlib.util.find_spec("kaleido") is not None and any(
        shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "chrome"))


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _saved_folders(root):
    rows = [dict(layer=layer, head=head, label_mass=0.1 * head, correctness=0.01 * layer, pass_rate=0.5,
                 n_prompts=8, rank=1)
            for layer in range(3) for head in range(4)]
    (root / "find-heads_x").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "find-heads_x" / "heads.csv", index=False)
    (root / "bench").mkdir()
    accuracies = (("sst2", "vanilla", 0.6), ("sst2", "abft", 0.8),
                  ("mr", "vanilla", 0.55), ("mr", "abft", 0.7))
    pd.DataFrame([dict(dataset=d, method=m, seed=42, accuracy=a) for d, m, a in accuracies]
                 ).to_csv(root / "bench" / "results.csv", index=False)
    (root / "run_abft").mkdir()
    (root / "run_abft" / "metrics.jsonl").write_text(
        "".join(json.dumps(dict(step=s, loss=1.0 / s, correct_mass=0.3 + 0.01 * s, wrong_mass=0.2)) + "\n"
                for s in (1, 2, 3)))


def test_paper_numbers_are_the_quoted_gpt2_xl_row():
    table = paper_table()
    assert table.query("dataset == 'sst2' and method == 'abft'")["accuracy"].item() == pytest.approx(0.8792)
    assert table.groupby("method")["accuracy"].mean()["vanilla"] == pytest.approx(0.5013, abs=1e-4)


def test_accuracy_figure_labels_the_paper_numbers_as_quoted():
    results = pd.DataFrame([dict(dataset="sst2", method="abft", accuracy=0.7)])
    names = [trace.name for trace in accuracy_with_paper(results).data]
    assert "abft (ours)" in names
    assert "abft (GPT2-XL, quoted from the paper)" in names


def test_accuracy_figure_marks_collapsed_runs_and_draws_macro_f1_with_seed_error_bars():
    results = pd.DataFrame([dict(dataset="sst5", method="abft", seed=s, accuracy=0.4, macro_f1=f,
                                 collapsed_onto="bad" if s == 42 else None) for s, f in ((42, 0.1), (43, 0.3))])
    accuracy = accuracy_with_paper(results).data[0]
    assert accuracy.text[0] == "collapsed"
    f1 = accuracy_with_paper(results, metric="macro_f1")
    assert [trace.name for trace in f1.data] == ["abft (ours)"]  # the paper quotes accuracy only
    assert f1.data[0].y[0] == pytest.approx(0.2) and f1.data[0].error_y.array[0] == pytest.approx(0.1414, abs=1e-4)


def test_figures_are_drawn_from_saved_folders_as_html(tmp_path):
    _saved_folders(tmp_path / "runs")
    report = make_figures([tmp_path / "runs"], tmp_path / "figures", png=False)
    pages = {path.name: path for path in report.written}
    assert sorted(pages) == ["accuracy_bench.html", "heads_find-heads_x_correctness.html",
                             "heads_find-heads_x_label_mass.html", "training_run_abft.html"]
    # Each page draws the saved numbers: heads.csv as layer x head grids (label_mass = 0.1 head,
    # correctness = 0.01 layer), results.csv's accuracies per data set, metrics.jsonl's label masses per step.
    layers, heads = np.meshgrid(range(3), range(4), indexing="ij")
    label_mass = plotted_traces(pages["heads_find-heads_x_label_mass.html"])["heatmap"]
    assert np.allclose(label_mass["z"], 0.1 * heads) and label_mass["y"] == ["0", "1", "2"]
    assert np.allclose(plotted_traces(pages["heads_find-heads_x_correctness.html"])["heatmap"]["z"], 0.01 * layers)
    accuracy = plotted_traces(pages["accuracy_bench.html"])
    assert accuracy["abft (ours)"]["x"] == ["sst2", "mr"] and np.allclose(accuracy["abft (ours)"]["y"], [0.8, 0.7])
    assert np.allclose(accuracy["vanilla (ours)"]["y"], [0.6, 0.55])
    training = plotted_traces(pages["training_run_abft.html"])
    assert np.allclose(training["correct labels"]["y"], [0.31, 0.32, 0.33])
    assert np.allclose(training["wrong labels"]["y"], [0.2, 0.2, 0.2])


def test_run_folders_whose_names_hold_dots_get_a_figure_each(tmp_path):
    """The ablations' run folders are named by their settings (sst2_lr=0.001_seed42, sst2_a0=0.25,b0=0.5_seed42):
    cutting a name at its first dot as if it were a suffix gave two lrs one file, and the second overwrote the
    first."""
    steps = [{"step": step, "correct_mass": 0.3, "wrong_mass": 0.2} for step in (1, 2)]
    names = ["sst2_lr=0.001_seed42", "sst2_lr=0.01_seed42", "sst2_a0=0.25,b0=0.5_seed42"]
    for name in names:
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in steps) + "\n")
    report = make_figures([tmp_path / "runs"], tmp_path / "figures", png=False)
    assert sorted(path.name for path in report.written) == sorted(f"training_{name}.html" for name in names)
    assert all(path.is_file() for path in report.written)


def test_a_table_with_macro_f1_gets_a_macro_f1_figure_with_seed_error_bars(tmp_path):
    # Issue 13: macro-F1 beside accuracy in the Table-1 figure, mean over seeds with their std.
    (tmp_path / "runs" / "bench").mkdir(parents=True)
    pd.DataFrame([dict(dataset="sst5", method="abft", seed=s, accuracy=0.4, macro_f1=f)
                  for s, f in ((42, 0.1), (43, 0.3), (44, 0.2))]).to_csv(tmp_path / "runs" / "bench" / "results.csv",
                                                                          index=False)
    report = make_figures([tmp_path / "runs"], tmp_path / "figures", png=False)
    assert sorted(path.name for path in report.written) == ["accuracy_bench.html", "macro_f1_bench.html"]
    bars = plotted_traces(tmp_path / "figures" / "macro_f1_bench.html")["abft (ours)"]
    assert bars["y"] == pytest.approx([0.2]) and bars["error_y"]["array"] == pytest.approx([0.1])


def test_registered_figure_sources_run_and_their_failures_are_reported(tmp_path):
    def good(roots, out, png):
        (out / "extra.html").write_text("<html></html>")
        return [out / "extra.html"]

    def bad(roots, out, png):
        raise ValueError("broken")

    register_figure_source("test-good", good)
    register_figure_source("test-bad", bad)
    try:
        report = make_figures([tmp_path / "nothing"], tmp_path / "figures", png=False)
    finally:
        from abft_lens import figures
        figures._SOURCES[:] = [(n, s) for n, s in figures._SOURCES if not n.startswith("test-")]
    assert [p.name for p in report.written] == ["extra.html"]
    assert any("test-bad" in reason and "broken" in reason for reason in report.skipped)


@pytest.mark.skipif(not _png_available(), reason="PNG export needs kaleido (the `figures` extra) and a "
                    "Chrome/Chromium browser; `make system-deps` installs Debian's chromium (as root)")
def test_png_export_writes_real_images(tmp_path):
    _saved_folders(tmp_path / "runs")
    report = make_figures([tmp_path / "runs"], tmp_path / "figures", png=True)
    pngs = [path for path in report.written if path.suffix == ".png"]
    assert len(pngs) == 4 and not report.skipped
    width, height = _png_size(next(p for p in pngs if p.name.startswith("heads_")))
    assert (width, height) == (520, 720)  # head_heatmap's layout size


def test_png_export_retries_once_and_reports_a_failure_that_persists(tmp_path, monkeypatch):
    """Kaleido's page once failed to load under load and worked when asked again: one retry, then a clear error."""
    import plotly.graph_objects as go

    from abft_lens.plots import save_figure

    calls = []

    def flaky(self, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 1:
            raise ValueError("ReferenceError: kaleido_scopes is not defined")
        Path(target).write_bytes(b"png")

    monkeypatch.setattr(go.Figure, "write_image", flaky)
    written = save_figure(go.Figure(), tmp_path / "once", png=True)
    assert len(calls) == 2 and (tmp_path / "once.png") in written

    def broken(self, target, *args, **kwargs):
        calls.append(target)
        raise ValueError("no browser")

    monkeypatch.setattr(go.Figure, "write_image", broken)
    calls.clear()
    with pytest.raises(RuntimeError, match="static export needs kaleido.*no browser"):
        save_figure(go.Figure(), tmp_path / "never", png=True)
    assert len(calls) == 2 and (tmp_path / "never.html").exists()


def test_robustness_and_out_of_domain_figures_come_from_the_benchmark_tables(tmp_path):
    bench = tmp_path / "runs" / "bench"
    bench.mkdir(parents=True)
    rows = [dict(dataset=d, method=m, seed=42, accuracy=0.6, consistency=None if m == "calibration" else 0.8,
                 unseen_label_accuracy=None if m == "calibration" else 0.3, zero_shot_accuracy=0.5)
            for d in ("sst2", "mr") for m in ("vanilla", "calibration", "abft")]
    pd.DataFrame(rows).to_csv(bench / "results.csv", index=False)
    pd.DataFrame([dict(trained_on="none", dataset="mr", method="vanilla", seed=42, accuracy=0.6),
                  dict(trained_on="sst2", dataset="mr", method="abft", seed=42, accuracy=0.5)]
                 ).to_csv(bench / "ood.csv", index=False)
    report = make_figures([tmp_path / "runs"], tmp_path / "figures", png=False)
    written = {path.name: path for path in report.written}
    assert {"accuracy_bench.html", "robustness_bench.html", "ood_bench.html"} <= set(written)
    robustness = written["robustness_bench.html"].read_text()
    assert '"name":"abft"' in robustness and '"name":"calibration"' not in robustness  # no forwards of its own


def test_one_seed_accuracy_bars_carry_the_binomial_standard_error():
    results = pd.DataFrame([dict(dataset="sst2", method="abft", seed=42, accuracy=0.8, n_inputs=1024)])
    figure = accuracy_with_paper(results)
    assert figure.data[0].error_y.array[0] == pytest.approx((0.8 * 0.2 / 1024) ** 0.5)
    assert "binomial standard error" in figure.layout.title.text
    # Without n_inputs (tables older than the column) there is no error to draw, and the title says none.
    bare = accuracy_with_paper(results.drop(columns=["n_inputs"]))
    assert not bare.data[0].error_y.visible and "error bars" not in bare.layout.title.text


def test_a_table_older_than_its_collapse_columns_is_completed_from_its_run_folders(tmp_path):
    from abft_lens.evaluation.records import with_prediction_columns

    run = tmp_path / "records_test_runs" / "sst5_abft_seed42"
    (run / "evaluate_sst5").mkdir(parents=True)
    (run / "evaluate_sst5" / "metrics.json").write_text(json.dumps(
        {"n_inputs": 1024, "predicted_distribution": {"bad": 0.8, "good": 0.2},
         "true_distribution": {"bad": 0.4, "good": 0.6}}))
    # Named from the directory the benchmark ran in (tmp_path), found from the table's folder below it.
    rows = [dict(dataset="sst5", method="abft", seed=42, accuracy=0.3, run_dir="records_test_runs/sst5_abft_seed42"),
            dict(dataset="sst5", method="vanilla", seed=42, accuracy=0.3, run_dir="records_test_runs/gone")]
    assert pd.isna(with_prediction_columns(pd.DataFrame(rows)).loc[0, "collapsed_onto"])  # not from here
    completed = with_prediction_columns(pd.DataFrame(rows), base=tmp_path / "results" / "bench")
    assert completed.loc[0, "collapsed_onto"] == "bad" and completed.loc[0, "n_inputs"] == 1024
    assert completed.loc[0, "label_words"] == "bad,good"
    assert pd.isna(completed.loc[1, "predicted_distribution"])  # no folder: left as it was
    # A row written under an older collapse rule has its flag derived again from its folder; a row whose
    # folder is gone keeps its flag.
    stale = pd.DataFrame(rows).assign(predicted_distribution=['{"bad": 0.8, "good": 0.2}', '{"bad": 0.9, "good": 0.1}'],
                                      collapsed_onto=[None, "bad"])
    rederived = with_prediction_columns(stale, base=tmp_path / "results" / "bench")
    assert list(rederived["collapsed_onto"]) == ["bad", "bad"]
    figure = accuracy_with_paper(completed)
    abft = next(t for t in figure.data if t.name == "abft (ours)")
    assert list(abft.text) == ["collapsed"] and abft.error_y.array[0] == pytest.approx((0.3 * 0.7 / 1024) ** 0.5)


def test_icl_test_figure_shows_the_tested_runs_beside_their_accuracy(tmp_path):
    bench = tmp_path / "runs" / "bench"
    bench.mkdir(parents=True)
    rows = [dict(dataset="sst2", method=m, seed=42, accuracy=0.8, flipped_accuracy=None if m == "calibration" else 0.3,
                 flipped_memorised_share=None if m == "calibration" else 0.7, symbols_accuracy=0.6)
            for m in ("vanilla", "calibration", "e2e")]
    pd.DataFrame(rows).to_csv(bench / "results.csv", index=False)
    report = make_figures([tmp_path / "runs"], tmp_path / "figures", png=False)
    written = {path.name: path for path in report.written}
    page = written["icl_tests_bench.html"].read_text()
    assert '"name":"e2e"' in page and '"name":"calibration"' not in page
    assert "flipped memorised share" in page  # one panel per measurement

    pd.DataFrame(rows).drop(columns=["flipped_accuracy"]).to_csv(bench / "results.csv", index=False)
    again = make_figures([tmp_path / "runs"], tmp_path / "figures2", png=False)
    assert not any(path.name.startswith("icl_tests") for path in again.written)


def test_one_seed_icl_test_bars_carry_the_binomial_standard_error_and_chance_is_drawn(tmp_path):
    bench = tmp_path / "runs" / "bench"
    bench.mkdir(parents=True)
    rows = [dict(dataset=dataset, method="abft", seed=42, accuracy=0.8, flipped_accuracy=0.3,
                 flipped_memorised_share=0.7, symbols_accuracy=0.6, n_inputs=1024, label_words=words)
            for dataset, words in (("sst2", "negative,positive"), ("trec", "a,b,c,d,e,f"))]
    rows.append(dict(rows[0], seed=43, symbols_accuracy=0.7))
    pd.DataFrame(rows).to_csv(bench / "results.csv", index=False)
    from abft_lens.figures import _icl_test_figure

    captured = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("abft_lens.figures._save", lambda report, figure, target, png: captured.setdefault("f", figure))
        _icl_test_figure(None, pd.read_csv(bench / "results.csv"), "bench", tmp_path, png=False)
    figure = captured["f"]
    symbols = next(t for t in figure.data if t.yaxis == "y4")
    # sst2 has two seeds: their std; trec one: sqrt(p (1 - p) / n)
    assert list(symbols.x) == ["sst2", "trec"]
    assert symbols.error_y.array[0] == pytest.approx(pd.Series([0.6, 0.7]).std())
    assert symbols.error_y.array[1] == pytest.approx((0.6 * 0.4 / 1024) ** 0.5)
    chance = sorted({round(shape.y0, 3) for shape in figure.layout.shapes})
    assert chance == [0.167, 0.5] and len(figure.layout.shapes) == 3 * 2  # three accuracy panels, two data sets


def test_cost_figure_puts_each_fine_tuning_methods_cost_beside_its_accuracy(tmp_path):
    bench = tmp_path / "runs" / "bench"
    bench.mkdir(parents=True)
    cost = {"abft": 13_271_040, "e2e": 41_582_592, "e2e-lora": 29_745_024}
    rows = [dict(dataset=d, method=m, seed=42, accuracy=0.8, macro_f1=0.7, full_precision_params=cost.get(m),
                 seconds_per_step=None if m == "vanilla" else 9.5, peak_memory_mb=None if m == "vanilla" else 2100.0,
                 device="cpu")
            for d in ("sst2", "trec") for m in ("vanilla", "abft", "e2e", "e2e-lora")]
    # One piece ran on a GPU: its time is not set beside the CPU's.
    rows.append(dict(rows[-1], dataset="mr", seconds_per_step=0.123, device="cuda:0"))
    pd.DataFrame(rows).to_csv(bench / "results.csv", index=False)
    report = make_figures([tmp_path / "runs"], tmp_path / "figures", png=False)
    page = {path.name: path for path in report.written}["cost_bench.html"].read_text()
    assert '"name":"e2e-lora"' in page and '"name":"vanilla"' not in page  # only what was trained has a cost
    assert "full precision params" in page and "seconds per step" in page
    assert "41582592" in page  # the recorded Param.* itself is drawn
    assert "0.123" not in page and "on cpu" in page

    # A table whose runs recorded no cost (older benchmarks) draws no cost figure.
    pd.DataFrame(rows).drop(columns=["full_precision_params"]).to_csv(bench / "results.csv", index=False)
    again = make_figures([tmp_path / "runs"], tmp_path / "figures2", png=False)
    assert not any(path.name.startswith("cost_") for path in again.written)


def test_a_png_server_that_never_closes_does_not_hang_the_figures(capsys):
    # Once, kaleido's stop_sync_server never returned after every figure had been written.
    import threading
    import types

    from kaleido._sync_server import GlobalKaleidoServer

    from abft_lens.figures import _stop_png_server

    release, stops = threading.Event(), []
    stuck = types.SimpleNamespace(stop_sync_server=lambda silence_warnings: (stops.append(1), release.wait()))
    server = GlobalKaleidoServer()
    server._initialized = True  # as kaleido.start_sync_server leaves it
    # In a thread of the test's own: without the bound, the test fails here instead of hanging.
    stopping = threading.Thread(target=_stop_png_server, args=(stuck,), kwargs={"timeout_s": 1}, daemon=True)
    try:
        stopping.start()
        stopping.join(10)
        assert not stopping.is_alive() and stops == [1]
        assert not server.is_running()  # kaleido's close at exit will not wait for it again
        assert "PNG export's browser did not close" in capsys.readouterr().err
    finally:
        server._initialized = False
        release.set()
    # A server that closes is waited for, and nothing is said.
    _stop_png_server(types.SimpleNamespace(stop_sync_server=lambda silence_warnings: stops.append(2)), timeout_s=5)
    assert stops == [1, 2] and capsys.readouterr().err == ""
