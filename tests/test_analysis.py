"""Specification of `analysis/`: the E2E gradient's path parts add up to the back-propagated
gradient, the sign test counts what it says, the landscape evaluates the interpolated weights and
restores the model, and the commands reach the CLI through the entry point.

Identities and plumbing run on the tiny random GPT-2; the pipeline runs once on the real SmolLM2
at a tiny size (one short prompt, k = 2, three layers)."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from abft_lens.data import Example, load_dataset
from abft_lens.evaluation import predict
from abft_lens.prompts import build_prompts
from abft_lens.training import FinetuneConfig, finetune, load_trained_model, snapshot, trainable_qk_parameters
from analysis.dynamics import read_metrics
from analysis.figures import dynamics_figure
from analysis.gradients import (
    GradientConfig,
    QKParameters,
    analyze_gradients,
    label_column_masks,
    prompt_gradients,
    sign_test,
    split_pattern_gradient,
    wilson_interval,
)
from analysis.landscape import barrier, best_path, interpolate, landscape_prompts, read_run, weight_landscape
from plotted import plotted_traces

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short_sst2(sst2) -> list[Example]:
    """Short real SST-2 sentences (both labels): short prompts, fast tests."""
    return [e for e in sst2.examples if len(e.text) < 50][:80]


@pytest.fixture(scope="module")
def tiny_gpt2_f64(tiny_gpt2_dir):
    from abft_lens.models import load_model

    return load_model(str(tiny_gpt2_dir), dtype=torch.float64)


# --- pure pieces -------------------------------------------------------------------------------------


def test_label_column_masks_mark_correct_and_wrong_label_positions():
    positions = torch.tensor([[2, 5, 7], [1, 3, 4]])
    correct = torch.tensor([[True, False, True], [False, False, True]])
    plus, minus = label_column_masks(positions, correct, key_len=9)
    assert plus[0].nonzero().flatten().tolist() == [2, 7] and minus[0].nonzero().flatten().tolist() == [5]
    assert plus[1].nonzero().flatten().tolist() == [4] and minus[1].nonzero().flatten().tolist() == [1, 3]


def test_pattern_gradient_pieces_are_disjoint_and_sum_to_the_whole():
    torch.manual_seed(0)
    grad = torch.randn(2, 3, 6, 6)
    plus, minus = label_column_masks(torch.tensor([[1, 3], [2, 4]]), torch.tensor([[True, False], [False, False]]), 6)
    pieces = split_pattern_gradient(grad, plus, minus)
    assert torch.equal(pieces["correct"] + pieces["wrong"] + pieces["rest"], grad)
    # Only the query row (last position) carries the label pieces.
    assert pieces["correct"][:, :, :-1].abs().sum() == 0 and pieces["wrong"][:, :, :-1].abs().sum() == 0
    assert torch.equal(pieces["correct"][0, :, -1, 1], grad[0, :, -1, 1])
    assert torch.equal(pieces["wrong"][1, :, -1, 2], grad[1, :, -1, 2])
    assert pieces["correct"][1].abs().sum() == 0, "prompt 1 has no correct demonstration"


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # NaN for no data


def test_sign_test_counts_each_criterion_over_the_pairs_where_it_is_defined():
    pairs = pd.DataFrame({
        "direction": "e2e",
        "prompt": [0, 0, 1, 1, 2],
        "dS_plus": [0.1, -0.2, 0.3, 0.05, 0.0],
        "dS_minus": [-0.1, -0.3, 0.2, 0.0, -0.4],
        "has_correct": [True, True, True, True, False],
        "has_wrong": [True, True, True, True, True],
    })
    table = sign_test(pairs).set_index("criterion")
    assert table.loc["correct_up", "pairs"] == 4 and table.loc["correct_up", "successes"] == 3
    assert table.loc["wrong_down", "pairs"] == 5 and table.loc["wrong_down", "successes"] == 3
    assert table.loc["both", "successes"] == 1  # only the first pair moves both ways at once
    assert table.loc["margin_up", "successes"] == 4  # dS_plus - dS_minus = 0.2, 0.1, 0.1, 0.05
    for _, row in table.iterrows():
        assert row["wilson_low"] <= row["fraction"] <= row["wilson_high"]
        assert row["bootstrap_low"] <= row["bootstrap_high"]


def test_barrier_is_the_drop_below_the_straight_line():
    t = np.linspace(0, 1, 5)
    assert barrier(np.array([0.6, 0.7, 0.8, 0.9, 1.0]), t) == 0.0
    assert barrier(np.array([0.6, 0.5, 0.8, 0.9, 1.0]), t) == pytest.approx(0.2)


def test_best_path_goes_around_a_valley():
    xs = [0.0, 1.0, 2.0]
    accuracy = {(0, 0): 0.9, (1, 0): 0.2, (2, 0): 0.9,  # a valley on the straight line y = 0
                (0, 1): 0.8, (1, 1): 0.85, (2, 1): 0.8,
                (0, 2): 0.1, (1, 2): 0.1, (2, 2): 0.1}
    grid = pd.DataFrame([{"l_e2e": xs[i], "l_abft": xs[j], "accuracy": a} for (i, j), a in accuracy.items()])
    route, lowest = best_path(grid, (0.0, 0.0), (2.0, 0.0))
    assert lowest == 0.85 and route == [(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)]  # diagonal steps allowed


# --- the decomposition on the tiny model ----------------------------------------------------------------


def test_path_parts_add_up_to_the_backpropagated_gradient(tiny_gpt2_f64, sst2, short_sst2):
    prompts = build_prompts(tiny_gpt2_f64.tokenizer, sst2, short_sst2, n_prompts=8, k=4, seed=1)
    mixed = next(i for i, p in enumerate(prompts.prompts) if p.I_plus and p.I_minus)
    params = QKParameters.of(tiny_gpt2_f64)
    for softmax in ("label", "vocab"):
        result = prompt_gradients(tiny_gpt2_f64, prompts.collate([mixed]), params, softmax=softmax,
                                  threshold="uniform", tau=1.0)
        assert max(result.identity_error) < 1e-10
        for layer in range(len(params.layers)):
            summed = [sum(result.e2e[p][layer][j] for p in ("correct", "wrong", "rest")) for j in range(2)]
            for part, whole in zip(summed, result.full[layer], strict=True):
                torch.testing.assert_close(part, whole, rtol=1e-10, atol=1e-14)
            for piece in ("correct", "wrong", "rest"):
                assert all(t.abs().sum() > 0 for t in result.e2e[piece][layer]), f"{piece} of layer {layer} is zero"
        assert any(t.abs().sum() > 0 for pair in result.abft for t in pair), "no ABFT gradient"


def test_gqa_heads_are_sliced_by_their_kv_group():
    from analysis.gradients import kv_group, per_head

    assert [kv_group(h, 9, 3) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    weight = torch.arange(6 * 2).reshape(6, 2).float()  # 3 heads of d_head 2
    assert torch.equal(per_head(weight, 3)[1], weight[2:4])


def test_analysis_leaves_the_weights_and_grad_flags_unchanged(tiny_gpt2, sst2, short_sst2):
    prompts = build_prompts(tiny_gpt2.tokenizer, sst2, short_sst2, n_prompts=3, k=4, seed=2)
    before = {name: p.detach().clone() for name, p in tiny_gpt2.named_parameters()}
    flags = {name: p.requires_grad for name, p in tiny_gpt2.named_parameters()}
    result = analyze_gradients(tiny_gpt2, prompts, GradientConfig(threshold="uniform", tau=1.0), progress=False)
    for name, p in tiny_gpt2.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad == flags[name]
    assert set(result.layers["layer"]) == {0, 1} and len(result.heads) == 2 * 4
    assert result.summary["max_identity_error"] < 1e-5
    assert set(result.sign["direction"]) == {"e2e", "abft", "e2e_mean"}
    # Along the ABFT gradient the ABFT objective improves: the sign convention check.
    abft = result.sign.set_index(["direction", "criterion"]).loc[("abft", "margin_up")]
    assert abft["fraction"] >= 0.8


# --- the real model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_pipeline_decomposes_and_agrees_in_sign_with_abft(smollm2, sst2, short_sst2, tmp_path):
    """SmolLM2 at a tiny size: one short prompt with a correct and a wrong demonstration (k = 2),
    three layers decomposed."""
    from analysis.jobs import write_gradient_analysis

    prompts = build_prompts(smollm2.tokenizer, sst2, short_sst2, n_prompts=8, k=2, seed=3)
    prompts = prompts.subset([next(i for i, p in enumerate(prompts.prompts) if p.I_plus and p.I_minus)])
    pristine = snapshot(trainable_qk_parameters(smollm2))
    config = GradientConfig(layers=(3, 10, 20), sign_test_aggregate=False)
    result = analyze_gradients(smollm2, prompts, config, progress=False)
    assert all(torch.equal(p, pristine[n]) for n, p in trainable_qk_parameters(smollm2).items())
    assert result.summary["max_identity_error"] < 1e-4
    layers = result.layers.set_index("layer")
    assert (layers["norm_correct"] > 0).all() and (layers["norm_rest"] > 0).all()
    assert result.summary["mean_flagged_heads_per_prompt"] >= 1, "SmolLM2 has label-attending heads"
    # 9 query heads share 3 KV groups; per-head W_K numbers are the group's.
    heads = result.heads
    assert len(heads) == 3 * 9 and heads.groupby(["layer", "kv_group"])["cos_full_abft_k"].nunique().max() == 1
    abft = result.sign.set_index(["direction", "criterion"]).loc[("abft", "margin_up")]
    assert abft["fraction"] >= 0.8, "descending ABFT must raise correct-minus-wrong attention"
    written = write_gradient_analysis(result, tmp_path, "smollm2 on sst2")
    assert {p.name for p in written} >= {"layer_cosines.html", "gradient_components.html", "head_cosines.html",
                                         "sign_test.html"}
    assert pd.read_csv(tmp_path / "layers.csv")["layer"].tolist() == [3, 10, 20]


# --- landscape and dynamics from real (tiny) fine-tuning runs -------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tiny_gpt2, tiny_gpt2_dir, short_sst2, tmp_path_factory):
    """An ABFT and an E2E run of abft_lens.training on the tiny GPT-2 (2 steps each, all heads)."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "short_sst2.csv"
    sst2_words = ("negative", "positive")
    pd.DataFrame({"text": [e.text for e in short_sst2], "label": [sst2_words[e.label] for e in short_sst2]}).to_csv(
        data, index=False)
    pristine = snapshot(trainable_qk_parameters(tiny_gpt2))
    dataset = load_dataset(str(data))
    runs = {}
    for method in ("abft", "e2e"):
        config = FinetuneConfig(model=str(tiny_gpt2_dir), dataset=str(data), method=method, n_train=4, n_val=0, k=2,
                                lr=3e-2, batch_size=2, micro_batch_size=2, steps=2, heads="all", seed=0,
                                out=str(root / method))
        train = build_prompts(tiny_gpt2.tokenizer, dataset, dataset.examples[:20], n_prompts=4, k=2, seed=0)
        finetune(tiny_gpt2, train, config, progress=False)
        runs[method] = root / method
        from abft_lens.training import apply_tensors

        apply_tensors(tiny_gpt2, pristine)
    return runs


