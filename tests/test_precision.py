"""bf16 mixed precision: how the precision is chosen (hardware mocked), the bf16 path on the tiny
model (shapes, float32 outputs and master weights, numbers close to fp32), and one parity check on
the real model (slow). The benchmark's parity figures are in benchmarks/RESULTS.md.

bf16 keeps 8 significant bits: each rounding is off by up to 2^-9 ~ 2e-3 relative. Attention
probabilities come out of a softmax over scores that went through a few such matmuls, so they move
by ~1e-2 relative; the tolerances below are that size, two orders above float32's."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch

from abft_lens.forward import query_attention_rows, query_logits
from abft_lens.heads import gather_label_attention
from abft_lens.loss import abft_loss
from abft_lens.precision import (
    EmulatedBf16Matmuls,
    autocast,
    fast_bf16,
    resolve_config_precision,
    resolve_precision,
)
from abft_lens.prompts import build_prompts
from abft_lens.training import trainable_qk_parameters

BF16_RELATIVE = 2e-2  # loss or mass, bf16 against fp32 (see the module doc)
BF16_PROBABILITY_ATOL = 2e-2  # one attention probability in [0, 1]


# --- the choice, with the hardware mocked -------------------------------------------------------------

def mock_cpu(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize(("amx", "avx512_bf16", "seen"), [(True, True, "AMX and avx512_bf16"),
                                                          (False, True, "avx512_bf16"), (True, False, "AMX")])
def test_auto_is_bf16_on_a_cpu_with_bf16_instructions_and_says_why(monkeypatch, amx, avx512_bf16, seen):
    mock_cpu(monkeypatch, amx, avx512_bf16)
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "bf16"
    assert choice.describe().startswith(f"precision bf16: auto: this CPU has {seen}")
    assert "parity" in choice.reason


def test_auto_is_fp32_without_them_and_bf16_asked_for_there_is_emulated_without_a_warning(monkeypatch):
    mock_cpu(monkeypatch, amx=False, avx512_bf16=False)
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and "neither AMX nor avx512_bf16" in choice.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asked = resolve_precision("bf16", "cpu")
        assert asked.precision == "bf16" and "emulated" in asked.reason
        fp32 = resolve_precision("fp32", "cpu")
        assert fp32.precision == "fp32" and fp32.reason.startswith("asked for"), fp32.reason


def test_bf16_asked_for_on_a_gpu_without_native_bf16_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mock GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.warns(UserWarning, match="slower than fp32"):
        assert resolve_precision("bf16", "cuda:0").precision == "bf16"
    monkeypatch.setenv("RANK", "1")  # another torchrun rank: rank 0 has said it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cuda:0").precision == "bf16"


def test_onednn_isa_cap_below_bf16_turns_auto_to_fp32(monkeypatch):
    mock_cpu(monkeypatch, amx=True, avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    fast, seen = fast_bf16("cpu")
    assert not fast and "ONEDNN_MAX_CPU_ISA=AVX2" in seen
    assert resolve_precision("auto", "cpu").precision == "fp32"


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_a_gpu_follows_its_native_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mock GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    choice = resolve_precision("auto", "cuda:0")
    assert choice.precision == expected and "Mock GPU" in choice.reason


def test_weights_held_in_bf16_imply_bf16_matmuls(monkeypatch, capsys):
    from abft_lens.training import FinetuneConfig

    mock_cpu(monkeypatch, amx=False, avx512_bf16=False)
    config, choice = resolve_config_precision(FinetuneConfig(dtype="bfloat16"), "cpu")
    assert config.precision == "bf16" and "held in bf16" in choice.reason
    assert "precision bf16" in capsys.readouterr().out
    config, _ = resolve_config_precision(FinetuneConfig(), "cpu", announce=False)
    assert config.precision == "fp32" and capsys.readouterr().out == ""


# --- the bf16 path on the tiny model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_batch(tiny_gpt2, sst2):
    """Prompts of different lengths, so the batch is left-padded: the pads' rows see no key."""
    examples = [e for e in sst2.examples if len(e.text) < 60][:40]
    prompts = build_prompts(tiny_gpt2.tokenizer, sst2, examples, n_prompts=6, k=4, seed=0)
    batch = prompts.collate(range(6))
    assert (batch.attention_mask == 0).any(), "the batch must be padded for the test to mean anything"
    return batch


