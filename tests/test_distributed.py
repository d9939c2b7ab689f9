"""Data parallelism under torchrun (gloo, CPU): two-rank find-heads and fine-tuning give the
single-process results (fine-tuning also after a kill and a distributed resume), and a failing rank
ends the whole job with its error instead of hanging. Each torchrun job is a subprocess on a free
port; a subprocess cannot use in-memory fixtures, so models are passed as directories."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from abft_lens.distributed import (
    all_reduce_head_statistics,
    pack_head_statistics,
    shard_batches,
    unpack_head_statistics,
)
from abft_lens.find_heads import HEADS_COLUMNS, FindHeadsConfig, find_heads
from abft_lens.heads import HeadStatistics
from tolerances import MASS_ATOL

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 900  # a whole torchrun job, model loads included, on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None,
             timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N ARGS`` on localhost with a free port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    # A script run by path puts its own folder first on sys.path, not the repository: name the repository so
    # that the code under test is imported, not whatever copy the environment has installed.
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": python_path,
                **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)


def assert_same_heads(distributed_csv: Path, single_csv: Path) -> None:
    """Closeness, not identity: each rank runs with 1 thread and the single process with 2, so the
    float32 sums inside the model are split differently (see tolerances.py). The ranking is a pure
    function of these columns (tested in test_heads), so heads are matched by (layer, head): two heads
    within rounding of each other may swap ranks."""
    two, one = (pd.read_csv(path).set_index(["layer", "head"]).sort_index() for path in (distributed_csv, single_csv))
    assert tuple(pd.read_csv(distributed_csv).columns) == HEADS_COLUMNS
    assert two.index.equals(one.index) and two["n_prompts"].equals(one["n_prompts"])
    n_prompts = int(one["n_prompts"].iloc[0])
    for column in ("label_mass", "label_mass_se", "correctness", "correctness_se"):
        worst = float((two[column] - one[column]).abs().max())
        assert worst <= MASS_ATOL, f"{column}: 2-rank differs from 1-rank by {worst:g}"
    assert float((two["pass_rate"] - one["pass_rate"]).abs().max()) <= 1 / n_prompts + 1e-9
    # Functions of the prompt lengths alone: equal up to the CSV's 6 significant digits.
    for column in ("uniform_mass", "mean_threshold"):
        assert two[column].to_numpy() == pytest.approx(one[column].to_numpy(), rel=1e-5), column


# --- pure parts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_items, batch_size, world", [(10, 3, 2), (16, 8, 2), (5, 8, 3), (7, 1, 4)])
def test_shards_are_whole_single_process_batches_covering_every_prompt_once(n_items, batch_size, world):
    shards = [shard_batches(n_items, batch_size, rank, world) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n_items))
    single = [list(range(s, min(s + batch_size, n_items))) for s in range(0, n_items, batch_size)]
    rechunked = [shard[s:s + batch_size] for shard in shards for s in range(0, len(shard), batch_size)]
    assert sorted(rechunked) == sorted(single)


def test_without_torchrun_sharding_and_reduction_are_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert shard_batches(7, 3) == list(range(7))
    stats = HeadStatistics.zeros(2, 3)
    assert all_reduce_head_statistics(stats) is stats


def test_packed_statistics_round_trip_exactly():
    torch.manual_seed(0)
    stats = HeadStatistics.zeros(3, 4)
    attention = torch.rand(5, 3, 4, 4) / 4
    stats.add(attention, torch.rand(5, 4) > 0.5, torch.tensor([40, 50, 60, 70, 80]), "paper", 2.0)
    back = unpack_head_statistics(pack_head_statistics(stats), stats)
    assert back.n_prompts == 5
    assert (back.uniform_mass, back.threshold) == (stats.uniform_mass, stats.threshold)
    for name in ("label_mass", "label_mass_sq", "correctness", "correctness_sq", "passes"):
        assert torch.equal(getattr(back, name), getattr(stats, name))


def test_device_map_places_the_model_and_excludes_device(tiny_gpt2_dir):
    from abft_lens.errors import ModelLoadError
    from abft_lens.models import load_model

    placed = load_model(str(tiny_gpt2_dir), device_map="cpu")
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    with pytest.raises(ModelLoadError, match="either device or device_map"):
        load_model(str(tiny_gpt2_dir), device="cpu", device_map="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="requires CUDA"):
            load_model(str(tiny_gpt2_dir), n_devices=2)


# --- two ranks under torchrun --------------------------------------------------------------------------

def test_two_rank_find_heads_equals_one_rank_on_tiny_gpt2(tiny_gpt2_dir, tmp_path):
    # fp32 in every distributed test: the tolerances are float32's (bf16 parity is test_precision's).
    args = dict(n_prompts=10, batch_size=3, seed=5, precision="fp32")  # 4 batches, the last one short
    result = torchrun("-m", "abft_lens", "find-heads", str(tiny_gpt2_dir), "--n-prompts", "10",
                      "--batch-size", "3", "--seed", "5", "--precision", "fp32", "--top", "3",
                      "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Top 3 heads") == 1, "only rank 0 prints"
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["n_prompts_scored"] == 10
    find_heads(FindHeadsConfig(model=str(tiny_gpt2_dir), out=str(tmp_path / "one"), **args), progress=False)
    assert_same_heads(tmp_path / "two" / "heads.csv", tmp_path / "one" / "heads.csv")


@pytest.mark.slow
def test_two_rank_find_heads_equals_one_rank_on_the_embedded_model(smollm2, tmp_path):
    result = torchrun("-m", "abft_lens", "find-heads", "smollm2-135m", "--n-prompts", "6", "--batch-size", "2",
                      "--seed", "3", "--precision", "fp32", "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-4000:]
    find_heads(FindHeadsConfig(n_prompts=6, batch_size=2, seed=3, precision="fp32", out=str(tmp_path / "one")),
               model=smollm2, progress=False)
    assert_same_heads(tmp_path / "two" / "heads.csv", tmp_path / "one" / "heads.csv")
    table = pd.read_csv(tmp_path / "two" / "heads.csv")
    assert table["label_mass"].iloc[0] > 5 * table["uniform_mass"].iloc[0], "real label-attending heads"


FAILING_RANK = """
import os, sys
import abft_lens.find_heads as job

