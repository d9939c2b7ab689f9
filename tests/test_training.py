"""Specification of fine-tuning: only W_Q/W_K move (for GPT-2 only c_attn's Q and K slices), a killed
run resumes to the same weights, a fixed seed gives the same run, and on the real model ABFT raises
the induction heads' attention on correct labels while E2E (full-rank or LoRA) lowers its cross-entropy.

Sizes are tiny (k = 2, short real SST-2 sentences, 2-prompt steps) so the file runs in minutes on 2
CPU cores. Tests that train the shared session model restore its weights afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from abft_lens.errors import AbftLensError, HeadSelectionError
from abft_lens.evaluation import EvaluateConfig, label_logits, run_evaluation
from abft_lens.heads import induction_head_mask, label_attention
from abft_lens.lora import has_lora, remove_lora
from abft_lens.loss import abft_loss
from abft_lens.precision import resolve_precision
from abft_lens.training import (
    TRAINED_FILE,
    FinetuneConfig,
    apply_tensors,
    finetune,
    load_trained_model,
    plan_heads,
    run_finetune,
    snapshot,
    trainable_qk_parameters,
    training_order,
    training_prompts,
)

pytestmark = pytest.mark.slow

# Shared by the in-process reference run and the killed/resumed command-line run: they must agree.
TINY = dict(model="smollm2-135m", n_train=4, k=2, lr=1e-3, batch_size=2, micro_batch_size=2, steps=2,
            checkpoint_every=1, seed=0)


@pytest.fixture(scope="module")
def restore_smollm2(smollm2):
    """Yields a function that puts the session model's W_Q/W_K back to their pretrained values."""
    pristine = snapshot(trainable_qk_parameters(smollm2))
    yield lambda: apply_tensors(smollm2, pristine)
    apply_tensors(smollm2, pristine)


def abft_diagnostics(model, prompts, mask=None):
    """The ABFT loss (A = 0.5) on all ``prompts`` at once, on ``mask``'s heads (default: the heads
    the paper's threshold flags now)."""
    batch = prompts.collate(range(len(prompts)))
    with torch.no_grad():
        attention = label_attention(model, batch, range(model.cfg.n_layers))
    mask = induction_head_mask(attention, batch.prompt_lengths) if mask is None else mask
    return abft_loss(attention, batch.correct_mask, mask, punish_weight=0.5), mask


@pytest.fixture(scope="module")
def abft_run(smollm2, restore_smollm2, short_sst2, tmp_path_factory):
    """A 2-step ABFT run on the real model: the result, the parameters before and after, and the
    attention diagnostics on the training prompts before and after (on the heads flagged before)."""
    restore_smollm2()
    before = {name: p.detach().clone() for name, p in smollm2.named_parameters()}
    config = FinetuneConfig(dataset=str(short_sst2), out=str(tmp_path_factory.mktemp("abft") / "run"), **TINY)
    prompts, _ = training_prompts(smollm2, config)
    diagnostics_before, mask = abft_diagnostics(smollm2, prompts)
    result = run_finetune(config, model=smollm2, progress=False)
    after = {name: p.detach().clone() for name, p in smollm2.named_parameters()}
    diagnostics_after, _ = abft_diagnostics(smollm2, prompts, mask)
    restore_smollm2()
    return dict(result=result, config=config, before=before, after=after,
                diagnostics=(diagnostics_before, diagnostics_after), prompts=prompts)


# --- what is trained ------------------------------------------------------------------------------


def test_trainable_parameters_of_llama_family_are_q_proj_and_k_proj_weights(smollm2):
    params = trainable_qk_parameters(smollm2)
    assert len(params) == 2 * smollm2.cfg.n_layers
    names = list(params)
    assert all(name.endswith(("q_proj._original_component.weight", "k_proj._original_component.weight"))
               for name in names)
    assert names[0].startswith("model.layers.0.") and names[-1].startswith(f"model.layers.{smollm2.cfg.n_layers - 1}.")
    # GQA: 9 query heads, 3 key/value heads of 64 dimensions.
    assert params[names[0]].shape == (576, 576) and params[names[1]].shape == (192, 576)


