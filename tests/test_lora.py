"""Specification of the LoRA methods (abft-lora, e2e-lora; issue 14) on the tiny random GPT-2, whose fused
c_attn the bridge splits into q/k/v: only the q and k projections get adapters, only the adapters train
(every base weight stays bit-identical), the attention hooks see the adapted projections, a run folder's
adapter round-trips through save, resume, load and `evaluate`, and merging changes no logit. Plumbing
only (random weights); the real-model test is in test_training.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from abft_lens.errors import AbftLensError, ConfigError
from abft_lens.evaluation import EvaluateConfig, label_logits, run_evaluation
from abft_lens.forward import pattern_hook_name
from abft_lens.lora import LoraSettings, attach_lora, has_lora, lora_attached, lora_parameters, remove_lora
from abft_lens.models import load_model
from abft_lens.training import (
    TRAINED_FILE,
    FinetuneConfig,
    FinetuneRunner,
    finetune,
    full_precision_parameter_count,
    load_trained_model,
    trainable_qk_parameters,
    training_prompts,
)

SETTINGS = LoraSettings(rank=4, alpha=8.0, dropout=0.0)
# lr 1e-2: big enough that two Adam steps move the adapters visibly on the random model.
TINY = dict(n_train=4, n_val=0, k=2, lr=1e-2, batch_size=2, micro_batch_size=2, steps=2, checkpoint_every=1,
            seed=0, lora_rank=4, lora_alpha=8.0, precision="fp32")


@pytest.fixture
def model(tiny_gpt2_dir):
    """A fresh tiny GPT-2 per test: LoRA tests change the model they are given."""
    return load_model(str(tiny_gpt2_dir))


def lora_config(tiny_gpt2_dir, short_sst2, out: Path, **changes) -> FinetuneConfig:
    return FinetuneConfig(**{**TINY, "model": str(tiny_gpt2_dir), "dataset": str(short_sst2), "method": "e2e-lora",
                             "out": str(out), **changes})


def query_pattern(model, tokens: torch.Tensor, layer: int = 1) -> torch.Tensor:
    seen = {}

    def keep(pattern, hook):
        seen["pattern"] = pattern.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(pattern_hook_name(layer), keep)])
    return seen["pattern"]


def all_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- the adapters and the bridge ---------------------------------------------------------------------


def test_adapters_sit_on_the_q_and_k_projections_only(model):
    targets = attach_lora(model, SETTINGS, seed=0)
    n_layers = model.cfg.n_layers
    assert len(targets) == 2 * n_layers
    assert all(name.endswith((".attn.q._original_component", ".attn.k._original_component")) for name in targets)
    params = lora_parameters(model)
    assert len(params) == 2 * 2 * n_layers  # A and B per adapted projection
    assert all(".attn.q." in name or ".attn.k." in name for name in params)
    d_model = model.cfg.d_model
    assert sum(p.numel() for p in params.values()) == n_layers * 2 * (2 * SETTINGS.rank * d_model)


def test_hook_pattern_sees_the_adapted_attention_and_removal_restores_it(model):
    tokens = torch.arange(100, 116).unsqueeze(0)
    before = query_pattern(model, tokens)
    weights = all_parameters(model)
    attach_lora(model, SETTINGS, seed=0)
    assert torch.equal(query_pattern(model, tokens), before)  # B starts at zero: no change yet
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    assert (query_pattern(model, tokens) - before).abs().max() > 1e-2
    remove_lora(model, merge=False)
    assert not has_lora(model)
    assert torch.equal(query_pattern(model, tokens), before)
    after = all_parameters(model)
    assert after.keys() == weights.keys() and all(torch.equal(after[n], weights[n]) for n in weights)


def test_the_adapters_keep_the_base_parameters_requires_grad_flags(model):
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    attach_lora(model, SETTINGS, seed=0)
    adapters = lora_parameters(model)
    assert all(p.requires_grad for p in adapters.values())
    assert sum(not p.requires_grad for p in model.parameters()) == sum(not flag for flag in flags.values())
    remove_lora(model, merge=False)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_full_precision_count_is_the_trained_parameters_plus_the_lm_head_for_e2e(model):
    cfg = model.cfg
    qk = trainable_qk_parameters(model)
    assert full_precision_parameter_count(model, qk, "abft") == cfg.n_layers * 2 * cfg.d_model * cfg.d_model
    # GPT-2 ties the LM head to the token embedding: d_vocab x d_model, counted once.
    lm_head = cfg.d_vocab * cfg.d_model
    assert full_precision_parameter_count(model, qk, "e2e") == cfg.n_layers * 2 * cfg.d_model ** 2 + lm_head
    everything = dict(model.named_parameters())
    assert full_precision_parameter_count(model, everything, "e2e") == sum(p.numel() for p in everything.values())


# --- a LoRA run and its folder --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tiny_gpt2_dir, short_sst2, tmp_path_factory):
    """A 2-step e2e-lora run on a fresh tiny GPT-2: the model afterwards (adapters attached), its
    parameters before, the result and the prompts."""
    model = load_model(str(tiny_gpt2_dir))
    before = all_parameters(model)
    config = lora_config(tiny_gpt2_dir, short_sst2, tmp_path_factory.mktemp("runs") / "e2e-lora")
    prompts, _ = training_prompts(model, config)
    result = finetune(model, prompts, config, progress=False)
    return dict(model=model, before=before, result=result, config=config, prompts=prompts)


def test_a_lora_run_trains_only_the_adapters_and_leaves_every_base_weight_bit_identical(lora_run):
    model, before, result = lora_run["model"], lora_run["before"], lora_run["result"]
    adapters = set(lora_parameters(model))
    assert set(result.trainable_names) == adapters
    # peft moves each adapted Linear under its LoRA layer as "base_layer"
    after = {name.replace(".base_layer.", "."): value for name, value in all_parameters(model).items()
             if name not in adapters}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before), "a base weight changed"
    trained = all_parameters(model)
    moved = [name for name in adapters if ".lora_B." in name and trained[name].abs().max() > 0]
    assert len(moved) == len(adapters) // 2  # every B left zero
    assert set(load_file(str(result.run_dir / TRAINED_FILE))) == adapters


def test_a_lora_run_records_its_adapter_and_costs(lora_run):
    result, model = lora_run["result"], lora_run["model"]
    record = json.loads((result.run_dir / "config.json").read_text())
    assert record["config"]["method"] == "e2e-lora" and record["config"]["lora_rank"] == 4
    lora = record["lora"]
    assert (lora["rank"], lora["alpha"], lora["dropout"]) == (4, 8.0, 0.0)
    assert len(lora["target_modules"]) == 2 * model.cfg.n_layers
    assert result.trainable_params == sum(p.numel() for p in lora_parameters(model).values())
    # E2E: the adapters plus the (tied) LM head.
    assert result.full_precision_params == result.trainable_params + model.cfg.d_vocab * model.cfg.d_model
    assert record["full_precision_params"] == result.full_precision_params
    assert result.seconds_per_step > 0 and result.peak_memory_mb > 0


def test_a_saved_adapter_loads_merged_or_unmerged_to_the_same_logits(lora_run):
    batch = lora_run["prompts"].collate(range(len(lora_run["prompts"])))
    with torch.no_grad():
        trained = label_logits(lora_run["model"], batch)
        unmerged = load_trained_model(lora_run["result"].run_dir, merge=False)
        assert has_lora(unmerged)
        assert torch.equal(label_logits(unmerged, batch), trained)  # the same computation
        merged = load_trained_model(lora_run["result"].run_dir)
        assert not has_lora(merged)
        # Merging folds (alpha / r) B A into W_Q/W_K: the same logits up to float32 rounding.
        torch.testing.assert_close(label_logits(merged, batch), trained, rtol=0, atol=1e-5)
        base = label_logits(load_model(lora_run["config"].model), batch)
    assert (base - trained).abs().max() > 1e-3  # the adapter does change the logits


def test_evaluate_run_applies_the_adapter(lora_run, short_sst2, tmp_path):
    settings = dict(dataset=str(short_sst2), n_test=8, demo_sets=1, k=2, seed=0, pool_seed=42, attention=False,
                    precision="fp32")
    from_folder = run_evaluation(EvaluateConfig(model_or_run=str(lora_run["result"].run_dir),
                                                out=str(tmp_path / "folder"), **settings), progress=False)
    in_memory = run_evaluation(EvaluateConfig(model_or_run=str(lora_run["result"].run_dir),
                                              out=str(tmp_path / "memory"), **settings),
                               model=lora_run["model"], progress=False)
    columns = [c for c in in_memory.predictions.columns if "logit" in c or "prob" in c]
    assert columns
    assert (from_folder.predictions["predicted_label"] == in_memory.predictions["predicted_label"]).all()
    pd.testing.assert_frame_equal(from_folder.predictions[columns], in_memory.predictions[columns], rtol=0, atol=1e-5)


def test_a_killed_lora_run_resumes_to_the_same_adapters(lora_run, tiny_gpt2_dir, monkeypatch, tmp_path):
    config = dataclasses.replace(lora_run["config"], out=str(tmp_path / "killed"))
    model = load_model(str(tiny_gpt2_dir))
    step = FinetuneRunner.step

    def step_then_die(runner):
        if runner.completed == 1:
            raise KeyboardInterrupt  # killed after step 1 and its checkpoint
        return step(runner)

    monkeypatch.setattr(FinetuneRunner, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, lora_run["prompts"], config, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "killed" / TRAINED_FILE).exists()

    fresh = load_model(str(tiny_gpt2_dir))  # a new process would start from the base model
    resumed = finetune(fresh, lora_run["prompts"], dataclasses.replace(config, resume=True), progress=False)
    assert resumed.resumed_from_step == 1  # from the checkpoint, not started over (that ends the same)
    reference = load_file(str(lora_run["result"].run_dir / TRAINED_FILE))
    final = load_file(str(tmp_path / "killed" / TRAINED_FILE))
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in reference)


@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_abft_lora_trains_on_cpu_in_fp32_and_bf16(precision, dtype, tiny_gpt2_dir, short_sst2, tmp_path):
    model = load_model(str(tiny_gpt2_dir), dtype=getattr(torch, dtype))
    config = lora_config(tiny_gpt2_dir, short_sst2, tmp_path / "run", method="abft-lora", heads="all",
                         precision=precision, dtype=dtype, steps=1)
    prompts, _ = training_prompts(model, config)
    result = finetune(model, prompts, config, progress=False)  # emulated bf16 on a CPU without bf16 instructions
    assert torch.isfinite(torch.tensor(result.metrics["loss"].to_numpy())).all()
    assert all(p.dtype == torch.float32 for p in lora_parameters(model).values())  # float32 masters
    assert result.full_precision_params == result.trainable_params  # ABFT needs no LM head


# --- config ----------------------------------------------------------------------------------------------


def test_config_rejects_bad_lora_settings():
    with pytest.raises(ConfigError, match="lora_rank"):
        FinetuneConfig(method="e2e-lora", lora_rank=0)
    with pytest.raises(ConfigError, match="lora_alpha"):
        FinetuneConfig(method="e2e-lora", lora_alpha=0.0)
    with pytest.raises(ConfigError, match="lora_dropout"):
        FinetuneConfig(method="e2e-lora", lora_dropout=1.0)
    with pytest.raises(ConfigError, match="trainable"):
        FinetuneConfig(method="abft-lora", trainable="all")
    with pytest.raises(ConfigError, match="LoRA method"):
        FinetuneConfig(method="e2e", load_in_4bit=True)


def test_the_objective_and_adapters_follow_the_method():
    assert [(FinetuneConfig(method=m).objective, FinetuneConfig(method=m).uses_lora)
            for m in ("abft", "e2e", "abft-lora", "e2e-lora")] == [
        ("abft", False), ("e2e", False), ("abft", True), ("e2e", True)]
    assert FinetuneConfig(method="abft").lora_settings() is None
    assert FinetuneConfig(method="e2e-lora").lora_settings() == LoraSettings(16, 32.0, 0.0)


def test_a_model_with_adapters_is_not_given_a_second_set(model):
    attach_lora(model, SETTINGS, seed=0)
    with pytest.raises(AbftLensError, match="already carries"):
        attach_lora(model, SETTINGS, seed=0)


def test_lora_attached_takes_the_adapters_off_again_even_on_an_error(model):
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with lora_attached(model, SETTINGS, seed=0):
        assert has_lora(model)
    assert not has_lora(model)
    with pytest.raises(RuntimeError, match="inside"), lora_attached(model, SETTINGS, seed=0):
        raise RuntimeError("inside")
    assert not has_lora(model)
    with lora_attached(model, None, seed=0):  # a full-rank method: nothing attached
        assert not has_lora(model)
    after = dict(model.named_parameters())
    assert weights.keys() == after.keys() and all(torch.equal(weights[n], after[n]) for n in weights)


def test_the_weight_landscape_refuses_a_lora_run_by_name(lora_run):
    from analysis.landscape import read_run

    with pytest.raises(AbftLensError, match="is a LoRA run"):
        read_run(lora_run["result"].run_dir)