def test_landscape_evaluates_the_interpolated_weights_and_restores_the_model(tiny_gpt2, tiny_gpt2_dir, tiny_runs):
    before = snapshot(trainable_qk_parameters(tiny_gpt2))
    result = weight_landscape(tiny_gpt2, str(tiny_gpt2_dir), tiny_runs["abft"], tiny_runs["e2e"], grid=2, low=0.0,
                              high=1.0, n_test=8, path_points=3, progress=False)
    after = snapshot(trainable_qk_parameters(tiny_gpt2))
    assert all(torch.equal(before[n], after[n]) for n in before), "W_Q/W_K restored"
    assert len(result.grid) == 4 and set(result.paths["segment"]) == {"base -> ABFT", "ABFT -> E2E", "base -> E2E"}
    record, _ = read_run(tiny_runs["e2e"])
    prompts = landscape_prompts(tiny_gpt2, record, 8, 1, 42)
    base = predict(tiny_gpt2, prompts, progress=False)
    e2e_model = load_trained_model(tiny_runs["e2e"])
    e2e = predict(e2e_model, prompts, progress=False)
    assert not torch.equal(base.logits, e2e.logits), "the E2E run moved the weights"
    accuracy = lambda p: float((p.predicted == p.true).double().mean())  # noqa: E731
    assert result.summary["accuracy_base"] == accuracy(base)
    assert result.summary["accuracy_e2e"] == accuracy(e2e)
    grid = result.grid.set_index(["l_e2e", "l_abft"])
    assert grid.loc[(1.0, 0.0), "true_label_probability"] == pytest.approx(
        float(e2e.probabilities.gather(1, e2e.true[:, None]).mean()), abs=1e-5)
    assert result.summary["best_mix"]["accuracy"] == result.grid["accuracy"].max()