def test_bf16_rows_and_logits_are_float32_finite_and_close_to_fp32(tiny_gpt2, tiny_batch):
    layers = list(range(tiny_gpt2.cfg.n_layers))
    with torch.no_grad():
        rows32, logits32 = query_attention_rows(tiny_gpt2, tiny_batch, layers), query_logits(tiny_gpt2, tiny_batch)
        with autocast("bf16", tiny_gpt2):
            rows16 = query_attention_rows(tiny_gpt2, tiny_batch, layers)
            logits16 = query_logits(tiny_gpt2, tiny_batch)
    assert rows16.shape == rows32.shape and logits16.shape == logits32.shape
    assert rows16.dtype == logits16.dtype == torch.float32
    assert torch.isfinite(rows16).all() and torch.isfinite(logits16).all(), "left pads must not give NaN"
    # Relative: on the random tiny model every probability is about 1/80, below BF16_PROBABILITY_ATOL.
    torch.testing.assert_close(rows16, rows32, rtol=BF16_RELATIVE, atol=1e-4)
    pads = (tiny_batch.attention_mask == 0)[:, None, None, :].expand_as(rows16)
    assert float(rows16[pads].abs().max()) == 0, "no attention on a left pad"
    torch.testing.assert_close(rows16.sum(-1), torch.ones_like(rows16.sum(-1)), rtol=0, atol=BF16_RELATIVE)
    assert float((logits16 - logits32).abs().max()) < BF16_RELATIVE * float(logits32.abs().max())


def test_bf16_abft_loss_and_gradient_are_close_to_fp32(tiny_gpt2, tiny_batch):
    layers = list(range(tiny_gpt2.cfg.n_layers))
    params = list(trainable_qk_parameters(tiny_gpt2).values())
    assert params and all(p.requires_grad for p in params)
    head_mask = torch.ones(len(tiny_batch.tokens), len(layers), tiny_gpt2.cfg.n_heads, dtype=torch.bool)

    def loss_and_grad(precision: str) -> tuple[float, torch.Tensor]:
        with autocast(precision, tiny_gpt2):
            rows = query_attention_rows(tiny_gpt2, tiny_batch, layers)
        label_attention = gather_label_attention(rows, tiny_batch.label_positions)
        out = abft_loss(label_attention, tiny_batch.correct_mask, head_mask, punish_weight=1.0)
        grads = torch.autograd.grad(out.loss, params)
        return float(out.loss.detach()), torch.cat([g.flatten() for g in grads])

    loss32, grad32 = loss_and_grad("fp32")
    loss16, grad16 = loss_and_grad("bf16")
    assert abs(loss16 - loss32) <= BF16_RELATIVE * abs(loss32)
    assert float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.99


def _emulating_bf16_matmuls() -> bool:
    return any(isinstance(mode, EmulatedBf16Matmuls) for mode in torch.overrides._get_current_function_mode_stack())


@pytest.mark.parametrize(("amx", "emulated"), [(True, False), (False, True)])
def test_bf16_matmuls_are_emulated_exactly_where_the_cpu_lacks_bf16_instructions(monkeypatch, tiny_gpt2, amx, emulated):
    mock_cpu(monkeypatch, amx=amx, avx512_bf16=False)
    with autocast("bf16", tiny_gpt2):
        assert _emulating_bf16_matmuls() == emulated
    with autocast("fp32", tiny_gpt2):
        assert not _emulating_bf16_matmuls()
    assert not _emulating_bf16_matmuls(), "the mode is removed when the region ends"


def test_emulated_bf16_gives_native_bf16_numbers_on_the_tiny_model(monkeypatch, tiny_gpt2, tiny_batch):
    """Emulation rounds each operand to bf16 and the float32 product to bf16, as bf16 instructions do;
    only the order of the float32 additions inside a product may differ. So rows, logits, loss and
    gradient agree with native bf16 (PyTorch's own bf16 kernels, whatever the CPU) to about one bf16
    rounding, 2^-8 relative: 20x closer than bf16 is to float32 (BF16_RELATIVE). The matmuls of the
    emulated run must go through the emulation (counted), or the comparison would be native with itself."""
    import abft_lens.precision as precision

    rounded_operands = []
    round_operand = precision._rounded_to_bf16_as_float32
    monkeypatch.setattr(precision, "_rounded_to_bf16_as_float32",
                        lambda value: rounded_operands.append(1) or round_operand(value))
    layers = list(range(tiny_gpt2.cfg.n_layers))
    params = list(trainable_qk_parameters(tiny_gpt2).values())
    head_mask = torch.ones(len(tiny_batch.tokens), len(layers), tiny_gpt2.cfg.n_heads, dtype=torch.bool)

    def run(emulated: bool):
        with autocast("bf16", tiny_gpt2, emulate_bf16=emulated):
            rows = query_attention_rows(tiny_gpt2, tiny_batch, layers)
            logits = query_logits(tiny_gpt2, tiny_batch)
        label_attention = gather_label_attention(rows, tiny_batch.label_positions)
        loss = abft_loss(label_attention, tiny_batch.correct_mask, head_mask, punish_weight=1.0).loss
        grads = torch.autograd.grad(loss, params)
        return rows.detach(), logits.detach(), float(loss.detach()), torch.cat([g.flatten() for g in grads])

    rows_n, logits_n, loss_n, grad_n = run(emulated=False)
    assert not rounded_operands
    rows_e, logits_e, loss_e, grad_e = run(emulated=True)
    assert rounded_operands, "the emulated run's matmuls went through the emulation"
    one_rounding = 2.0**-8
    torch.testing.assert_close(rows_e, rows_n, rtol=0, atol=one_rounding)
    assert float((logits_e - logits_n).abs().max()) <= one_rounding * float(logits_n.abs().max())
    assert abs(loss_e - loss_n) <= one_rounding * abs(loss_n)
    assert float((grad_e - grad_n).norm()) <= one_rounding * float(grad_n.norm())


