"""LoRA adapters on the query and key projections (peft), and where those projections are in a bridge.

The paper trains E2E (its Table 2 baseline) and, for models over 10B, ABFT itself as LoRA r = 16 on q/k
(method.md sections 5-6): ``method="e2e-lora"`` / ``"abft-lora"``.

How the adapters reach a ``TransformerBridge``: the bridge wraps every architecture's q and k
projections as ``blocks.{l}.attn.q`` / ``.k`` (``LinearBridge``), each around a plain ``nn.Linear`` (its
``original_component``): Llama's ``q_proj``/``k_proj`` themselves, and for GPT-2 two Linears whose weights
are views of the fused ``c_attn``'s Q and K slices, built by the bridge when it splits ``c_attn``. peft's
``inject_adapter_in_model`` replaces exactly those Linears (named by their full module names, so nothing
else can match) with ``lora.Linear`` layers; the bridge calls them inside the ``LinearBridge``, so
``hook_q``/``hook_k``, ``hook_attn_scores`` and ``hook_pattern`` see the adapted projections. GPT-2's fused
layout needs nothing special: the adapter sits on the split Q (or K) Linear, so V is never touched, and
merging writes the delta into c_attn's Q/K slice in place (the weight is a view).

Adapters are injected into the Hugging Face model the bridge wraps (``model.original_model``, whose
module tree holds the bridge components), because that is where ``model.named_parameters()`` reads: the
adapter tensors then have ordinary parameter names (``...attn.q._original_component.lora_A.default.weight``)
and are saved, checkpointed and restored like the full-rank runs' W_Q/W_K (``abft_lens.runs``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from abft_lens.errors import AbftLensError

ADAPTER_NAME = "default"
LORA_TARGETS = ("q", "k")  # the bridge's names of the projections that get adapters


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's hyper-parameters (saved in the run's config.json as lora_rank/lora_alpha/lora_dropout).
    The update is ``(alpha / rank) * B A``; B starts at zero, so an attached adapter changes nothing yet."""

    rank: int
    alpha: float
    dropout: float


def qk_projections(model) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer, "q" or "k", the projection module) for every layer, in layer order: the module the bridge
    calls for ``blocks.{l}.attn.q`` / ``.k`` (an ``nn.Linear``, or peft's LoRA layer around one)."""
    found = []
    for layer, block in enumerate(model.blocks):
        attention = getattr(block, "attn", None)
        for part in LORA_TARGETS:
            bridge = getattr(attention, part, None) if attention is not None else None
            module = getattr(bridge, "original_component", None) if bridge is not None else None
            if module is None:
                raise AbftLensError(
                    f"Cannot find the {part.upper()} projection of layer {layer}: blocks.{layer}.attn.{part} is "
                    "missing. This architecture's bridge does not expose separate q/k modules; use "
                    "trainable='all' or add support for it.")
            found.append((layer, part, module))
    return found


def _module_names(model) -> dict[int, str]:
    return {id(module): name for name, module in model.original_model.named_modules()}


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """peft's LoRA layers in the model, by module name (empty for a model without adapters)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.original_model.named_modules() if isinstance(module, LoraLayer)}


def has_lora(model) -> bool:
    return bool(lora_layers(model))


def attach_lora(model, settings: LoraSettings, seed: int) -> list[str]:
    """Put a LoRA adapter on the q and k projection of every layer (in place); returns the adapted
    modules' names. ``seed`` makes A's random initialisation repeatable without touching the global RNG.
    The base parameters keep their ``requires_grad`` flags (peft would clear them; the training loop
    freezes what it does not train), so removing the adapter leaves the model as it was."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise AbftLensError("LoRA needs the 'peft' package: pip install 'abft-lens[lora]'.") from None
    if has_lora(model):
        raise AbftLensError("The model already carries LoRA adapters; remove them first (remove_lora).")
    names = _module_names(model)
    targets = [names[id(module)] for _, _, module in qk_projections(model)]
    flags = {id(p): p.requires_grad for p in model.parameters()}  # by identity: peft renames the base weights
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model.original_model, adapter_name=ADAPTER_NAME)
    for p in model.parameters():
        if id(p) in flags:
            p.requires_grad_(flags[id(p)])
    return targets


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The adapters' A and B matrices, by parameter name, in layer order (what a LoRA run trains)."""
    params = {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    if not params:
        raise AbftLensError("The model carries no LoRA adapter (attach_lora first).")
    return params


def remove_lora(model, merge: bool) -> None:
    """Take the adapters out again (in place): with ``merge`` their update ``(alpha / r) B A`` is first
    added to the base weights (so W_Q/W_K become the fine-tuned ones), without it the base weights are
    left exactly as they were. Either way the model is a plain bridge model afterwards."""
    root = model.original_model
    for name, layer in lora_layers(model).items():
        if merge:
            layer.merge(adapter_names=[ADAPTER_NAME])
        parent, _, child = name.rpartition(".")
        # The LinearBridge holds its Linear as the registered submodule "_original_component".
        root.get_submodule(parent).add_module(child, layer.get_base_layer())
    # inject_adapter_in_model records its LoraConfig on the model; left there, the next attach_lora makes
    # peft warn of "multiple adapters" although none is left. Only ours goes.
    recorded = getattr(root, "peft_config", None)
    if isinstance(recorded, dict):
        recorded.pop(ADAPTER_NAME, None)
        if not recorded:
            del root.peft_config


@contextmanager
def lora_attached(model, settings: LoraSettings | None, seed: int) -> Iterator[None]:
    """Adapters on the q/k projections for the duration (``attach_lora``), taken out unmerged afterwards,
    also on an error, so the model is a plain one again; nothing happens for ``settings`` None (a full-rank
    method). For work that scores or times a LoRA run without keeping its adapters."""
    if settings is None:
        yield
        return
    attach_lora(model, settings, seed)
    try:
        yield
    finally:
        remove_lora(model, merge=False)


@contextmanager
def lora_dropout_active(model) -> Iterator[None]:
    """The adapters' dropout on for the duration. Fine-tuning runs the model in eval mode (no dropout
    in the frozen model; DESIGN_CHOICES), which would silently switch a LoRA dropout off too."""
    dropouts = [module for name, module in model.original_model.named_modules()
                if ".lora_dropout." in f"{name}." and isinstance(module, torch.nn.Dropout)]
    for module in dropouts:
        module.train()
    try:
        yield
    finally:
        for module in dropouts:
            module.eval()