def test_abft_changes_only_wq_and_wk(abft_run):
    trained = set(abft_run["result"].trainable_names)
    before, after = abft_run["before"], abft_run["after"]
    unchanged = [name for name in before if name not in trained]
    assert unchanged and all(torch.equal(before[name], after[name]) for name in unchanged)
    assert all(not torch.equal(before[name], after[name]) for name in trained)
    assert abft_run["result"].trainable_params == sum(before[name].numel() for name in trained)


def test_gpt2_fused_c_attn_changes_only_its_q_and_k_slices(tiny_gpt2, tiny_gpt2_dir, short_sst2, tmp_path):
    model = tiny_gpt2
    pristine = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = trainable_qk_parameters(model)
    assert all(".attn.q." in name or ".attn.k." in name for name in params) and len(params) == 2 * model.cfg.n_layers
    config = FinetuneConfig(model=str(tiny_gpt2_dir), dataset=str(short_sst2), heads="all", n_train=4, k=2, lr=1e-2, batch_size=2,
                            micro_batch_size=2, steps=2, out=str(tmp_path / "run"))
    try:
        finetune(model, training_prompts(model, config)[0], config, progress=False)
        after = {name: p.detach().clone() for name, p in model.named_parameters()}
        d = model.cfg.d_model
        for layer in range(model.cfg.n_layers):
            fused = f"transformer.h.{layer}._original_component.attn.qkv._original_component.weight"
            old, new = pristine[fused], after[fused]  # Conv1D layout: [d_model, 3 * d_model], Q | K | V
            assert not torch.equal(old[:, :d], new[:, :d]) and not torch.equal(old[:, d:2 * d], new[:, d:2 * d])
            assert torch.equal(old[:, 2 * d:], new[:, 2 * d:])
        moved = {name for name in pristine if not torch.equal(pristine[name], after[name])}
        fused_names = {n for n in pristine if ".attn.qkv." in n and n.endswith("weight")}
        assert moved == set(params) | fused_names
        # The run folder reproduces the trained model, c_attn included.
        reloaded = dict(load_trained_model(config.run_dir()).named_parameters())
        assert all(torch.equal(reloaded[name], after[name]) for name in after)
    finally:
        apply_tensors(model, pristine)


# --- behaviour on the real model --------------------------------------------------------------------


def test_abft_raises_correct_label_attention_of_induction_heads(abft_run):
    before, after = abft_run["diagnostics"]
    flagged = before.flagged_heads_per_prompt
    assert flagged.min() > 0  # there are induction heads to train on every prompt
    assert after.loss < before.loss
    assert (after.correct_mass - after.wrong_mass).mean() > (before.correct_mass - before.wrong_mass).mean()


def test_metrics_and_config_are_written_per_step(abft_run):
    result = abft_run["result"]
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2]
    for key in ("loss", "punish_weight", "flagged_heads", "correct_mass", "wrong_mass", "seconds"):
        assert all(isinstance(row[key], float) for row in lines), key
    record = json.loads((result.run_dir / "config.json").read_text())
    assert record["status"] == "finished" and record["lr"] == 1e-3
    # The precision the steps were timed in, and why (native or emulated bf16, or fp32).
    assert record["precision_reason"] == resolve_precision(abft_run["config"].precision, "cpu").reason
    assert record["head_plan"]["forward_stops_after_layer"] == 29
    assert record["trainable"] == result.trainable_names
    assert not (result.run_dir / "checkpoints").exists()
    assert set(load_file(str(result.run_dir / TRAINED_FILE))) == set(result.trainable_names)


def test_same_seed_gives_identical_weights_and_metrics(abft_run, smollm2, restore_smollm2, tmp_path):
    restore_smollm2()
    config = dataclasses.replace(abft_run["config"], out=str(tmp_path / "again"))
    try:
        again = run_finetune(config, model=smollm2, progress=False)
    finally:
        restore_smollm2()
    first = load_file(str(abft_run["result"].run_dir / TRAINED_FILE))
    second = load_file(str(again.run_dir / TRAINED_FILE))
    # Identity, not closeness: the same process, shapes and thread count run the same float32 sums.
    assert all(torch.equal(first[name], second[name]) for name in first)
    columns = [c for c in again.metrics.columns if c != "seconds"]
    pd.testing.assert_frame_equal(abft_run["result"].metrics[columns], again.metrics[columns], check_exact=True)