def test_bf16_finetune_keeps_float32_masters_over_bf16_frozen_weights(tiny_gpt2_dir, sst2, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import abft_lens.training.job as training  # the module whose _train looks write_checkpoint up
    from abft_lens.models import load_model
    from abft_lens.training import FinetuneConfig, run_finetune, trainable_parameters

    saved_states: list[dict] = []  # the optimiser/RNG state each checkpoint saves (removed when the run ends)
    write_checkpoint = training.write_checkpoint
    monkeypatch.setattr(training, "write_checkpoint",
                        lambda run_dir, runner, **kwargs: saved_states.append(runner.state_dict())
                        or write_checkpoint(run_dir, runner, **kwargs))

    short = [e for e in sst2.examples if len(e.text) < 50][:40]
    data = tmp_path / "short.csv"
    pd.DataFrame({"text": [e.text for e in short], "label": [sst2.label_words[e.label] for e in short]}
                 ).to_csv(data, index=False)
    model = load_model(str(tiny_gpt2_dir), dtype=torch.bfloat16)
    config = FinetuneConfig(model=str(tiny_gpt2_dir), dataset=str(data), n_train=8, k=2, lr=1e-2, batch_size=4,
                            micro_batch_size=2, steps=2, heads="all", checkpoint_every=1, seed=0,
                            precision="bf16", dtype="bfloat16", out=str(tmp_path / "run"))
    result = run_finetune(config, model=model, progress=False)
    trained = trainable_parameters(model, config.trainable)
    assert trained and all(p.dtype == torch.float32 for p in trained.values()), "float32 master copies"
    frozen = [p for name, p in model.named_parameters() if name not in trained]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen), "the frozen weights stay in bf16"
    assert all(t.dtype == torch.float32 for t in load_file(str(result.run_dir / "trained.safetensors")).values())
    moments = [t for t in _tensors(saved_states[-1]) if t.dim() > 1]
    assert moments and all(t.dtype == torch.float32 for t in moments), "Adam's moments in float32"
    assert result.metrics["loss"].notna().all() and torch.isfinite(torch.tensor(result.metrics["loss"].to_numpy())).all()


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


# --- parity on the real model -------------------------------------------------------------------------

@pytest.mark.slow
def test_bf16_head_scores_on_smollm2_agree_with_fp32(smollm2, sst2):
    """The parity the benchmark measures on 256 prompts, on 8: the same strongest heads, label
    masses within bf16 rounding."""
    prompts = build_prompts(smollm2.tokenizer, sst2, sst2.examples[:200], n_prompts=8, k=4, seed=0)
    batch = prompts.collate(range(8))
    layers = list(range(smollm2.cfg.n_layers))
    with torch.no_grad():
        mass32 = gather_label_attention(query_attention_rows(smollm2, batch, layers), batch.label_positions)
        with autocast("bf16", smollm2):
            mass16 = gather_label_attention(query_attention_rows(smollm2, batch, layers), batch.label_positions)
    per_head32, per_head16 = (m.sum(-1).mean(0).flatten() for m in (mass32, mass16))
    assert torch.isfinite(per_head16).all()
    assert float((per_head16 - per_head32).abs().max()) < BF16_PROBABILITY_ATOL
    top32, top16 = (set(per_head.topk(10).indices.tolist()) for per_head in (per_head32, per_head16))
    assert len(top32 & top16) >= 9, f"top-10 heads differ: {sorted(top32)} vs {sorted(top16)}"
    ranks32, ranks16 = (pd.Series(per_head.numpy()).rank() for per_head in (per_head32, per_head16))
    assert ranks32.corr(ranks16) > 0.99
