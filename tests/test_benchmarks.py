"""The benchmark scripts: the paper-claim benchmark (benchmarks/bench_paper_claim.py: its tables, and a tiny
run of every piece on the real model, in process, with the out-of-domain evaluation) and the ablation
benchmark (benchmarks/bench_ablations.py: its tables, and a tiny run of every experiment on the tiny random
GPT-2, in process)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from abft_lens.errors import DataError
from abft_lens.evaluation import out_of_domain_harm
from abft_lens.figures import in_paper_order
from abft_lens.lora import has_lora
from abft_lens.training import snapshot, trainable_parameters

from benchmark_scripts import load_benchmark_script
from browser import browser, probe

REPO = Path(__file__).resolve().parents[1]


def test_append_rows_replaces_rows_with_the_same_key_and_keeps_the_rest(bench, tmp_path):
    path = tmp_path / "results.csv"
    bench.append_results(path, [dict(dataset="sst2", method="abft", seed=42, accuracy=0.5),
                                dict(dataset="mr", method="abft", seed=42, accuracy=0.6)])
    frame = bench.append_results(path, [dict(dataset="sst2", method="abft", seed=42, accuracy=0.9),
                                        dict(dataset="sst2", method="abft", seed=43, accuracy=0.7)])
    assert list(frame.columns) == bench.COLUMNS
    on_disk = pd.read_csv(path).set_index(["dataset", "seed"])["accuracy"].to_dict()
    assert on_disk == {("mr", 42): 0.6, ("sst2", 42): 0.9, ("sst2", 43): 0.7}
    assert bench.finished_pieces(path) == {("mr", "abft", 42), ("sst2", "abft", 42), ("sst2", "abft", 43)}


def test_appending_a_row_without_a_value_keeps_the_column_s_numbers_as_written(bench, tmp_path):
    path = tmp_path / "results.csv"
    bench.append_results(path, [
        dict(dataset="sst2", method="e2e-lora", seed=42, accuracy=0.9, lora_rank=16, full_precision_params=29233152),
        dict(dataset="sst2", method="e2e", seed=42, accuracy=0.8, lora_rank=None, full_precision_params=None)])
    bench.append_results(path, [dict(dataset="sst2", method="abft", seed=42, accuracy=0.8, lora_rank=None,
                                     full_precision_params=13271040)])
    with open(path, newline="") as file:
        written = [(row["lora_rank"], row["full_precision_params"], row["accuracy"]) for row in csv.DictReader(file)]
    # As written: not 16.0, nor 1.3271e+07 (float_format's 6 digits); fractions still through float_format.
    assert written == [("16", "29233152", "0.9"), ("", "", "0.8"), ("", "13271040", "0.8")]


def test_resuming_finished_pieces_in_another_precision_is_refused():
    from abft_lens.benchmarking import check_finished_precision

    keys = ("dataset", "piece", "seed")
    frame = pd.DataFrame([dict(dataset="sst2", piece="abft", seed=42, precision="bf16"),
                          dict(dataset="mr", piece="abft", seed=42, precision=None)])  # before the column: fp32
    check_finished_precision(frame, keys, [("sst2", "abft", 42), ("mr", "abft", 43)], "bf16")  # mr 43 not run yet
    check_finished_precision(frame, keys, [("mr", "abft", 42)], "fp32")
    with pytest.raises(DataError, match="1 finished piece.*ran in fp32 .e.g. mr abft 42.*would use bf16"):
        check_finished_precision(frame, keys, [("sst2", "abft", 42), ("mr", "abft", 42)], "bf16")


def test_a_benchmark_script_says_what_is_wrong_in_one_line_and_exits_with_status_2(tmp_path):
    out = tmp_path / "ablations"
    out.mkdir()
    pd.DataFrame([dict(dataset="sst2", setting="paper", seed=42, precision="bf16")]).to_csv(out / "results.csv",
                                                                                          index=False)
    command = [sys.executable, str(REPO / "benchmarks" / "bench_ablations.py"), "--experiments", "table4",
               "--table4-datasets", "sst2", "--precision", "fp32", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: 1 finished piece(s) of this command ran in bf16")
    assert not (out / "runs").exists()  # nothing ran


def test_out_of_domain_harm_is_vanilla_minus_fine_tuned_on_the_same_data_set_and_seed():
    table = pd.DataFrame([
        dict(trained_on="none", dataset="mr", method="vanilla", seed=42, accuracy=0.60),
        dict(trained_on="none", dataset="mr", method="vanilla", seed=43, accuracy=0.50),
        dict(trained_on="sst2", dataset="mr", method="abft", seed=42, accuracy=0.55),
        dict(trained_on="sst2", dataset="mr", method="e2e", seed=43, accuracy=0.70),
        dict(trained_on="sst2", dataset="fp", method="abft", seed=42, accuracy=0.40),  # no vanilla row
    ])
    harm = out_of_domain_harm(table)
    assert harm["harm"].tolist()[:2] == pytest.approx([0.05, -0.20])
    assert pd.isna(harm["harm"].iloc[2])


def test_summary_counts_wins_differences_and_harm(bench):
    rows = [("sst2", "vanilla", 0.6, 0.0), ("sst2", "abft", 0.8, 10.0), ("sst2", "e2e", 0.9, 20.0),
            ("mr", "vanilla", 0.6, 0.0), ("mr", "abft", 0.5, 10.0), ("mr", "e2e", 0.7, 20.0)]
    frame = pd.DataFrame([dict(dataset=d, method=m, seed=42, accuracy=a, macro_f1=a - 0.1, train_seconds=t,
                               consistency=0.8, device="cpu", n_inputs=1024) for d, m, a, t in rows])
    ood = pd.DataFrame([dict(trained_on="none", dataset="mr", method="vanilla", seed=42, accuracy=0.6),
                        dict(trained_on="none", dataset="sst2", method="vanilla", seed=42, accuracy=0.7),
                        dict(trained_on="sst2", dataset="mr", method="abft", seed=42, accuracy=0.5),
                        dict(trained_on="mr", dataset="sst2", method="abft", seed=42, accuracy=0.4),
                        dict(trained_on="mr", dataset="sst2", method="e2e", seed=42, accuracy=0.8)])
    summary = bench.summarise(frame, ood)
    assert summary["abft_wins_over_vanilla_accuracy"] == summary["abft_wins_over_vanilla_macro_f1"] == "1 of 2"
    assert summary["mean_macro_f1"]["abft"] == pytest.approx(0.55)
    assert summary["abft_minus_vanilla"] == pytest.approx(0.05)
    assert summary["abft_minus_e2e"] == pytest.approx(-0.15)
    assert summary["abft_over_e2e_train_time"] == pytest.approx(0.5)
    assert summary["mean_out_of_domain_harm"] == {"abft": pytest.approx(0.2), "e2e": pytest.approx(-0.1)}
    # ABFT trained on sst2 has no E2E partner: the paired means use the mr runs only
    assert summary["paired_out_of_domain_harm"] == {"abft": pytest.approx(0.3), "e2e": pytest.approx(-0.1), "runs": 1}


def test_summary_means_weigh_each_data_set_once_however_many_seeds_it_has(bench):
    # the grid finishes seeds data set by data set: sst2 has two, mr one
    rows = [("sst2", 42, 0.8), ("sst2", 43, 0.9), ("mr", 42, 0.5)]
    frame = pd.DataFrame([dict(dataset=d, method="abft", seed=s, accuracy=a, macro_f1=a / 2, train_seconds=1.0,
                               device="cpu", n_inputs=1024) for d, s, a in rows])
    summary = bench.summarise(frame)
    assert summary["mean_accuracy"]["abft"] == pytest.approx((0.85 + 0.5) / 2)  # not (0.8 + 0.9 + 0.5) / 3
    assert summary["mean_macro_f1"]["abft"] == pytest.approx((0.425 + 0.25) / 2)
    assert summary["datasets_per_method"] == {"abft": 2}


def test_summary_compares_two_methods_on_the_seeds_both_finished(bench):
    # sst2: ABFT has seeds 42 and 43, E2E only 42; mr: no seed in common
    rows = [("sst2", "abft", 42, 0.8), ("sst2", "abft", 43, 0.9), ("sst2", "e2e", 42, 0.9),
            ("mr", "abft", 42, 0.7), ("mr", "e2e", 44, 0.6)]
    frame = pd.DataFrame([dict(dataset=d, method=m, seed=s, accuracy=a, macro_f1=a, train_seconds=1.0,
                               device="cpu", n_inputs=1024) for d, m, s, a in rows])
    summary = bench.summarise(frame)
    assert summary["abft_minus_e2e_accuracy"] == pytest.approx(0.8 - 0.9)  # seed 42's pair, not 0.85 - 0.9
    assert summary["abft_minus_e2e"] == summary["abft_minus_e2e_accuracy"]
    assert summary["abft_wins_over_e2e_accuracy"] == "0 of 1"  # mr has no pair
    assert "abft_minus_vanilla_accuracy" not in summary


def test_figures_list_data_sets_and_methods_in_the_papers_order():
    table = pd.DataFrame(dict(dataset=["trec", "sst2", "custom", "sst2"], method=["abft", "e2e", "abft", "vanilla"]))
    ordered = in_paper_order(table)
    assert list(zip(ordered["dataset"], ordered["method"])) == [
        ("sst2", "vanilla"), ("sst2", "e2e"), ("trec", "abft"), ("custom", "abft")]


@pytest.mark.slow
def test_tiny_benchmark_runs_every_piece_in_process_and_leaves_the_model_as_it_was(bench, smollm2, tmp_path):
    params = trainable_parameters(smollm2, "qk")
    before = snapshot(params)
    out = tmp_path / "bench"
    argv = ["--tiny", "--in-process", "--ood", "--ood-datasets", "sst2", "mr", "trec", "--out", str(out),
            "--methods", "vanilla", "calibration", "abft", "e2e", "e2e-lora"]
    bench.main(argv, model=smollm2)

    results = pd.read_csv(out / "results.csv")
    assert sorted(results["method"]) == ["abft", "calibration", "e2e", "e2e-lora", "vanilla"]
    assert results["accuracy"].between(0, 1).all()
    tuned = results.set_index("method").loc[["abft", "e2e", "e2e-lora"]]
    assert (tuned["trainable_params"] > 0).all() and (tuned["train_seconds"] > 0).all()
    assert (tuned["seconds_per_step"] > 0).all() and (tuned["peak_memory_mb"] > 0).all()
    # Param.*: ABFT holds only what it trains; E2E also the LM head, with or without LoRA.
    extra = tuned["full_precision_params"] - tuned["trainable_params"]
    assert extra["abft"] == 0 and extra["e2e"] == extra["e2e-lora"] == smollm2.cfg.d_vocab * smollm2.cfg.d_model
    assert tuned.loc["e2e-lora", "lora_rank"] == 16 and pd.isna(tuned.loc["e2e", "lora_rank"])
    assert tuned.loc["e2e-lora", "trainable_params"] < tuned.loc["e2e", "trainable_params"]
    assert (out / "runs" / "sst2_abft_seed42" / "trained.safetensors").is_file()
    # The model is passed in loaded: each evaluation still names what it evaluated (the base model, or the run).
    run_metrics = json.loads((out / "runs" / "sst2_abft_seed42" / "evaluate_sst2" / "metrics.json").read_text())
    assert run_metrics["model_or_run"] == str(out / "runs" / "sst2_abft_seed42")
    # Out of domain: the base model on sst2, each fine-tuned model on the other data sets asked for.
    ood = pd.read_csv(out / "ood.csv")
    assert len(ood) == 1 + 3 * 2
    assert set(ood.loc[ood["method"] == "abft", "dataset"]) == {"mr", "trec"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pieces"] == 5 and "--in-process" in summary["command"]
    # Seed 42 ran the ICL tests (--icl-tests-seeds default); calibration rows do not repeat vanilla's.
    by_method = results.set_index("method")
    assert by_method.loc[["vanilla", "abft", "e2e"], "flipped_accuracy"].between(0, 1).all()
    assert by_method.loc[["vanilla", "abft", "e2e"], "symbols_accuracy"].between(0, 1).all()
    assert pd.isna(by_method.loc["calibration", "flipped_accuracy"])
    assert {"vanilla", "abft", "e2e"} <= set(pd.read_csv(out / "icl_tests.csv")["method"])
    assert (out / "results.html").is_file() and (out / "report.html").is_file()
    assert not has_lora(smollm2)  # the LoRA piece's adapters are gone
    for name, value in snapshot(params).items():
        assert torch.equal(value, before[name]), f"{name} changed"

    # A second run finds every piece finished and trains nothing.
    mtime = (out / "results.csv").stat().st_mtime_ns
    bench.main(argv, model=smollm2)
    assert (out / "results.csv").stat().st_mtime_ns == mtime


def test_summarise_only_writes_the_folders_report_over_the_results_table(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    rows = [dict(dataset=d, method=m, seed=42, accuracy=a, macro_f1=a - 0.1, consistency=0.8, train_seconds=t,
                 piece_seconds=t + 5, device="cpu", n_inputs=16, predicted_distribution='{"negative": 0.5}')
            for d, m, a, t in [("sst2", "vanilla", 0.6, 0.0), ("sst2", "calibration", 0.65, 0.0),
                               ("sst2", "abft", 0.8, 10.0), ("sst2", "e2e", 0.9, 20.0)]]
    bench.append_results(out / "results.csv", rows)
    bench.main(["--summarise-only", "--datasets", "sst2", "--out", str(out)])
    report = out / "report.html"
    assert f"Report: {report}" in capsys.readouterr().out
    page = report.read_text()
    assert '<section id="results">' in page and page.count('<script src="plotly.min.js">') == 1
    assert (out / "plotly.min.js").is_file() and "e2e" in page
    assert '<section id="config">' in page and "--summarise-only" in page  # the command, from summary.json
    if browser() is None:
        return  # the page's content is checked above; drawing it needs a Chromium
    seen = probe(report, """return {sections: [...document.querySelectorAll('section')].map(s => s.id),
        bars: [...document.querySelectorAll('.js-plotly-plot')].map(p => p.data.filter(t => t.type === 'bar').length),
        rows: document.querySelectorAll('#results tbody tr').length};""")
    assert seen["errors"] == [] and "exception" not in seen, seen
    assert seen["sections"] == ["config", "results"] and seen["rows"] == 4
    assert seen["bars"][0] >= 4  # one per method, and the paper's bars


def _seed_rows(values: dict[tuple[str, str], list[float]], collapsed: set[tuple[str, str, int]] = frozenset()):
    return pd.DataFrame([dict(dataset=d, method=m, seed=42 + i, accuracy=a, macro_f1=a, n_inputs=1024,
                              collapsed_onto="bad" if (d, m, 42 + i) in collapsed else None)
                         for (d, m), accs in values.items() for i, a in enumerate(accs)])


def test_seed_table_gives_mean_and_spread_and_a_claim_needs_more_than_the_spread(bench):
    frame = _seed_rows({("sst2", "vanilla"): [0.60, 0.62, 0.64], ("sst2", "abft"): [0.80, 0.82, 0.84],
                        ("mr", "vanilla"): [0.60, 0.70, 0.80], ("mr", "abft"): [0.70, 0.75, 0.80]})
    table = bench.seed_table(frame).set_index(["dataset", "method"])
    assert table.loc[("sst2", "abft"), "accuracy_mean"] == pytest.approx(0.82)
    assert table.loc[("sst2", "abft"), "accuracy_std"] == pytest.approx(0.02)
    assert table.loc[("sst2", "abft"), "seeds"] == 3
    versus = bench.compare(bench.seed_table(frame), "abft", "vanilla", "accuracy").set_index("dataset")
    assert versus.loc["sst2", "verdict"] == "ahead"  # +0.20, spread 0.04
    assert versus.loc["mr", "verdict"] == "within the spread"  # +0.05, spread 0.15
    assert bench.summarise(frame)["abft_wins_over_vanilla_accuracy"] == "1 of 2"


def test_a_collapsed_run_is_never_counted_as_a_win(bench):
    frame = _seed_rows({("sst5", "vanilla"): [0.30], ("sst5", "abft"): [0.45]}, collapsed={("sst5", "abft", 42)})
    summary = bench.summarise(frame)
    assert summary["abft_vs_vanilla_accuracy"] == {"sst5": "ahead, but collapsed: not a win"}
    assert summary["abft_wins_over_vanilla_accuracy"] == "0 of 1"
    assert summary["collapsed_runs"] == {"abft": 1, "vanilla": 0}


def test_a_searched_lr_is_reused_only_for_the_same_model_data_set_method_and_label_words(bench, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # run_dir paths in the rows are relative, as the benchmark writes them
    older, newer = tmp_path / "older.csv", tmp_path / "newer.csv"

    def row(dataset, method, seed, words, **values):
        return dict(dataset=dataset, method=method, seed=seed, label_words=words, run_dir="x",
                    model="smollm2-135m", predicted_distribution="{}", **values)

    bench.append_results(older, [
        row("subj", "abft", 42, "false,true", lr=1e-3),  # StaICC's words, not the paper's: not reused
        row("sst2", "abft", 43, "negative,positive", lr=1e-4),
        row("sst2", "abft", 42, "negative,positive", lr=3e-4),
        row("sst2", "vanilla", 42, "negative,positive")])
    bench.append_results(newer, [row("subj", "abft", 42, "objective,subjective", lr=1e-4)])

    def reused(paths, dataset, method, model="smollm2-135m"):
        return bench.reused_lr(paths, dataset, method, model)

    assert reused([older, newer], "sst2", "abft")[0] == 3e-4  # the lowest seed's search
    assert "seed 42" in reused([older, newer], "sst2", "abft")[1]
    assert reused([older, newer], "subj", "abft")[0] == 1e-4
    assert reused([older], "subj", "abft") is None
    assert reused([older, newer], "sst2", "e2e") is None
    assert reused([tmp_path / "missing.csv"], "sst2", "abft") is None
    assert reused([older, newer], "sst2", "abft", "gemma3-270m") is None  # another model's search


def test_icl_test_table_averages_the_tested_seeds_and_leaves_calibration_out(bench):
    rows = [dict(dataset="sst2", method=m, seed=s, accuracy=0.8, macro_f1=0.8, flipped_accuracy=f,
                 flipped_memorised_share=1 - f, symbols_accuracy=0.6, flipped_k=4)
            for m, s, f in (("vanilla", 42, 0.2), ("vanilla", 43, 0.4), ("calibration", 42, 0.2), ("abft", 42, 0.5))]
    rows.append(dict(dataset="sst2", method="abft", seed=44, accuracy=0.9, macro_f1=0.9))  # not tested
    table = bench.icl_test_table(pd.DataFrame(rows)).set_index("method")
    assert set(table.index) == {"vanilla", "abft"}
    assert table.loc["vanilla", "flipped_accuracy"] == pytest.approx(0.3)
    assert table.loc["vanilla", "seeds"] == 2 and table.loc["abft", "seeds"] == 1
    assert table.loc["abft", "accuracy"] == pytest.approx(0.8)  # the tested run's, not seed 44's
    assert bench.icl_test_table(pd.DataFrame(rows).drop(columns=["flipped_accuracy"])).empty


def test_seed_table_markdown_gives_mean_spread_seeds_and_marks_collapse(bench):
    frame = _seed_rows({("sst2", "vanilla"): [0.60, 0.62, 0.64], ("trec", "vanilla"): [0.30],
                        ("sst2", "abft"): [0.80, 0.82, 0.84]}, collapsed={("sst2", "abft", 43)})
    lines = bench.seed_table_markdown(bench.seed_table(frame)).splitlines()
    assert lines[0] == "| accuracy | sst2 | trec | mean |"
    assert lines[2] == "| vanilla | 0.620 ± 0.020 (3) | 0.300 (1) | 0.460 (2 sets) |"
    assert lines[3] == "| abft | 0.820 ± 0.020 (3) † |  | 0.820 (1 set) |"


def test_costly_evaluations_run_only_for_the_seeds_asked(bench, tmp_path):
    args = bench.parse_args(["--robustness-seeds", "--icl-tests-seeds", "42", "--unseen-labels-seeds", "42",
                             "--out", str(tmp_path)])
    first, second = (bench.eval_config(args, "sst2", seed, calibrate=False, out=tmp_path, model_or_run=args.model)
                     for seed in (42, 43))
    assert (first.robustness, first.icl_tests, first.unseen_labels) == (False, True, True)
    assert (second.robustness, second.icl_tests, second.unseen_labels) == (False, False, False)
    default = bench.eval_config(bench.parse_args(["--out", str(tmp_path)]), "sst2", 43, calibrate=False, out=tmp_path,
                                model_or_run="smollm2-135m")
    assert (default.robustness, default.icl_tests, default.unseen_labels) == (False, False, True)


# --- the ablation benchmark (issue 18) ---------------------------------------------------------------------


def test_a_setting_shared_by_experiments_is_one_piece(ablations):
    args = ablations.parse_args(["--experiments", "table4", "fig6", "remedies", "--seeds", "42", "43",
                                 "--table4-datasets", "sst2", "--remedy-datasets", "sst2", "mr"])
    pieces, settings = ablations.planned_pieces(args)
    assert len(pieces) == len(set(pieces))
    assert [piece for piece in pieces if piece[0] == "sst2" and piece[2] == 42].count(("sst2", "paper", 42)) == 1
    # sst2: 5 of Table 4, 18 grid cells of which 2 are Table 4's, 4 remedies; mr: paper and 4 remedies.
    assert len(pieces) == 2 * (5 + 16 + 4 + 5)
    assert settings["a0=0.25,b0=2,no_pid"].fields() == {"initial_punish_weight": 0.25, "reward_weight": 2.0,
                                                        "pid": False}


def test_settings_narrow_the_pieces_and_an_unknown_one_is_refused_before_anything_runs(ablations, capsys):
    args = ablations.parse_args(["--experiments", "remedies", "--seeds", "43", "44", "--remedy-datasets", "trec",
                                 "sst5", "--settings", "paper", "label_covering"])
    pieces, _ = ablations.planned_pieces(args)
    assert sorted(pieces) == sorted((d, name, seed) for d in ("trec", "sst5") for name in ("paper", "label_covering")
                                    for seed in (43, 44))
    with pytest.raises(SystemExit) as exit_info:
        ablations.parse_args(["--experiments", "remedies", "--settings", "label_coverage"])
    assert exit_info.value.code == 2
    assert "--settings label_coverage: no such setting in --experiments remedies" in capsys.readouterr().err


def test_fig2_plans_the_papers_e2e_baseline_and_takes_other_methods_when_asked(ablations, capsys):
    pieces, settings = ablations.planned_pieces(ablations.parse_args(["--experiments", "fig2", "--fig2-datasets",
                                                                       "trec", "--sizes", "32", "1024"]))
    assert [name for _, name, _ in pieces] == ["vanilla", "abft_n=32", "abft_n=1024", "e2e-lora_n=32",
                                               "e2e-lora_n=1024"]
    assert settings["e2e-lora_n=32"].method == "e2e-lora"
    pieces, _ = ablations.planned_pieces(ablations.parse_args(["--experiments", "fig2", "--fig2-datasets", "trec",
                                                               "--sizes", "32", "--fig2-methods", "e2e"]))
    assert [name for _, name, _ in pieces] == ["vanilla", "e2e_n=32"]
    with pytest.raises(SystemExit) as exit_info:
        ablations.parse_args(["--experiments", "fig2", "--fig2-methods", "lora"])
    assert exit_info.value.code == 2 and "--fig2-methods" in capsys.readouterr().err


def test_settings_table_gives_time_relative_to_full_abft_and_verdicts_against_it(ablations):
    rows = [("paper", 0.80, 10.0), ("no_pid", 0.60, 10.0), ("reward_only", 0.79, 5.0)]
    frame = pd.DataFrame([dict(dataset="sst2", setting=name, seed=42, accuracy=a, macro_f1=a, n_inputs=1024,
                               train_seconds=t, device="cpu", collapsed_onto=None) for name, a, t in rows])
    table = ablations.settings_table(frame, ["paper", "no_pid", "reward_only", "punish_only"]).set_index("setting")
    assert table.loc["reward_only", "relative_train_time"] == pytest.approx(0.5)
    assert table.loc["paper", "relative_train_time"] == 1.0
    assert table.loc["no_pid", "macro_f1_minus_paper"] == pytest.approx(-0.2)
    assert table.loc["no_pid", "macro_f1_verdict"] == "behind"  # 0.2 > 2 SE of ~0.02
    assert table.loc["reward_only", "macro_f1_verdict"] == "within the spread"
    assert pd.isna(table.loc["paper", "macro_f1_verdict"])

    # The paper's piece is shared with the remedies (8 data sets): Table 4 keeps it only where an ablation ran.
    remedies_only = frame[frame["setting"] == "paper"].assign(dataset="mr", accuracy=0.3, macro_f1=0.3)
    table = ablations.settings_table(pd.concat([frame, remedies_only]), ["paper", "no_pid", "reward_only"])
    assert set(table["dataset"]) == {"sst2"}


def test_a_one_seed_difference_counts_only_beyond_the_known_seed_spread_of_the_papers_abft(ablations, tmp_path):
    # The three-seed grid: ABFT's accuracy and macro-F1 spread 0.05 on TEE (std of 0.40, 0.45, 0.50), nothing on
    # SST-2; another model's and another method's rows are left out.
    grid = pd.DataFrame([dict(dataset=d, method=m, model=model, seed=seed, accuracy=a, macro_f1=a)
                         for d, values in (("tee", (0.40, 0.45, 0.50)), ("sst2", (0.85, 0.85, 0.85)))
                         for seed, a in zip((42, 43, 44), values, strict=True)
                         for m, model in (("abft", "smollm2-135m"), ("e2e", "smollm2-135m"), ("abft", "gemma3-270m"))]
                        + [dict(dataset="mr", method="abft", model="smollm2-135m", seed=42, accuracy=0.8, macro_f1=0.8)])
    grid.loc[grid["method"] != "abft", ["accuracy", "macro_f1"]] = 0.0
    grid.loc[grid["model"] != "smollm2-135m", ["accuracy", "macro_f1"]] = 0.0
    grid = pd.concat([grid.assign(precision="bf16"), grid.assign(precision="fp32", accuracy=0.0, macro_f1=0.0)])
    grid.to_csv(tmp_path / "results.csv", index=False)
    spread = ablations.reference_spread(tmp_path / "results.csv", "smollm2-135m", "bf16")
    assert spread.loc["tee", "macro_f1_std"] == pytest.approx(0.05) and spread.loc["sst2", "accuracy_std"] == 0
    assert "mr" not in spread.index  # one seed: no spread
    assert ablations.reference_spread(tmp_path / "missing.csv", "smollm2-135m", "bf16") is None

    # +0.08 on both: beyond two standard errors (about 0.043), within twice TEE's spread (0.10), beyond SST-2's.
    frame = pd.DataFrame([dict(dataset=d, setting=name, seed=42, accuracy=a, macro_f1=a, n_inputs=1024,
                               train_seconds=10.0, device="cpu", collapsed_onto=None)
                          for d, base in (("tee", 0.45), ("sst2", 0.80))
                          for name, a in (("paper", base), ("label_covering", base + 0.08))])
    names = ["paper", "label_covering"]
    binomial = ablations.settings_table(frame, names).set_index(["dataset", "setting"])
    assert binomial.loc[("tee", "label_covering"), "macro_f1_verdict"] == "ahead"
    table = ablations.settings_table(frame, names, spread).set_index(["dataset", "setting"])
    assert table.loc[("tee", "label_covering"), "macro_f1_verdict"] == "within the spread"
    assert table.loc[("tee", "label_covering"), "macro_f1_margin"] == pytest.approx(0.10)
    assert table.loc[("sst2", "label_covering"), "macro_f1_verdict"] == "ahead"
    assert table.loc[("sst2", "label_covering"), "macro_f1_margin"] == pytest.approx(
        binomial.loc[("sst2", "label_covering"), "macro_f1_margin"])  # no spread: two standard errors


def test_a_remedy_is_recommended_only_if_it_helps_a_weak_set_and_hurts_none(ablations):
    datasets = ("trec", "sst5", "sst2", "teh")

    def verdict(verdicts: dict[str, str], collapsed: tuple[str, ...] = (), paper_collapsed: tuple[str, ...] = ()):
        table = pd.DataFrame([dict(dataset=d, setting=s, macro_f1_verdict=v if s != "paper" else None,
                                   collapsed_seeds=int(d in (collapsed if s != "paper" else paper_collapsed)))
                              for d, v in verdicts.items() for s in ("paper", "label_covering")])
        return ablations.remedy_verdicts(table, datasets)["label_covering"]

    helps = {"trec": "ahead", "sst5": "within the spread", "sst2": "within the spread", "teh": "within the spread"}
    assert verdict(helps)["recommend"] is True
    hurts_strong = verdict({**helps, "sst2": "behind"})
    assert hurts_strong["recommend"] is False and hurts_strong["behind_on"] == ["sst2"]
    assert verdict({**helps, "sst5": "behind"})["recommend"] is False
    assert verdict({**helps, "trec": "within the spread"})["recommend"] is False
    assert verdict({**helps, "trec": "within the spread", "sst2": "ahead"})["recommend"] is False  # strong set only
    collapsed = verdict(helps, collapsed=("trec",))
    assert collapsed["recommend"] is False and collapsed["collapsed_on"] == ["trec"]
    # A collapse the paper's ABFT shares (TEH) is not the remedy's doing.
    assert verdict(helps, collapsed=("teh",), paper_collapsed=("teh",))["recommend"] is True
    # Not decided before every data set has its verdict: the strong ones may yet be hurt.
    undecided = verdict({"trec": "ahead", "sst5": "within the spread"})
    assert undecided["recommend"] is None and undecided["missing"] == ["sst2", "teh"]
    no_paper = pd.DataFrame([dict(dataset="trec", setting="label_covering", collapsed_seeds=0)])
    assert ablations.remedy_verdicts(no_paper, datasets) == {}


def test_lr_choice_table_scores_each_rule_by_the_test_accuracy_of_the_lr_it_picks(ablations):
    validation = pd.DataFrame([dict(dataset="trec", setting=f"lr={lr:g}", seed=42, lr=lr, step=step, validation_accuracy=v)
                               for lr, values in ((1e-4, (0.3, 0.4, 0.5, 0.6, 0.7)), (1e-3, (0.3, 0.6, 0.6, 0.5, 0.4)))
                               for step, v in zip((0, 8, 16, 24, 32), values, strict=True)])
    results = pd.DataFrame([dict(dataset="trec", setting="lr=0.0001", seed=42, lr=1e-4, accuracy=0.55, macro_f1=0.5),
                            dict(dataset="trec", setting="lr=0.001", seed=42, lr=1e-3, accuracy=0.45, macro_f1=0.3)])
    # Another setting kept checkpoints at one of the grid's lrs (--keep-checkpoints): it chooses nothing.
    other = pd.DataFrame([dict(dataset="trec", setting="no_pid", seed=42, lr=1e-4, step=step, validation_accuracy=0.99)
                          for step in (8, 16, 24, 32)])
    table = ablations.lr_choice_table(results, pd.concat([validation, other]), search_step=8).set_index("rule")
    assert table.loc["search", "lr"] == 1e-3 and table.loc["search", "regret"] == pytest.approx(0.10)
    assert table.loc["search", "test_macro_f1"] == 0.3 and table.loc["full_length", "test_macro_f1"] == 0.5
    assert table.loc["search", "macro_f1_regret"] == pytest.approx(0.2) and table.loc["full_length", "macro_f1_regret"] == 0
    assert table.loc["full_length", "lr"] == 1e-4 and table.loc["full_length", "regret"] == 0.0
    # Mean over steps 8-32: 0.55 at 1e-4, 0.525 at 1e-3 (step 0, the base model, is left out).
    assert table.loc["checkpoints", "lr"] == 1e-4


def test_tiny_ablation_benchmark_runs_every_experiment_in_process_and_resumes(ablations, tiny_gpt2, tiny_gpt2_dir,
                                                                               tmp_path):
    from abft_lens.figures import make_figures

    params = trainable_parameters(tiny_gpt2, "qk")
    before = snapshot(params)
    out = tmp_path / "results" / "ablations"
    argv = ["--tiny", "--in-process", "--model", str(tiny_gpt2_dir), "--precision", "fp32", "--out", str(out)]
    ablations.main(argv, model=tiny_gpt2)

    results = pd.read_csv(out / "results.csv").set_index("setting")
    vanilla_metrics = json.loads((Path(results.loc["vanilla", "run_dir"]) / "metrics.json").read_text())
    assert vanilla_metrics["model_or_run"] == str(tiny_gpt2_dir), "the evaluation names the model --model gave"
    # Table 4 (5), the grid (16 more), sizes (vanilla + 2 methods x 2 sizes), 4 remedies, 2 lrs.
    assert len(results) == 5 + 16 + 5 + 4 + 2 and results.index.is_unique
    assert results["accuracy"].between(0, 1).all() and results["macro_f1"].notna().all()
    assert not results.loc["no_pid", "pid"] and results.loc["all_heads", "heads"] == "all"
    assert results.loc["reward_only", "terms"] == "reward" and results.loc["punish_only", "terms"] == "punish"
    assert results.loc["a0=0.25,b0=2", ["initial_punish_weight", "reward_weight"]].tolist() == [0.25, 2.0]
    assert results.loc["label_covering", "share_without_query_label"] == 0.0
    assert results.loc["label_covering_resampled", "share_without_query_label"] == 0.0
    assert results.loc["label_covering+relative_pid", "pid_input"] == "relative"
    assert results.loc["e2e-lora_n=8", ["method", "n_train", "n_val"]].tolist() == ["e2e-lora", 8, 0]  # the paper's E2E
    assert results.loc["vanilla", "train_seconds"] == 0 and results.loc["lr=0.01", "lr"] == 0.01
    assert (results.drop(index="vanilla")["lr_source"] != "search").all()  # --tiny gives the lr
    table4 = pd.read_csv(out / "table4.csv").set_index("setting")
    assert table4.loc["paper", "relative_train_time"] == 1.0 and table4["relative_train_time"].notna().all()
    steps = pd.read_csv(out / "steps.csv")
    assert len(steps) == 2 * (len(results) - 1)  # every trained piece, 2 steps each
    validation = pd.read_csv(out / "validation.csv")
    assert sorted(validation.groupby("setting")["step"].apply(list).tolist()) == [[0, 1, 2], [0, 1, 2]]
    assert set(pd.read_csv(out / "lr_choice.csv")["rule"]) == {"search", "checkpoints", "full_length"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pieces"] == len(results) and "--in-process" in summary["command"]
    stems = ("table4", "fig5", "fig6_sst2", "fig2", "remedies", "lr_choice")
    assert all((out / f"{stem}.html").is_file() for stem in stems)
    for name, value in snapshot(params).items():
        assert torch.equal(value, before[name]), f"{name} changed"

    # Without the head filter the loss acts on every head; the PID counts those above the threshold.
    all_heads = steps[steps["setting"] == "all_heads"]
    assert (all_heads["flagged_heads"] == tiny_gpt2.cfg.n_layers * tiny_gpt2.cfg.n_heads).all()
    assert (all_heads["induction_heads"] <= all_heads["flagged_heads"]).all()
    paper = steps[steps["setting"] == "paper"]
    assert paper["induction_heads"].tolist() == paper["flagged_heads"].tolist()

    # A second run finds every piece finished and trains nothing.
    mtime = (out / "results.csv").stat().st_mtime_ns
    ablations.main(argv, model=tiny_gpt2)
    assert (out / "results.csv").stat().st_mtime_ns == mtime

    # One experiment at a time: its summary keeps the other experiments' tables whole.
    ablations.main([*argv, "--experiments", "fig6", "--summarise-only"], model=tiny_gpt2)
    assert set(pd.read_csv(out / "table4.csv")["setting"]) == set(table4.index)
    assert json.loads((out / "summary.json").read_text())["pieces"] == len(results)

    # Resuming the finished pieces in another precision is refused before anything runs.
    in_bf16 = [("bf16" if previous == "--precision" else arg) for previous, arg in zip(["", *argv], argv)]
    with pytest.raises(DataError, match="ran in fp32.*would use bf16"):
        ablations.main(in_bf16, model=tiny_gpt2)

    # `abft-lens figures` draws the same figures, with the paper's figure or table number in each title.
    report = make_figures([tmp_path / "results"], tmp_path / "figures", png=False)
    written = {path.name for path in report.written}
    assert {f"{stem}_ablations.html" for stem in stems} <= written
    assert "accuracy_ablations.html" not in written  # not the paper-claim figure
    html = (tmp_path / "figures" / "fig6_sst2_ablations.html").read_text()
    assert "Fig. 6 (paper)" in html


def test_fig6_cells_give_macro_f1_and_collapse_and_one_seed_fig2_points_carry_their_standard_error():
    from abft_lens.ablation_figures import initial_weights_figure, training_size_figure

    cells = pd.DataFrame([dict(pid=pid, initial_punish_weight=a, reward_weight=b, accuracy=acc, macro_f1=f1,
                               collapsed_onto=onto)
                          for pid in (True, False)
                          for a, b, acc, f1, onto in ((0.5, 1.0, 0.86, 0.85, None), (0.25, 1.0, 0.55, 0.36, "positive"))])
    heatmap = initial_weights_figure(cells, "Fig. 6").data[0]
    assert list(heatmap.y) == ["0.25", "0.5"] and list(heatmap.x) == ["1"]
    assert heatmap.text.tolist() == [["0.550 †<br>F1 0.360"], ["0.860<br>F1 0.850"]]

    sizes = pd.DataFrame([dict(dataset="sst2", method=method, n_train=n, seed=42, accuracy=0.75, macro_f1=0.7,
                               n_inputs=1024, collapsed_onto="positive" if (method, n) == ("abft", 32) else None)
                          for method in ("abft", "e2e-lora") for n in (32, 128)])
    figure = training_size_figure(sizes, "Fig. 2")
    traces = {trace.name: trace for trace in figure.data}
    assert list(traces["abft (ours)"].error_y.array) == pytest.approx([(0.75 * 0.25 / 1024) ** 0.5] * 2)
    assert list(traces["abft (ours)"].text) == ["†", ""] and list(traces["e2e-lora (ours)"].text) == ["", ""]
    assert list(traces["e2e-lora (ours)"].x) == [32, 128] and "e2e (ours)" not in traces
    assert list(figure.layout.xaxis.tickvals) == [32, 128]  # the sizes themselves, not log-axis minor ticks


def test_settings_figure_marks_the_bars_of_a_collapsed_setting():
    from abft_lens.ablation_figures import settings_figure

    rows = pd.DataFrame([dict(dataset=d, setting=name, seed=42, accuracy=0.5, macro_f1=0.4, n_inputs=1024,
                              collapsed_onto="anger" if (d, name) == ("tee", "paper") else None)
                         for d in ("trec", "tee") for name in ("paper", "label_covering")])
    figure = settings_figure(rows, "Remedies")
    marks = {(trace.name, x): text for trace in figure.data for x, text in zip(trace.x, trace.text, strict=True)}
    assert marks[("paper", "tee")] == "†" and marks[("paper", "trec")] == ""
    assert marks[("label_covering", "tee")] == "" and "collapsed onto one label" in figure.layout.title.text


# --- bench_cost (issue 14): each method's step time, activation memory and Param.* --------------------------


def test_cost_benchmark_measures_every_method_and_leaves_the_model_as_it_was(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    from abft_lens.lora import has_lora

    cost = load_benchmark_script("bench_cost")
    precision = sys.modules["bench_precision"]
    train, _ = precision.speed_prompts(tiny_gpt2)
    before = {name: p.detach().clone() for name, p in tiny_gpt2.named_parameters()}
    counts = {method: cost.parameter_counts(tiny_gpt2, method, "fp32", train) for method in cost.METHODS}
    assert precision.saved_activation_mb(tiny_gpt2, "e2e-lora", "fp32", train) > 0
    precision.timed_steps(tiny_gpt2, "abft-lora", "fp32", train, 2)
    assert not has_lora(tiny_gpt2)
    after = dict(tiny_gpt2.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    # Param.*: E2E adds the LM head to what it trains, ABFT does not; LoRA trains far fewer parameters.
    lm_head = tiny_gpt2.W_U.numel()
    assert counts["abft"]["full_precision_params"] == counts["abft"]["trainable_params"]
    assert counts["e2e"]["full_precision_params"] == counts["e2e"]["trainable_params"] + lm_head
    assert counts["e2e-lora"]["full_precision_params"] == counts["e2e-lora"]["trainable_params"] + lm_head
    assert counts["abft-lora"]["trainable_params"] < counts["abft"]["trainable_params"]

    out = tmp_path / "cost"
    cost.main(["--model", str(tiny_gpt2_dir), "--precision", "fp32", "--repeats", "1", "--out", str(out)])
    table = pd.read_csv(out / "summary.csv").set_index("method")
    assert list(table.index) == list(cost.METHODS)
    for method in cost.METHODS:  # in full, not to the table's 4 significant digits
        assert table.loc[method, "full_precision_params"] == counts[method]["full_precision_params"], method
    assert table.loc["abft", "seconds_per_step_vs_abft"] == 1.0 and (table["seconds_per_step"] > 0).all()
    assert json.loads((out / "summary.json").read_text())["command"].endswith(f"--out {out}")
    with pytest.raises(SystemExit):  # never into a folder that holds results
        cost.parse_args(["--out", str(out)])

    from abft_lens.figures import make_figures

    written = make_figures([tmp_path], tmp_path / "figures", png=False).written
    page = next(path for path in written if path.name.startswith("table2_cost")).read_text()
    assert all(f'"name":"{method}"' in page for method in cost.METHODS)


def test_peak_rss_sees_memory_allocated_and_freed_inside_the_block():
    import time

    from abft_lens.benchmarking import PeakRSS

    with PeakRSS() as memory:
        block = b"\x01" * (64 * 2**20)  # filled, so every page is resident
        # Held until the sampler has seen it (at most 5 s): a fixed 50 ms was sometimes too short for the
        # sampling thread to get the GIL after the earlier tests of a full run, which made this test flaky.
        deadline = time.monotonic() + 5
        while memory.added_mb < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        del block  # 64 MiB is above glibc's largest mmap threshold: freeing it returns the pages
    # Only the sampling thread saw the peak: at the block's end the memory is gone again.
    assert memory.added_mb >= 60
    assert memory.peak >= memory.baseline


def test_label_coverage_counts_training_prompts_without_the_query_s_label(smollm2, tmp_path):
    coverage = load_benchmark_script("label_coverage")
    table = coverage.coverage_rows(smollm2, ["trec", "sst2"], [42]).set_index("dataset")
    # Six labels and k = 4 leave many prompts without the query's label, two labels few; the
    # label-covering sampler leaves none, and every prompt of the paper's recipe is counted.
    assert table.loc["trec", "random"] > 0.3 and table.loc["sst2", "random"] < 0.15
    assert (table["label_covering"] == 0).all() and (table["label_covering_resampled"] == 0).all()
    assert (table["n_prompts"] == 512).all()
    assert table.loc["trec", "balanced_random"] == pytest.approx((5 / 6) ** 4)
    # Forcing one demonstration of the query's label over-represents it: about 1/4 + 3/4 x 1/2 = 0.625 of
    # SST-2's demonstrations against about 1/2 with random ones (1/4 + 3/4 x 1/6 = 0.375 against 1/6 on TREC).
    for dataset, labels in (("sst2", 2), ("trec", 6)):
        assert table.loc[dataset, "query_label_demos_random"] == pytest.approx(1 / labels, abs=0.06)
        assert table.loc[dataset, "query_label_demos_label_covering"] == pytest.approx(1 / 4 + 3 / (4 * labels), abs=0.06)
        # Redrawing random sets until one covers the label: random's mix given coverage, (1/n) / (1 - (1 - 1/n)^4).
        assert table.loc[dataset, "query_label_demos_label_covering_resampled"] == pytest.approx(
            (1 / labels) / (1 - (1 - 1 / labels) ** 4), abs=0.03)  # forced: 0.625 and 0.375
    out = tmp_path / "coverage.csv"
    out.write_text("mine\n")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "label_coverage.py"), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "exists" in done.stderr and "Traceback" not in done.stderr
    assert out.read_text() == "mine\n"  # the user's file is left alone
    # Bad input stops before the model loads; a bare run does not stop on the committed table.
    for args in (["--out", str(tmp_path)], ["--out", str(out / "under_a_file.csv")], ["--datasets", "imdb"]):
        with pytest.raises(SystemExit) as stop:
            coverage.parse_args(args)
        assert stop.value.code == 2, args
    assert coverage.parse_args(["--overwrite"]).out.name != "label_coverage_smollm2.csv"


def _grid_folder(root, abft_accuracy=0.75):
    """A benchmark folder as the grid writes it: results.csv rows for vanilla, calibration and ABFT on SST-2,
    their predictions (8 queries x 2 demonstration sets, repeat-major as evaluate writes them) and
    metrics.json files naming the label words; vanilla and ABFT also have a symbols test."""
    truth = ["negative", "positive"] * 4 * 2  # query q has label q % 2 in both demonstration sets
    base = pd.DataFrame({"query": list(range(8)) * 2, "repeat": [0] * 8 + [1] * 8, "true_label": truth,
                         "predicted_label": ["negative"] * 16, "calibrated_label": truth[:12] + ["positive", "negative"] * 2})
    trained = base.drop(columns="calibrated_label").assign(predicted_label=truth[:8] + ["positive"] * 8)
    base_dir, abft_dir = root / "runs" / "sst2_base_seed42", root / "runs" / "sst2_abft_seed42" / "evaluate_sst2"
    for folder, frame in ((base_dir, base), (abft_dir, trained)):
        folder.mkdir(parents=True)
        frame.to_csv(folder / "predictions.csv", index=False)
        (folder / "metrics.json").write_text(json.dumps({"predicted_distribution": {"negative": 0.5, "positive": 0.5},
                                                         "symbols_label_words": ["A", "B"]}))
    for folder, frame in ((base_dir, base.drop(columns="calibrated_label")), (abft_dir, trained)):
        frame.replace({"negative": "A", "positive": "B"}).to_csv(folder / "predictions_icl_symbols.csv", index=False)
    run = "benchmarks/results/grid/runs/sst2_{}_seed42"
    pd.DataFrame([dict(dataset="sst2", method=m, seed=42, accuracy=a, macro_f1=f, symbols_accuracy=sa,
                       symbols_macro_f1=sf, run_dir=run.format(piece)) for m, piece, a, f, sa, sf in
                  (("vanilla", "base", 0.5, 1 / 3, 0.5, 1 / 3), ("calibration", "base", 0.75, 0.75, None, None),
                   ("abft", "abft", abft_accuracy, 0.733333, 0.75, 0.733333))]).to_csv(root / "results.csv", index=False)
    return root


def test_paired_differences_pair_methods_input_by_input_from_a_grid_folder(tmp_path):
    script = load_benchmark_script("paired_differences")
    folder = _grid_folder(tmp_path / "grid")
    script.main([str(folder), "--n-boot", "50"])
    out = folder / "paired_differences.csv"
    table = pd.read_csv(out).set_index(["test", "second"])
    # Calibration has no symbols test (its answers there would be vanilla's): nothing to pair.
    assert sorted(table.index) == [("ordinary", "abft"), ("ordinary", "calibration"), ("symbols", "abft")]
    assert (table["first"] == "vanilla").all()
    # vanilla answers 'negative' ('A') always (macro-F1 1/3); ABFT is right on the first half, 'positive' after.
    for test in ("ordinary", "symbols"):
        assert table.loc[(test, "abft"), "accuracy_difference"] == pytest.approx(0.25)
        assert table.loc[(test, "abft"), "macro_f1_difference"] == pytest.approx(0.733333 - 1 / 3, abs=1e-5)
    assert (table["n_groups"] == 8).all() and (table["accuracy_difference_se"] > 0).all()
    # A rerun where some predictions are gone keeps the rows it cannot recompute.
    (folder / "runs" / "sst2_abft_seed42" / "evaluate_sst2" / "predictions.csv").unlink()
    script.main([str(folder), "--n-boot", "50"])
    again = pd.read_csv(out).set_index(["test", "second"])
    pd.testing.assert_frame_equal(again.sort_index(), table.sort_index())  # the kept row's values too
    # With no pair left, or answers that do not give results.csv's numbers, it stops with one line, exit 2.
    for name in ("predictions.csv", "predictions_icl_symbols.csv"):
        (folder / "runs" / "sst2_base_seed42" / name).unlink()
    mismatched = _grid_folder(tmp_path / "other", abft_accuracy=0.9)
    for bad, message in ((folder, "no two methods"), (mismatched, "results.csv reports")):
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paired_differences.py"), str(bad),
                               "--n-boot", "10"], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