if os.environ["RANK"] == "1":
    def broken(*args, **kwargs):
        raise RuntimeError("rank 1 broke while scoring")
    job.accumulate_head_statistics = broken

from abft_lens.cli import main
main(sys.argv[1:])
"""


def test_a_failing_rank_fails_the_whole_job_with_its_error(tiny_gpt2_dir, tmp_path):
    """Rank 1 raises before the all-reduce that rank 0 waits in: torchrun must stop rank 0 and exit
    non-zero with rank 1's error (the collective timeout is a second bound, never reached here)."""
    script = tmp_path / "failing_rank.py"
    script.write_text(textwrap.dedent(FAILING_RANK))
    started = time.perf_counter()
    result = torchrun(str(script), "find-heads", str(tiny_gpt2_dir), "--n-prompts", "6", "--batch-size", "3",
                      "--out", str(tmp_path / "run"), env={"ABFT_LENS_DIST_TIMEOUT": "300"}, timeout=600)
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert "rank 1 broke while scoring" in result.stderr
    assert not (tmp_path / "run" / "heads.csv").exists()
    assert elapsed < 300, f"the job waited {elapsed:.0f} s: it hung on the dead rank"


RANKS_LEAVING = """
import json, os, sys, time
from abft_lens.distributed import process_group

with process_group():
    if os.environ["RANK"] == "0":
        time.sleep(2)  # rank 0 writing the run folder while rank 1 is done
    finished = time.time()
left = time.time()
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"finished": finished, "left": left}, f)
"""


def test_no_rank_leaves_the_process_group_before_the_others_are_done(tmp_path):
    """The teardown abort (gloo torn down by rank 1 while rank 0 still worked) is rare, so the test checks its
    cause: rank 1, done at once, must leave the group only after rank 0's 2 s of work."""
    script = tmp_path / "ranks_leaving.py"
    script.write_text(textwrap.dedent(RANKS_LEAVING))
    result = torchrun(str(script), str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1["finished"] < rank0["finished"] - 1, "rank 1 should have been done first"
    assert rank1["left"] >= rank0["finished"], "rank 1 left the group while rank 0 was still working"


# --- data-parallel fine-tuning ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_sst2_csv(tmp_path_factory) -> Path:
    """40 short real SST-2 sentences as a CSV data set: short prompts, fast steps."""
    from abft_lens.data import load_dataset

    sst2 = load_dataset("sst2")
    short = [e for e in sst2.examples if len(e.text) < 50][:40]
    path = tmp_path_factory.mktemp("data") / "short_sst2.csv"
    pd.DataFrame({"text": [e.text for e in short],
                  "label": [sst2.label_words[e.label] for e in short]}).to_csv(path, index=False)
    return path


# 4 micro-batches of 1 per pseudo-batch: 2 per rank. Every head trained (a random model flags none).
FINETUNE = dict(n_train=8, k=2, lr=1e-2, batch_size=4, micro_batch_size=1, steps=3, heads="all",
                checkpoint_every=1, seed=0, precision="fp32")
WEIGHT_TOLERANCE = 1e-5  # |w_2 ranks - w_1 rank| after 3 Adam steps of lr 1e-2: float32 summation order
# Adam divides each gradient element by its own running RMS (+ 1e-8), so an element whose true gradient
# is ~0 moves by up to lr per step in the direction of its float32 rounding noise, which the two
# summation orders draw differently. Such elements are rare; a wrong all-reduce moves nearly all.
NOISE_DOMINATED_SHARE = 1e-3


def finetune_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in FINETUNE.items()]
    return ["finetune", str(model_dir), "--dataset", str(data), *flags, "--out", str(out)]