def test_killed_run_resumes_to_the_same_weights(abft_run, short_sst2, tmp_path):
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "abft_lens", "finetune", TINY["model"], "--dataset", str(short_sst2),
               "--n-train", "4", "--k", "2", "--lr", "1e-3", "--batch-size", "2", "--micro-batch-size", "2",
               "--steps", "2", "--checkpoint-every", "1", "--seed", "0", "--out", str(run_dir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any((run_dir / "checkpoints").glob("step-*")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not (run_dir / TRAINED_FILE).exists(), "the run finished before it could be killed"

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # It went on from the checkpoint (a run started over would end with the same weights too).
    assert re.search(r"resumed from \S+step-\d+ \(step [12]\)", (run_dir / "run.log").read_text())
    reference = load_file(str(abft_run["result"].run_dir / TRAINED_FILE))
    final = load_file(str(run_dir / TRAINED_FILE))
    assert set(final) == set(reference)
    # Identity: the subprocess inherits the thread count and CPU kernels, so it runs the same sums.
    assert all(torch.equal(final[name], reference[name]) for name in reference)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2]
    expected = abft_run["result"].metrics
    assert [row["loss"] for row in lines] == expected["loss"].tolist()


def label_cross_entropy(model, batch) -> float:
    """The E2E objective (the query labels' cross-entropy over the label space) on ``batch``."""
    with torch.no_grad():
        return float(F.cross_entropy(label_logits(model, batch), batch.query_labels))


def test_e2e_lowers_its_cross_entropy_and_logs_attention(smollm2, restore_smollm2, short_sst2, tmp_path):
    restore_smollm2()
    config = FinetuneConfig(dataset=str(short_sst2), method="e2e", out=str(tmp_path / "e2e"), **TINY)
    prompts, _ = training_prompts(smollm2, config)
    batch = prompts.collate(range(len(prompts)))
    try:
        before = label_cross_entropy(smollm2, batch)
        result = finetune(smollm2, prompts, config, progress=False)
        after = label_cross_entropy(smollm2, batch)
    finally:
        restore_smollm2()
    assert after < before
    for key in ("ce_loss", "train_accuracy", "abft_loss", "flagged_heads", "correct_mass", "wrong_mass"):
        assert result.metrics[key].notna().all(), key
    assert result.metrics["flagged_heads"].min() > 0


def test_e2e_lora_steps_lower_the_loss_and_evaluate_run_applies_the_adapter(smollm2, restore_smollm2, short_sst2,
                                                                           tmp_path):
    restore_smollm2()
    config = FinetuneConfig(dataset=str(short_sst2), method="e2e-lora", out=str(tmp_path / "e2e-lora"), **TINY)
    prompts, _ = training_prompts(smollm2, config)
    batch = prompts.collate(range(len(prompts)))
    settings = dict(dataset=str(short_sst2), n_test=4, demo_sets=1, k=TINY["k"], seed=TINY["seed"],
                    pool_seed=config.pool_seed, attention=False, precision="fp32")
    try:
        before = label_cross_entropy(smollm2, batch)
        base = run_evaluation(EvaluateConfig(out=str(tmp_path / "base"), **settings), model=smollm2, progress=False)
        result = finetune(smollm2, prompts, config, progress=False)
        after = label_cross_entropy(smollm2, batch)
        trained = run_evaluation(EvaluateConfig(model_or_run=str(result.run_dir), out=str(tmp_path / "trained"),
                                                **settings), model=smollm2, progress=False)
    finally:
        if has_lora(smollm2):
            remove_lora(smollm2, merge=False)
        restore_smollm2()
    assert after < before
    cfg, r = smollm2.cfg, config.lora_rank
    q_out, k_out = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head  # 576 and 192 (GQA)
    assert result.trainable_params == cfg.n_layers * r * ((cfg.d_model + q_out) + (cfg.d_model + k_out))  # A and B
    assert result.full_precision_params == result.trainable_params + cfg.d_vocab * cfg.d_model  # + the LM head
    # `abft-lens evaluate RUN`: a fresh model with the saved adapter, merged into W_Q/W_K.
    from_folder = run_evaluation(EvaluateConfig(model_or_run=str(result.run_dir), out=str(tmp_path / "folder"),
                                                **settings), progress=False)
    logits = [c for c in trained.predictions.columns if c.startswith("logit_")]
    pd.testing.assert_frame_equal(from_folder.predictions[logits], trained.predictions[logits], rtol=0, atol=1e-4)
    assert (trained.predictions[logits] - base.predictions[logits]).abs().to_numpy().max() > 1e-3


# --- errors and pure parts ----------------------------------------------------------------------------


def test_empty_head_set_is_an_error(smollm2, short_sst2, tmp_path):
    empty = tmp_path / "heads.csv"
    empty.write_text("layer,head\n")
    config = FinetuneConfig(dataset=str(short_sst2), heads=str(empty), out=str(tmp_path / "run"), **TINY)
    prompts, _ = training_prompts(smollm2, config)
    with pytest.raises(HeadSelectionError, match="empty"):
        finetune(smollm2, prompts, config, progress=False)
    with pytest.raises(HeadSelectionError, match="empty"):
        finetune(smollm2, prompts, dataclasses.replace(config, heads="per-prompt"), heads=[], progress=False)


def test_a_fixed_head_set_runs_only_up_to_its_deepest_layer(tmp_path):
    path = tmp_path / "heads.csv"
    pd.DataFrame({"rank": [1, 2, 3], "layer": [5, 2, 9], "head": [1, 0, 3]}).to_csv(path, index=False)
    plan = plan_heads(str(path), n_layers=30, n_heads=9, top=2)
    assert plan.mode == "fixed" and plan.layers == (2, 5) and plan.fixed_heads == ((2, 0), (5, 1))
    assert plan.fixed_mask(9).sum() == 2 and plan.fixed_mask(9)[1, 1]
    with pytest.raises(HeadSelectionError, match="outside"):
        plan_heads(str(path), n_layers=4, n_heads=9)


def test_a_finished_run_is_not_overwritten_and_resumes_only_with_the_same_settings(abft_run, smollm2):
    config, prompts = abft_run["config"], abft_run["prompts"]
    with pytest.raises(AbftLensError, match="already holds a run"):
        finetune(smollm2, prompts, config, progress=False)
    with pytest.raises(AbftLensError, match="other settings.*lr"):
        finetune(smollm2, prompts, dataclasses.replace(config, lr=5e-4, resume=True), progress=False)


def test_label_covering_prompts_on_trec_show_the_query_label_in_its_demonstrations(smollm2):
    # Issue 18's remedy (a) through the fine-tuning path (training_prompts of a FinetuneConfig), on the real
    # model's tokenizer and the real 6-label TREC data (tests/test_prompts.py checks the sampler itself): the
    # demonstration that carries the query's label shows its label word at its label position.
    from abft_lens.prompts import share_without_query_label

    def prompts(training_demos):
        config = FinetuneConfig(dataset="trec", n_train=96, n_val=0, k=4, seed=42, training_demos=training_demos)
        return training_prompts(smollm2, config)[0]

    random_demos, covering = prompts("random"), prompts("label_covering")
    assert share_without_query_label(random_demos) > 0.25
    assert share_without_query_label(covering) == 0.0
    assert len(set(covering.label_token_ids)) == 6
    for prompt in covering.prompts:
        shown = [prompt.tokens[position] for position in prompt.I_plus]
        assert shown and set(shown) == {covering.label_token_ids[prompt.query_label]}
    # The queries themselves are the same as with random demonstrations: only the demonstrations change.

    def query_tokens(prompt):
        return prompt.tokens[prompt.label_positions[-1] + 1:]

    assert [query_tokens(p) for p in covering.prompts] == [query_tokens(p) for p in random_demos.prompts]


def test_training_order_is_seeded_epochs_of_permutations():
    order = training_order(n_prompts=5, batch_size=4, steps=5, seed=3)
    flat = [i for batch in order for i in batch]
    assert len(order) == 5 and all(len(batch) == 4 for batch in order)
    assert sorted(flat[:5]) == sorted(flat[5:10]) == list(range(5))  # each epoch sees every prompt once
    assert order == training_order(5, 4, 5, seed=3) and order != training_order(5, 4, 5, seed=4)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="method"):
        FinetuneConfig(method="sft")
    with pytest.raises(ValueError, match="micro_batch_size"):
        FinetuneConfig(batch_size=4, micro_batch_size=8)
    with pytest.raises(ValueError, match="learning rates"):
        FinetuneConfig(lr=-1.0)
