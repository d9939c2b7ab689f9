"""Numerical precision of model jobs: float32, or bf16 autocast mixed precision.

``bf16`` is ``torch.autocast`` with bfloat16: matmuls (the projections, QK^T, pattern @ V, the
unembedding) run in bf16, which AMX (Intel Sapphire Rapids and later), avx512_bf16 and GPU tensor
cores execute several times faster than float32. What stays float32:

- the parameters themselves, so the trained W_Q/W_K and Adam's moments are float32 master copies
  (autocast casts a copy of each weight for the matmul; the optimiser updates the float32 one);
- the residual stream and norms (autocast leaves additions and RMSNorm/LayerNorm in float32);
- the attention softmax (the bridge computes it in float32, then stores the pattern in the matmul
  dtype); our code upcasts the query rows it keeps to float32 before any reduction;
- the ABFT loss, the E2E cross-entropy and every sum that feeds a reported number (computed on
  float32 tensors, outside the autocast region where it matters).

``auto`` picks the fastest setting that passed the parity check (benchmarks/RESULTS.md): bf16 where
the hardware runs it fast, float32 elsewhere, and says which and why. Asking for bf16 on hardware
without fast bf16 warns that it will be slow; results are the same bf16 numbers either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from jaxtyping import Float
from torch import Tensor

from abft_lens.choices import Precision, ResolvedPrecision, WeightDtype


WEIGHT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# oneDNN ISA names at or above which the CPU kernels use bf16 instructions (ONEDNN_MAX_CPU_ISA caps them).
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
              "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a job runs in, and why (printed at the start of every job)."""

    precision: ResolvedPrecision
    reason: str

    def describe(self) -> str:
        return f"precision {self.precision}: {self.reason}"


def fast_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` executes bf16 matmuls natively (and so faster than float32), and what was seen."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports bf16 natively"
        return False, f"{name} has no native bf16"
    if device.type != "cpu":
        return False, f"no bf16 fast path known for device type '{device.type}'"
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if capped and capped not in _BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={capped} disables the CPU's bf16 instructions"
    amx = torch.cpu._is_amx_tile_supported()
    avx512_bf16 = torch.cpu._is_avx512_bf16_supported()
    if amx or avx512_bf16:
        seen = " and ".join(name for name, has in (("AMX", amx), ("avx512_bf16", avx512_bf16)) if has)
        return True, f"this CPU has {seen}"
    return False, "this CPU has neither AMX nor avx512_bf16"


def resolve_precision(requested: Precision, device: torch.device | str) -> PrecisionChoice:
    """``auto`` becomes bf16 on hardware with fast bf16 and fp32 elsewhere; an explicit choice is
    kept (bf16 on slow hardware warns)."""
    fast, seen = fast_bf16(device)
    if requested == "auto":
        if fast:
            return PrecisionChoice("bf16", f"auto: {seen} (bf16 passed the parity check, benchmarks/RESULTS.md)")
        return PrecisionChoice("fp32", f"auto: {seen}, so bf16 would not be faster")
    if requested == "bf16" and not fast:
        warnings.warn(f"--precision bf16 on hardware without fast bf16 ({seen}): it will be slower than fp32.",
                      stacklevel=2)
    if requested not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {requested!r}")
    return PrecisionChoice(requested, f"asked for ({seen})")


def _finite_masked_scores(scores: Float[Tensor, "batch head query_pos key_pos"], hook) -> Tensor:
    # The bridge masks with float32's minimum, which rounds to -inf in bf16. A query row with no
    # visible key (the pads of a left-padded prompt) then softmaxes to NaN, and the NaN reaches every
    # later layer through 0 * NaN in pattern @ V. bf16's own minimum keeps the row finite (uniform,
    # as in float32); clamp's backward sends no gradient to the masked entries.
    return scores.clamp_min(torch.finfo(scores.dtype).min)


@contextlib.contextmanager
def autocast(precision: Precision, model) -> Iterator[None]:
    """The autocast region of ``model``'s forwards: bf16 matmuls for ``bf16``, nothing for ``fp32``;
    ``auto`` is resolved for the model's device (jobs resolve it once, print the choice and save it in
    config.json)."""
    device = model_device(model)
    if precision == "auto":
        precision = resolve_precision("auto", device).precision
    if precision == "fp32":
        yield
        return
    if precision != "bf16":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    score_hooks = [(name, _finite_masked_scores) for name in model.hook_dict if name.endswith("attn.hook_attn_scores")]
    with torch.autocast(device.type, dtype=torch.bfloat16), model.hooks(fwd_hooks=score_hooks):
        yield


def check_precision_fields(precision: str, dtype: str) -> None:
    """The checks every job config runs on its ``precision`` and ``dtype`` fields."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be one of auto, fp32, bf16; got {precision!r}")
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {dtype!r}")
    if dtype == "bfloat16" and precision == "fp32":
        raise ValueError("dtype bfloat16 holds the frozen weights in bf16, so the matmuls run in bf16: "
                         "use precision bf16 (or auto), or dtype float32")


ConfigT = TypeVar("ConfigT")


def resolve_config_precision(config: ConfigT, device: torch.device | str, announce: bool = True
                             ) -> tuple[ConfigT, PrecisionChoice]:
    """``config`` with its ``precision`` resolved (``auto`` -> fp32 or bf16), and the choice, printed
    when ``announce``. Weights held in bf16 (``dtype``) imply bf16 matmuls."""
    if getattr(config, "dtype", "float32") == "bfloat16" and config.precision == "auto":
        choice = PrecisionChoice("bf16", "the frozen weights are held in bf16 (dtype bfloat16)")
    else:
        choice = resolve_precision(config.precision, device)
    if announce:
        print(choice.describe(), flush=True)
    return dataclasses.replace(config, precision=choice.precision), choice


def keep_float32_masters(params: Iterable[torch.nn.Parameter]) -> None:
    """Trained parameters are float32 even where the frozen weights are held in bf16: the optimiser
    then updates (and keeps its moments for) float32 master copies; autocast casts them per matmul."""
    for param in params:
        if param.dtype != torch.float32:
            param.data = param.data.float()


def model_device(model) -> torch.device:
    return next(model.parameters()).device