@pytest.fixture(scope="module")
def one_rank_finetune(tiny_gpt2_dir, short_sst2_csv, tmp_path_factory) -> Path:
    from abft_lens.training import FinetuneConfig, run_finetune

    out = tmp_path_factory.mktemp("one_rank") / "run"
    run_finetune(FinetuneConfig(model=str(tiny_gpt2_dir), dataset=str(short_sst2_csv), out=str(out), **FINETUNE),
                 progress=False)
    return out


@pytest.fixture(scope="module")
def initial_qk(tiny_gpt2_dir) -> dict[str, torch.Tensor]:
    from abft_lens.models import load_model
    from abft_lens.training import snapshot, trainable_qk_parameters

    return snapshot(trainable_qk_parameters(load_model(str(tiny_gpt2_dir))))


def assert_same_training(two: Path, one: Path, initial: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    a, b = load_file(str(two / "trained.safetensors")), load_file(str(one / "trained.safetensors"))
    assert a.keys() == b.keys() == initial.keys()
    differ = torch.cat([((a[name] - b[name]).abs() > WEIGHT_TOLERANCE).flatten() for name in a])
    worst = max(float((a[name] - b[name]).abs().max()) for name in a)
    moved = max(float((b[name] - initial[name]).abs().max()) for name in b)
    print(f"\n2-rank vs 1-rank: max |dw| = {worst:.3g} ({int(differ.sum())} of {differ.numel()} elements over "
          f"{WEIGHT_TOLERANCE:g}); training moved weights by up to {moved:.3g}")
    assert moved > 1000 * WEIGHT_TOLERANCE, "training must move the weights for the comparison to mean anything"
    assert float(differ.double().mean()) <= NOISE_DOMINATED_SHARE, f"2-rank weights differ from 1-rank by {worst:g}"
    m2 = pd.read_json(two / "metrics.jsonl", lines=True)
    m1 = pd.read_json(one / "metrics.jsonl", lines=True)
    assert m2["step"].tolist() == m1["step"].tolist() == [1, 2, 3]
    for column in ("loss", "flagged_heads", "punish_weight", "correct_mass", "wrong_mass"):
        assert m2[column].to_numpy() == pytest.approx(m1[column].to_numpy(), rel=1e-4, abs=MASS_ATOL), column


def test_two_rank_finetune_equals_one_rank_with_the_same_global_batch(tiny_gpt2_dir, short_sst2_csv,
                                                                       one_rank_finetune, initial_qk, tmp_path):
    result = torchrun("-m", "abft_lens", *finetune_args(tiny_gpt2_dir, short_sst2_csv, tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Run folder:") == 1, "only rank 0 reports"
    assert_same_training(tmp_path / "two", one_rank_finetune, initial_qk)


KILLED_AFTER_STEP_2 = """
import sys
import abft_lens.training.job as training  # the module whose _train looks write_checkpoint up

write_checkpoint = training.write_checkpoint

def write_then_die(run_dir, runner, **kwargs):
    path = write_checkpoint(run_dir, runner, **kwargs)
    if runner.completed == 2:
        raise RuntimeError("killed after the step-2 checkpoint")
    return path

training.write_checkpoint = write_then_die
from abft_lens.cli import main
main(sys.argv[1:])
"""


def test_a_killed_two_rank_finetune_resumes_in_distributed_mode_to_the_one_rank_weights(
        tiny_gpt2_dir, short_sst2_csv, one_rank_finetune, initial_qk, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_AFTER_STEP_2))
    out = tmp_path / "two"
    killed = torchrun(str(script), *finetune_args(tiny_gpt2_dir, short_sst2_csv, out),
                      env={"ABFT_LENS_DIST_TIMEOUT": "300"})
    assert killed.returncode != 0 and "killed after the step-2 checkpoint" in killed.stderr
    assert (out / "checkpoints" / "step-000002").is_dir() and not (out / "trained.safetensors").exists()
    resumed = torchrun("-m", "abft_lens", *finetune_args(tiny_gpt2_dir, short_sst2_csv, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    # From the checkpoint, not started over (that would end with the same weights).
    assert re.search(r"resumed from \S+ \(step 2\)", (out / "run.log").read_text())
    assert_same_training(out, one_rank_finetune, initial_qk)
