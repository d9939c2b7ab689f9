"""Every job (find-heads, finetune, evaluate) writes a run.log (Python logging) beside its config.json,
saying what it ran and where it stopped. Tiny random GPT-2: plumbing only."""

from __future__ import annotations

import pandas as pd
import pytest

from abft_lens.errors import ConfigError
from abft_lens.evaluation import EvaluateConfig, run_evaluation
from abft_lens.find_heads import FindHeadsConfig, find_heads
from abft_lens.runs import RUN_LOG, check_out_dir, run_log
from abft_lens.training import FinetuneConfig, run_finetune


@pytest.fixture(scope="module")
def short_csv(sst2, tmp_path_factory):
    short = [e for e in sst2.examples if len(e.text) < 50][:40]
    path = tmp_path_factory.mktemp("data") / "short.csv"
    pd.DataFrame({"text": [e.text for e in short], "label": [sst2.label_words[e.label] for e in short]}
                 ).to_csv(path, index=False)
    return path


def test_find_heads_writes_run_log_beside_config(tiny_gpt2, tiny_gpt2_dir, short_csv, tmp_path):
    out = tmp_path / "heads"
    find_heads(FindHeadsConfig(model=str(tiny_gpt2_dir), dataset=str(short_csv), k=2, n_prompts=4, top=3,
                               precision="fp32", out=str(out)), model=tiny_gpt2, progress=False)
    text = (out / RUN_LOG).read_text()
    assert (out / "config.json").is_file()
    assert "INFO abft_lens.find_heads: find-heads" in text and "scored 4 prompts" in text and "top head" in text


def test_finetune_writes_run_log_with_every_step(tiny_gpt2_dir, short_csv, tmp_path):
    from abft_lens.models import load_model

    out = tmp_path / "run"
    config = FinetuneConfig(model=str(tiny_gpt2_dir), dataset=str(short_csv), n_train=4, n_val=0, k=2, lr=1e-2,
                            batch_size=2, micro_batch_size=2, steps=2, heads="all", precision="fp32", out=str(out))
    run_finetune(config, model=load_model(str(tiny_gpt2_dir)), progress=False)
    text = (out / RUN_LOG).read_text()
    assert (out / "config.json").is_file()
    assert "abft_lens.finetune: finetune" in text and "step 1: loss" in text and "step 2: loss" in text
    assert "finished: 2 steps at lr 0.01" in text


def test_evaluate_writes_run_log_beside_config(tiny_gpt2, tiny_gpt2_dir, short_csv, tmp_path):
    out = tmp_path / "eval"
    run_evaluation(EvaluateConfig(model_or_run=str(tiny_gpt2_dir), dataset=str(short_csv), n_test=2, demo_sets=1,
                                  k=2, precision="fp32", out=str(out)), model=tiny_gpt2, progress=False)
    text = (out / RUN_LOG).read_text()
    assert (out / "config.json").is_file() and (out / "metrics.json").is_file()
    assert "abft_lens.evaluate: evaluate" in text and "accuracy" in text and f"wrote {out}" in text


def test_a_failed_job_logs_why_and_its_folder_may_be_reused(tmp_path):
    out = tmp_path / "failed"
    with pytest.raises(RuntimeError), run_log(out, "test"):
        raise RuntimeError("no memory left")
    assert "ERROR abft_lens.test: stopped: RuntimeError: no memory left" in (out / RUN_LOG).read_text()
    assert check_out_dir(out) == out, "a folder with only a failed job's run.log is not a user's results"
    (out / "heads.csv").write_text("layer,head\n")
    with pytest.raises(ConfigError, match="not empty"):
        check_out_dir(out)