def test_interpolation_hits_the_three_models():
    base, e2e, abft = {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}
    assert torch.equal(interpolate(base, e2e, abft, 1.0, 0.0)["w"], e2e["w"])
    assert torch.equal(interpolate(base, e2e, abft, 0.0, 1.0)["w"], abft["w"])
    assert torch.equal(interpolate(base, e2e, abft, 0.5, 0.5)["w"], torch.tensor([0.5, 1.0]))


def test_dynamics_reads_both_methods_and_draws_correct_and_wrong_curves(tiny_runs):
    metrics = read_metrics([tiny_runs["abft"], tiny_runs["e2e"]])
    assert set(metrics["method"]) == {"abft", "e2e"} and metrics.groupby("method")["step"].max().tolist() == [2, 2]
    figure = dynamics_figure(metrics)
    assert len(figure.data) == 4 and {trace.line.dash for trace in figure.data} == {"solid", "dash"}


# --- the command line ---------------------------------------------------------------------------------


def test_commands_reach_the_cli_through_the_entry_point_and_abft_lens_never_imports_analysis():
    points = [ep for ep in importlib.metadata.entry_points(group="abft_lens.commands") if ep.name == "analysis"]
    assert points, "no `analysis` entry point in group abft_lens.commands: is the package installed?"
    register = points[0].load()
    # The installed name lags pyproject.toml until the environment is reinstalled; either way the entry
    # point loads this repository's analysis/cli.py (an editable install) or a copy of it.
    assert Path(inspect.getsourcefile(register)).parts[-2:] in {("analysis", "cli.py"), ("abft_lens_analysis", "cli.py")}
    app = typer.Typer()
    register(app)
    assert {c.name for c in app.registered_commands} == {"analyze-gradients", "landscape", "dynamics"}
    for source in (REPO / "abft_lens").rglob("*.py"):
        text = source.read_text()
        assert "import analysis" not in text and "from analysis" not in text, source


