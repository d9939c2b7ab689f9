"""The `abft-lens` command line and the find-heads run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from abft_lens.find_heads import HEADS_COLUMNS, FindHeadsConfig, find_heads


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abft_lens", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=cwd, timeout=600)


def test_find_heads_cli_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    result = run_cli("find-heads", "smollm2-135m", "--dataset", "sst2", "--n-prompts", "8", "--top", "5",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Top 5 heads of smollm2-135m on sst2" in result.stdout
    table = pd.read_csv(out / "heads.csv")
    assert tuple(table.columns) == HEADS_COLUMNS
    assert len(table) == 270 and table["rank"].tolist() == list(range(1, 271))
    assert table["label_mass"].iloc[0] > 5 * table["uniform_mass"].iloc[0]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["model"] == "smollm2-135m" and config["config"]["n_prompts"] == 8
    assert config["versions"]["transformer-lens"].startswith("4.")
    html = (out / "heatmap.html").read_text()
    assert "plotly.min.js" in html and "correctness" in html
    assert (out / "plotly.min.js").stat().st_size > 1_000_000, "figures open offline"


def test_same_seed_same_model_gives_identical_heads_csv(smollm2, tmp_path):
    config = FindHeadsConfig(n_prompts=6, seed=7, out=str(tmp_path / "a"))
    find_heads(config, model=smollm2, progress=False)
    find_heads(FindHeadsConfig(n_prompts=6, seed=7, out=str(tmp_path / "b")), model=smollm2, progress=False)
    find_heads(FindHeadsConfig(n_prompts=6, seed=8, out=str(tmp_path / "c")), model=smollm2, progress=False)
    first, second, other = ((tmp_path / name / "heads.csv").read_bytes() for name in "abc")
    # Identity, not closeness: the same process, shapes and thread count run the same float32 sums.
    assert first == second
    assert first != other


@pytest.mark.parametrize("args, message", [
    (("find-heads", "gpt2-xl", "--n-prompts", "2"), "Could not load model 'gpt2-xl (openai-community/gpt2-xl)'"),
    (("find-heads", "smollm2-135m", "--dataset", "imdb"), "Unknown data set 'imdb'"),
    (("find-heads", "smollm2-135m", "--dataset", "agnews", "--label-words", "world,sports,business,sci/tech",
      "--n-prompts", "2"), "'sci/tech' is not a single token"),
])
def test_bad_input_is_one_clear_error_without_a_traceback(args, message, tmp_path):
    result = run_cli(*args, "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
