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
the hardware runs it fast, float32 elsewhere, and says which and why.

bf16 asked for on a CPU without bf16 instructions (avx2 only, or ``ONEDNN_MAX_CPU_ISA`` capped below
them): PyTorch's fallback bf16 matmul kernel is some 50x slower than float32 there (measured on an
avx2-only AMD EPYC: 8.2 s against 0.15 s for a [3200, 576] @ [576, 1536] product), which would make a
bf16 run unaffordable. So on such a CPU the autocast region *emulates* the bf16 matmuls
(``EmulatedBf16Matmuls``): each operand is rounded to bf16, the product is taken in float32 and
rounded to bf16, which is what the bf16 instructions compute (exact products of bf16 values,
accumulated in float32, a bf16 result); only the order of the float32 additions may differ, as it does
between thread counts. Every other op sees the same bf16 tensors as under plain autocast. It takes
about float32's time (its backward keeps float32 copies of the operands, so more memory than native
bf16), so ``auto`` still picks float32 on such a CPU; asking for bf16 there keeps a
bf16 grid in one precision on any machine.
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
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from abft_lens import distributed
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
    kept (bf16 on a GPU without native bf16 warns; on such a CPU it is emulated)."""
    fast, seen = fast_bf16(device)
    if requested == "auto":
        if fast:
            return PrecisionChoice("bf16", f"auto: {seen} (bf16 passed the parity check, benchmarks/RESULTS.md)")
        return PrecisionChoice("fp32", f"auto: {seen}, so bf16 would not be faster")
    if requested not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {requested!r}")
    if requested == "bf16" and not fast:
        if torch.device(device).type == "cpu":
            return PrecisionChoice("bf16", f"asked for ({seen}: bf16 matmuls emulated in float32, "
                                           "about as fast as fp32)")
        if distributed.is_main_process():  # once, not once per torchrun rank
            warnings.warn(f"--precision bf16 on hardware without fast bf16 ({seen}): it will be slower than fp32.",
                          stacklevel=2)
    return PrecisionChoice(requested, f"asked for ({seen})")


def _finite_masked_scores(scores: Float[Tensor, "batch head query_pos key_pos"], hook) -> Tensor:
    # The bridge masks with float32's minimum, which rounds to -inf in bf16. A query row with no
    # visible key (the pads of a left-padded prompt) then softmaxes to NaN, and the NaN reaches every
    # later layer through 0 * NaN in pattern @ V. bf16's own minimum keeps the row finite (uniform,
    # as in float32); clamp's backward sends no gradient to the masked entries.
    return scores.clamp_min(torch.finfo(scores.dtype).min)


# The ops CPU autocast runs in bf16 that a transformer forward reaches (projections, QK^T, pattern @ V,
# per-head einsums, the unembedding); the rest of autocast's bf16 list (convolutions, RNNs, fused
# attention) is not on our models' path and keeps autocast's own kernels.
_BF16_MATMULS = frozenset({
    torch.nn.functional.linear, torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__,
    torch.mm, Tensor.mm, torch.bmm, Tensor.bmm, torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm,
    torch.einsum,
})


def _rounded_to_bf16_as_float32(value):
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16).float()
    return value


def _autocast_would_cast(operands) -> bool:
    """Autocast casts a matmul to bf16 only when its floating operands are float32 or bf16 (float64 and
    integer matmuls keep their dtype); emulate exactly those."""
    dtypes = {leaf.dtype for leaf in tree_leaves(operands) if isinstance(leaf, Tensor)}
    return bool(dtypes) and dtypes <= {torch.float32, torch.bfloat16}


class EmulatedBf16Matmuls(TorchFunctionMode):
    """Inside a CPU bf16 autocast region: each matmul of ``_BF16_MATMULS`` takes bf16-rounded operands,
    multiplies them in float32 and returns the bf16-rounded product, as bf16 instructions would (see the
    module doc). Outside an enabled bf16 autocast (e.g. a float32 loss block inside it) it does nothing.
    Autograd records the roundings and the float32 product, so the backward is emulated too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func not in _BF16_MATMULS or not torch.is_autocast_enabled("cpu")
                or torch.get_autocast_dtype("cpu") != torch.bfloat16 or "out" in kwargs
                or not _autocast_would_cast((args, kwargs))):
            return func(*args, **kwargs)
        args, kwargs = tree_map(_rounded_to_bf16_as_float32, (args, kwargs))
        with torch.autocast("cpu", enabled=False):
            return func(*args, **kwargs).to(torch.bfloat16)


@contextlib.contextmanager
def autocast(precision: Precision, model, emulate_bf16: bool | None = None) -> Iterator[None]:
    """The autocast region of ``model``'s forwards: bf16 matmuls for ``bf16`` (emulated on a CPU without
    bf16 instructions), nothing for ``fp32``; ``auto`` is resolved for the model's device (jobs resolve it
    once, print the choice and save it in config.json). ``emulate_bf16`` forces the emulation on or off
    (a parity check of the two); by default it is on exactly where a CPU lacks bf16 instructions."""
    device = model_device(model)
    if precision == "auto":
        precision = resolve_precision("auto", device).precision
    if precision == "fp32":
        yield
        return
    if precision != "bf16":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    score_hooks = [(name, _finite_masked_scores) for name in model.hook_dict if name.endswith("attn.hook_attn_scores")]
    if emulate_bf16 is None:
        emulate_bf16 = device.type == "cpu" and not fast_bf16(device)[0]
    emulated = EmulatedBf16Matmuls() if emulate_bf16 else contextlib.nullcontext()
    with torch.autocast(device.type, dtype=torch.bfloat16), emulated, model.hooks(fwd_hooks=score_hooks):
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