def test_analysis_installs_under_a_name_that_cannot_collide():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"abft_lens_analysis": "analysis"}
    assert all(name.split(".")[0] in ("abft_lens", "abft_lens_analysis") for name in setuptools["packages"])
    assert project["project"]["entry-points"]["abft_lens.commands"] == {"analysis": "abft_lens_analysis.cli:register"}
    # Every package under analysis/ is listed (setuptools would leave an unlisted one out of the wheel).
    listed = {name.replace("abft_lens_analysis", "analysis") for name in setuptools["packages"]}
    found = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "analysis").rglob("__init__.py")}
    found |= {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "abft_lens").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
    # Inside analysis/ only relative imports name the package, so it works under its installed name.
    for source in (REPO / "analysis").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(name.split(".")[0] == "analysis" for name in names), f"{source}: import {names}"


def test_landscape_and_dynamics_commands_write_csv_figures_and_config(tiny_gpt2_dir, tiny_runs, tmp_path):
    from analysis.cli import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "landscape"
    result = runner.invoke(app, ["landscape", "--base", str(tiny_gpt2_dir), "--abft", str(tiny_runs["abft"]),
                                 "--e2e", str(tiny_runs["e2e"]), "--grid", "3", "--n-test", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "best mix" in result.output
    assert len(pd.read_csv(out / "landscape.csv")) == 9
    assert json.loads((out / "config.json").read_text())["config"]["grid"] == 3
    assert "best_grid_path_abft_to_e2e" not in json.loads((out / "summary.json").read_text()), "1.0 is off a 3-grid"
    assert (out / "landscape.html").is_file()
    result = runner.invoke(app, ["dynamics", str(tiny_runs["abft"]), str(tiny_runs["e2e"]), "--out", str(tmp_path / "dyn")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dyn" / "dynamics.html").is_file() and (tmp_path / "dyn" / "dynamics.csv").is_file()


def test_analysis_figures_are_redrawn_from_saved_results(tmp_path):
    """`abft-lens figures` reaches the analysis through its registered source; here on the committed
    SmolLM2 results (gradient analysis, training dynamics and landscape on SST-2)."""
    import shutil

    from analysis.jobs import redraw_figures

    results = Path(__file__).resolve().parents[1] / "analysis" / "results"
    for name in ("gradients_sst2", "dynamics_sst2", "landscape_sst2"):
        shutil.copytree(results / name, tmp_path / "saved" / name)
    written = redraw_figures([tmp_path / "saved"], tmp_path / "figures", png=False)
    assert sorted(path.name for path in written) == [
        "dynamics_sst2.html", "gradients_sst2_components.html", "gradients_sst2_head_cosines.html",
        "gradients_sst2_layer_cosines.html", "gradients_sst2_sign_test.html", "landscape_sst2.html"]
    # The landscape page draws the saved grid: accuracy at (E2E share, ABFT share) = (x, y).
    contour = plotted_traces(next(p for p in written if p.name == "landscape_sst2.html"))["contour"]
    saved = pd.read_csv(results / "landscape_sst2" / "landscape.csv").pivot(index="l_abft", columns="l_e2e",
                                                                             values="accuracy")
    assert np.allclose(contour["x"], saved.columns) and np.allclose(contour["y"], saved.index)
    assert np.allclose(contour["z"], saved.to_numpy())
