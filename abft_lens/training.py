"""Fine-tuning W_Q and W_K: ABFT (method.md sections 4-5) and the end-to-end baseline (section 6).

    cfg = FinetuneConfig(dataset="sst2", method="abft", lr=1e-4)
    train, validation = training_prompts(model, cfg)
    result = finetune(model, train, cfg, validation=validation)
    model = load_trained_model(result.run_dir)

What is trained: only the query and key projection weights of every layer (``q_proj``/``k_proj`` for
Llama-family models; for GPT-2 the bridge splits the fused ``c_attn`` into ``attn.q``/``attn.k``
modules whose weights are views of ``c_attn``, so updating them changes only its Q and K
slices). ``trainable="all"`` trains every parameter (the full-parameter E2E cost comparison).

Per optimiser step a pseudo-batch of ``batch_size`` prompts is accumulated from micro-batches.
ABFT reads only the query rows of ``hook_pattern`` and stops the forward after the deepest layer
that can contribute; E2E runs the whole model and takes the cross-entropy of the query's true label
at the last position, and logs the same attention diagnostics from the same forward.

A run folder holds ``config.json`` (the config, the lr search, design choices), ``metrics.jsonl``
(one line per step), ``checkpoints/step-NNNNNN/`` (trained tensors, optimiser, PID and RNG state,
each directory published atomically) and, when finished, ``trained.safetensors`` (only the trained
tensors, by parameter name). ``resume=True`` continues from the latest checkpoint to the same final
weights as an uninterrupted run: the data order is a pure function of the seed and the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens import distributed
from abft_lens.config import validate_config
from abft_lens.data import load_dataset, split_pools
from abft_lens.errors import AbftLensError, ConfigError, DataError, HeadSelectionError
from abft_lens.evaluation import predict
from abft_lens.forward import query_logits_and_rows
from abft_lens.heads import Head, ThresholdKind, gather_label_attention, induction_head_mask, label_attention
from abft_lens.loss import (
    AbftLossConfig,
    E2ESoftmax,
    PunishWeightController,
    Reduction,
    Terms,
    abft_loss,
    e2e_loss,
    weights_for,
)
from abft_lens.models import DEFAULT_MODEL, load_model
from abft_lens.precision import (
    WEIGHT_DTYPES,
    Precision,
    WeightDtype,
    autocast,
    keep_float32_masters,
    resolve_config_precision,
)
from abft_lens.prompts import PromptBatch, PromptSet, build_prompts
from abft_lens.runs import atomic_write_bytes, atomic_write_text, load_config, save_config

Method = Literal["abft", "e2e"]
Trainable = Literal["qk", "all"]
HEAD_MODES = ("per-prompt", "all")

TRAINED_FILE = "trained.safetensors"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{6})$")

# Choices the paper leaves open, saved with every run.
DESIGN_CHOICES = {
    "trained_tensors": "weights of the q and k projections only (no biases); for GPT-2, views of c_attn's Q/K slices",
    "model_mode": "eval (no dropout) during fine-tuning",
    "pseudo_batch": "gradient of the mean over the pseudo-batch: each micro-batch's loss is weighted by its share "
                    "(exact for reduction sum_heads_mean_prompts; for 'mean' a prompt-weighted mean of micro-batch means)",
    "data_order": "a fresh seeded permutation of the training prompts per epoch; a pseudo-batch may span two",
    "validation_split": "the last n_val examples of the training pool are validation queries (never training "
                        "queries); training queries and all demonstrations come from the rest",
    "pid_input": "mean number of flagged heads per prompt over the step's pseudo-batch",
}


# --- configuration -----------------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """One fine-tuning run. The CLI (`abft-lens finetune`) and the Python API share it; it is saved
    in the run folder's ``config.json``."""

    model: str = DEFAULT_MODEL
    dataset: str = "sst2"
    method: Method = "abft"
    n_train: int = 512  # training prompts (queries from the training pool)
    n_val: int = 128  # validation queries carved from the end of the training pool (lr search)
    k: int = 4
    lr: float | None = None  # None: chosen from lr_grid by validation accuracy (select_lr)
    lr_grid: tuple[float, ...] = (2e-5, 1e-4, 3e-4, 1e-3)
    lr_search_steps: int = 8  # optimiser steps of each trial run of the lr search
    batch_size: int = 32  # prompts per optimiser step (pseudo-batch, by gradient accumulation)
    micro_batch_size: int = 8  # prompts per forward; the CLI lowers it to --batch-size when only that is given
    steps: int = 32
    heads: str = "per-prompt"  # "per-prompt" (the paper), "all" (no head filter) or a heads.csv path
    head_top: int | None = 20  # with a heads.csv: its first head_top rows (None: every row)
    threshold: ThresholdKind = "paper"
    tau: float = 2.0  # for threshold "uniform"
    pid: bool = True
    terms: Terms = "both"
    initial_punish_weight: float = 0.5
    reduction: Reduction = "sum_heads_mean_prompts"
    e2e_softmax: E2ESoftmax = "label"  # E2E cross-entropy over the label tokens or the whole vocabulary
    trainable: Trainable = "qk"  # "all": every parameter (full fine-tuning, for the cost comparison)
    checkpoint_every: int = 4  # steps between checkpoints
    seed: int = 42  # prompts (demonstrations), data order, torch RNG
    pool_seed: int = 42  # the train/demo/test split, fixed across seeds so the test pool stays the same
    label_words: tuple[str, ...] | None = None
    out: str | None = None  # default: runs/finetune_<method>_<model>_<dataset>_seed<seed>
    resume: bool = False
    device: str | None = None
    precision: Precision = "auto"  # bf16 autocast mixed precision or fp32; auto: bf16 where it is fast
    dtype: WeightDtype = "float32"  # how the frozen weights are held; bfloat16 halves their memory

    def __post_init__(self) -> None:
        validate_config(self, positive=("n_train", "k", "batch_size", "micro_batch_size", "steps",
                                        "checkpoint_every", "lr_search_steps"),
                        non_negative=("n_val", "seed", "pool_seed"), optional_positive=("head_top",),
                        positive_float=("tau",))
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(f"micro_batch_size ({self.micro_batch_size}) exceeds batch_size ({self.batch_size}): "
                              "a pseudo-batch is made of whole micro-batches.")
        for lr in ([self.lr] if self.lr is not None else list(self.lr_grid)):
            if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
                raise ConfigError(f"learning rates must be positive numbers; got lr {lr!r}.")
        if self.lr is None and not self.lr_grid:
            raise ConfigError("lr is None (search) but lr_grid is empty.")
        self.lr_grid = tuple(float(lr) for lr in self.lr_grid)
        if self.label_words is not None:
            self.label_words = tuple(self.label_words)

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"finetune_{self.method}_{Path(self.model).name}_{Path(self.dataset).stem}_seed{self.seed}"

    def loss_config(self) -> AbftLossConfig:
        return AbftLossConfig(terms=self.terms, initial_punish_weight=self.initial_punish_weight, pid=self.pid,
                              reduction=self.reduction)


# Fields that may differ between a run and its resumption.
_RESUME_FREE = ("resume", "device", "out")


# --- which tensors are trained ---------------------------------------------------------------------


def trainable_qk_parameters(model) -> dict[str, torch.nn.Parameter]:
    """W_Q and W_K of every layer, by parameter name, in layer order.

    The bridge exposes every architecture's query and key projections as ``blocks.{l}.attn.q`` and
    ``.k`` (Llama's ``q_proj``/``k_proj``; GPT-2's ``attn.q``/``attn.k``, whose weights are views of
    the fused ``c_attn``). Only weights are returned, not biases."""
    names = {id(param): name for name, param in model.named_parameters()}
    chosen: dict[str, torch.nn.Parameter] = {}
    for layer, block in enumerate(model.blocks):
        attention = getattr(block, "attn", None)
        for part in ("q", "k"):
            module = getattr(attention, part, None) if attention is not None else None
            weights = [p for n, p in module.named_parameters() if n.endswith("weight")] if module is not None else []
            if len(weights) != 1:
                raise AbftLensError(
                    f"Cannot find the {part.upper()} projection weight of layer {layer}: expected one weight "
                    f"under blocks.{layer}.attn.{part}, found {len(weights)}. This architecture's bridge does "
                    "not expose separate q/k modules; use trainable='all' or add support for it."
                )
            chosen[names[id(weights[0])]] = weights[0]
    return chosen


def trainable_parameters(model, which: Trainable = "qk") -> dict[str, torch.nn.Parameter]:
    if which == "qk":
        return trainable_qk_parameters(model)
    if which == "all":
        return dict(model.named_parameters())
    raise ValueError(f"trainable must be 'qk' or 'all', got {which!r}")


@contextmanager
def only_these_require_grad(model, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Freeze every other parameter for the duration (so no gradient is even computed for them);
    restore the flags afterwards."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    chosen = {id(p) for p in params.values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, Tensor]:
    """Detached contiguous copies (safe to save with safetensors, also for views of c_attn)."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}


def apply_tensors(model, tensors: dict[str, Tensor]) -> None:
    """Copy ``tensors`` into the model's parameters of the same names (in place, so views of a fused
    parameter write into it)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise AbftLensError(f"The trained tensors name parameters this model does not have: {unknown[:3]}...")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise AbftLensError(f"{name}: trained tensor has shape {tuple(tensor.shape)}, the model's "
                                    f"parameter {tuple(params[name].shape)}.")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


# --- which heads count --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadPlan:
    """Which layers are run and which heads count: per prompt by the threshold, all heads, or a fixed
    set (then only its layers are read and the forward stops after its deepest layer)."""

    mode: Literal["per-prompt", "all", "fixed"]
    layers: tuple[int, ...]
    fixed_heads: tuple[Head, ...] = ()

    def fixed_mask(self, n_heads: int) -> Bool[Tensor, "layer head"]:
        mask = torch.zeros(len(self.layers), n_heads, dtype=torch.bool)
        position = {layer: i for i, layer in enumerate(self.layers)}
        for layer, head in self.fixed_heads:
            mask[position[layer], head] = True
        return mask


def read_head_set(path: str | Path, top: int | None = None) -> list[Head]:
    """The (layer, head) pairs of a heads CSV (``find-heads``' heads.csv, or any CSV with ``layer`` and
    ``head`` columns), in file order, the first ``top`` of them."""
    path = Path(path)
    if not path.is_file():
        raise HeadSelectionError(f"Head set file {path} does not exist (use 'per-prompt', 'all' or a heads.csv).")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    missing = [c for c in ("layer", "head") if c not in frame.columns]
    if missing:
        raise HeadSelectionError(f"{path} has no column(s) {missing}; a head set needs 'layer' and 'head' columns.")
    if top is not None:
        frame = frame.head(top)
    heads = [(int(layer), int(head)) for layer, head in zip(frame["layer"], frame["head"], strict=True)]
    if not heads:
        raise HeadSelectionError(f"The head set in {path} is empty: there is no head to train.")
    return heads


def plan_heads(spec: str, n_layers: int, n_heads: int, top: int | None = None) -> HeadPlan:
    if spec == "per-prompt" or spec == "all":
        return HeadPlan(spec, tuple(range(n_layers)))
    heads = read_head_set(spec, top)
    bad = [(layer, head) for layer, head in heads if not (0 <= layer < n_layers and 0 <= head < n_heads)]
    if bad:
        raise HeadSelectionError(f"Heads {bad[:5]} in {spec} are outside the model's {n_layers} layers x {n_heads} heads.")
    unique = tuple(sorted(set(heads)))
    return HeadPlan("fixed", tuple(sorted({layer for layer, _ in unique})), unique)


def head_mask_for(plan: HeadPlan, attention: Float[Tensor, "batch layer head k"],
                  prompt_lengths, threshold: ThresholdKind, tau: float) -> Bool[Tensor, "batch layer head"]:
    if plan.mode == "per-prompt":
        return induction_head_mask(attention, prompt_lengths, threshold, tau)
    if plan.mode == "all":
        return torch.ones(attention.shape[:3], dtype=torch.bool, device=attention.device)
    mask = plan.fixed_mask(attention.shape[2]).to(attention.device)
    return mask.expand(attention.shape[0], -1, -1)


# --- data order -------------------------------------------------------------------------------------


def training_order(n_prompts: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The prompt indices of every pseudo-batch: epochs of seeded permutations, concatenated and cut
    into ``steps`` batches of ``batch_size``. A pure function, so a resumed run sees the same order."""
    if n_prompts < 1:
        raise DataError("No training prompts.")
    rng = np.random.default_rng(seed)
    needed = batch_size * steps
    order: list[int] = []
    while len(order) < needed:
        order += rng.permutation(n_prompts).tolist()
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


# --- one step ---------------------------------------------------------------------------------------


@dataclass
class StepSums:
    """Sums over the prompts of one pseudo-batch, turned into the step's metrics."""

    prompts: int = 0
    loss: float = 0.0
    flagged: float = 0.0
    prompts_with_flagged: int = 0
    correct_mass: float = 0.0  # summed over prompts with at least one flagged head
    wrong_mass: float = 0.0
    reward_term: float = 0.0
    punish_term: float = 0.0
    abft_loss: float = 0.0  # E2E only: the ABFT loss (A_0) on the same attention, for comparison
    ce_loss: float = 0.0  # E2E only
    correct_predictions: int = 0  # E2E only: label-space argmax on the training prompts

    def metrics(self, method: Method) -> dict[str, float]:
        n, with_flagged = self.prompts, max(self.prompts_with_flagged, 1)
        row = {
            "loss": self.loss / n,
            "flagged_heads": self.flagged / n,
            "prompts_with_flagged": self.prompts_with_flagged / n,
            "correct_mass": self.correct_mass / with_flagged,
            "wrong_mass": self.wrong_mass / with_flagged,
        }
        if method == "abft":
            row.update(reward_term=self.reward_term / n, punish_term=self.punish_term / n)
        else:
            row.update(abft_loss=self.abft_loss / n, ce_loss=self.ce_loss / n,
                       train_accuracy=self.correct_predictions / n)
        return row


class FinetuneRunner:
    """Owns the optimiser, the PID controller and the step counter of one training run; ``step``
    runs one pseudo-batch. No files: ``finetune`` adds checkpoints and metrics around it."""

    def __init__(self, model, prompts: PromptSet, config: FinetuneConfig, lr: float,
                 plan: HeadPlan, params: dict[str, torch.nn.Parameter]) -> None:
        self.model, self.prompts, self.config, self.lr, self.plan = model, prompts, config, lr, plan
        self.params = params
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.Adam(list(params.values()), lr=lr)
        self.loss_config = config.loss_config()
        self.controller = PunishWeightController(self.loss_config)
        self.order = training_order(len(prompts), config.batch_size, config.steps, config.seed)
        self.completed = 0  # optimiser steps done

    def _micro_step(self, batch: PromptBatch, share: float, sums: StepSums) -> None:
        cfg = self.config
        punish, reward = weights_for(self.loss_config, self.controller.punish_weight)
        # Only the forward runs under autocast; the rows and logits it returns are float32, so the
        # losses and their backward start in float32 (the backward of each op runs in its forward's dtype).
        if cfg.method == "abft":
            with autocast(cfg.precision, self.model):
                attention = label_attention(self.model, batch, self.plan.layers)
            mask = head_mask_for(self.plan, attention, batch.prompt_lengths, cfg.threshold, cfg.tau)
            out = abft_loss(attention, batch.correct_mask, mask, punish, reward, cfg.reduction)
            (out.loss * share).backward()
            sums.loss += float(out.loss.detach()) * len(batch.query_labels)
        else:
            with autocast(cfg.precision, self.model):
                logits, rows = query_logits_and_rows(self.model, batch, self.plan.layers)
            ce = e2e_loss(logits, batch.label_token_ids, batch.query_labels, cfg.e2e_softmax)
            (ce * share).backward()
            attention = gather_label_attention(rows, batch.label_positions)
            mask = head_mask_for(self.plan, attention, batch.prompt_lengths, cfg.threshold, cfg.tau)
            out = abft_loss(attention, batch.correct_mask, mask, self.loss_config.initial_punish_weight,
                            self.loss_config.reward_weight, cfg.reduction)
            n = len(batch.query_labels)
            label_space = logits.detach().index_select(-1, batch.label_token_ids)
            sums.loss += float(ce.detach()) * n
            sums.ce_loss += float(ce.detach()) * n
            sums.abft_loss += float(out.loss) * n
            sums.correct_predictions += int((label_space.argmax(-1) == batch.query_labels).sum())
        has_flagged = out.flagged_heads_per_prompt > 0
        sums.prompts += len(batch.query_labels)
        sums.flagged += float(out.flagged_heads_per_prompt.sum())
        sums.prompts_with_flagged += int(has_flagged.sum())
        sums.correct_mass += float(out.correct_mass[has_flagged].sum())
        sums.wrong_mass += float(out.wrong_mass[has_flagged].sum())
        sums.reward_term += float(out.reward_term) * len(batch.query_labels)
        sums.punish_term += float(out.punish_term) * len(batch.query_labels)

    def step(self) -> dict[str, float]:
        """One optimiser step on the next pseudo-batch; returns its metrics."""
        if self.completed >= len(self.order):
            raise RuntimeError(f"All {len(self.order)} steps are done.")
        started = time.perf_counter()
        indices = self.order[self.completed]
        sums = StepSums()
        punish_weight = weights_for(self.loss_config, self.controller.punish_weight)[0]
        self.optimizer.zero_grad(set_to_none=True)
        # Data parallel (torchrun): this rank runs its whole micro-batches of the pseudo-batch with their
        # global shares, so the gradients summed over ranks are the single-process ones (see
        # abft_lens.distributed). In a single process the three distributed calls are the identity.
        mine = [indices[i] for i in distributed.shard_batches(len(indices), self.config.micro_batch_size)]
        for batch in self.prompts.batches(self.config.micro_batch_size, mine):
            self._micro_step(batch.to(self.device), len(batch.query_labels) / len(indices), sums)
        distributed.all_reduce_gradients(self.params.values())
        sums = distributed.all_reduce_sums(sums)
        self.optimizer.step()
        self.completed += 1
        row = {"step": self.completed, **sums.metrics(self.config.method), "punish_weight": punish_weight}
        if self.config.method == "abft":
            self.controller.step(row["flagged_heads"])
        row["seconds"] = time.perf_counter() - started
        return row

    def state_dict(self) -> dict[str, object]:
        return {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "completed": self.completed, "pid": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.completed = int(state["completed"])
        self.controller.load_state_dict(state["pid"])


# --- checkpoints --------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_checkpoint(run_dir: Path, runner: FinetuneRunner) -> Path:
    """``checkpoints/step-NNNNNN/`` with the trained tensors (safetensors), optimiser/RNG state and the
    PID/step record, built in a temporary directory and renamed into place; older ones are removed."""
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{runner.completed:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        save_file(snapshot(runner.params), str(staging / TRAINED_FILE))
        torch.save(runner.state_dict(), staging / "state.pt")
        (staging / "state.json").write_text(json.dumps(
            {"step": runner.completed, "lr": runner.lr, "pid": runner.controller.state_dict()}, indent=1))
        for file in staging.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in root.iterdir():
        match = _STEP_DIR.match(old.name)
        if old != final and (match or old.name.startswith(".step-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


def read_trained_tensors(path: str | Path, remedy: str | None = None) -> dict[str, Tensor]:
    """The tensors of a ``trained.safetensors`` (a finished run's or a checkpoint's). A file that cannot
    be read (truncated by a full disk, damaged) is an ``AbftLensError`` naming it and what to do."""
    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        remedy = remedy or (f"delete it and re-run the fine-tuning with `abft-lens finetune --config "
                            f"{path.parent / 'config.json'} --resume` (it continues from the last checkpoint if one "
                            "is left, else starts over)")
        raise AbftLensError(f"Cannot read the trained tensors in {path}: {error}. The file is truncated or "
                            f"damaged; {remedy}.") from error


def restore_checkpoint(checkpoint: Path, runner: FinetuneRunner) -> None:
    apply_tensors(runner.model, read_trained_tensors(
        checkpoint / TRAINED_FILE, remedy=f"delete the checkpoint folder {checkpoint} and re-run with --resume "
                                          "(with no checkpoint left, the run starts over)"))
    runner.load_state_dict(torch.load(checkpoint / "state.pt", weights_only=True))


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, float]]:
    """The metrics lines of steps <= ``up_to_step`` (a line cut short by a kill is dropped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", math.inf) <= up_to_step:
                rows.append(row)
    return rows


def _append_metrics(path: Path, row: dict[str, float]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# --- learning-rate search --------------------------------------------------------------------------


@dataclass
class LrSearch:
    """Validation accuracy after a short run (``steps``) at each lr; ``chosen`` is the best (ties:
    the smaller lr). ``baseline_accuracy`` is the untrained model's."""

    steps: int
    n_validation: int
    baseline_accuracy: float
    trials: list[dict[str, float]]
    chosen: float
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def validation_accuracy(model, prompts: PromptSet, batch_size: int, precision: str = "fp32") -> float:
    with autocast(precision, model):
        result = predict(model, prompts, batch_size, progress=False)
    return float((result.predicted == result.true).double().mean())


def select_lr(model, prompts: PromptSet, validation: PromptSet, config: FinetuneConfig,
              plan: HeadPlan | None = None, progress: bool = True) -> LrSearch:
    """Train ``config.lr_search_steps`` steps at each lr of ``config.lr_grid`` from the current weights,
    score label-space accuracy on ``validation`` (queries never used for training), restore the
    weights. Validation prompts must come from the training pool, never from the test pool."""
    if len(validation) == 0:
        raise DataError("The lr search needs validation prompts (n_val > 0).")
    started = time.perf_counter()
    plan = plan or plan_heads(config.heads, model.cfg.n_layers, model.cfg.n_heads, config.head_top)
    params = trainable_parameters(model, config.trainable)
    initial = snapshot(params)
    short = dataclasses.replace(config, steps=config.lr_search_steps)
    baseline = validation_accuracy(model, validation, config.micro_batch_size, config.precision)
    trials = []
    with only_these_require_grad(model, params):
        for lr in config.lr_grid:
            torch.manual_seed(config.seed)
            runner = FinetuneRunner(model, prompts, short, lr, plan, params)
            bar = tqdm(range(short.steps), desc=f"lr search {lr:g}", unit="step", disable=not progress)
            rows = [runner.step() for _ in bar]
            bar.close()
            accuracy = validation_accuracy(model, validation, config.micro_batch_size, config.precision)
            trials.append({"lr": lr, "validation_accuracy": accuracy, "final_loss": rows[-1]["loss"],
                           "first_loss": rows[0]["loss"]})
            if progress:
                tqdm.write(f"lr {lr:g}: validation accuracy {accuracy:.3f} (untrained {baseline:.3f}), "
                           f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
            apply_tensors(model, initial)
    best = max(trials, key=lambda trial: (trial["validation_accuracy"], -trial["lr"]))
    return LrSearch(short.steps, len(validation), baseline, trials, best["lr"], time.perf_counter() - started)


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    run_dir: Path
    config: FinetuneConfig
    lr: float
    metrics: pd.DataFrame  # one row per step
    trainable_names: list[str]
    trainable_params: int  # number of trained scalars
    train_seconds: float  # sum of the optimiser steps' wall time (over all processes of a resumed run)
    seconds_per_step: float
    peak_memory_mb: float
    lr_search: LrSearch | None = None
    resumed_from_step: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device, else this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check_resumable(run_dir: Path, config: FinetuneConfig) -> dict[str, object]:
    """The saved config.json record; an error if it was made with other settings."""
    record = json.loads((run_dir / "config.json").read_text())
    saved = record.get("config", {})
    current = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    differ = sorted(name for name in current
                    if name not in _RESUME_FREE and saved.get(name) != current[name])
    if differ:
        shown = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in differ)
        raise AbftLensError(f"Cannot resume {run_dir}: it was started with other settings ({shown}).")
    return record


def finetune(model, prompts: PromptSet, config: FinetuneConfig, validation: PromptSet | None = None,
             heads: Sequence[Head] | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``prompts`` and write the run folder (see the module doc).

    ``validation`` is needed when ``config.lr`` is None (the lr search). ``heads``, if given, is a fixed
    head set that overrides ``config.heads``; it is written to the run folder as heads.csv and the saved
    config points at it, so the run can be repeated from its folder. With ``config.resume`` a killed
    run continues from its latest checkpoint, and a finished one is loaded instead of trained again."""
    run_dir = config.run_dir()
    main = distributed.is_main_process()  # under torchrun, rank 0 alone writes and shows progress
    progress = progress and main
    device = next(model.parameters()).device
    if config.precision == "auto":
        config, _ = resolve_config_precision(config, device, announce=progress)
    if heads is not None:
        config = _with_head_file(config, run_dir, heads)
    plan = plan_heads(config.heads, model.cfg.n_layers, model.cfg.n_heads, config.head_top)
    if len(prompts) == 0:
        raise DataError("No training prompts.")
    model.eval()
    params = trainable_parameters(model, config.trainable)
    keep_float32_masters(params.values())
    finished = run_dir / TRAINED_FILE
    metrics_path = run_dir / METRICS_FILE

    record: dict[str, object] = {}
    if config.resume and (run_dir / "config.json").is_file():
        record = _check_resumable(run_dir, config)
    elif finished.exists() or latest_checkpoint(run_dir) is not None:
        raise AbftLensError(f"{run_dir} already holds a run; pass resume=True (--resume) to continue it, "
                            "or choose another output folder (--out).")
    distributed.barrier()  # every rank has looked at the folder before rank 0 writes to it

    lr_search = LrSearch(**record["lr_search"]) if record.get("lr_search") else None
    if config.lr is not None:
        lr = float(config.lr)
    elif lr_search is not None:
        lr = lr_search.chosen
    elif validation is None:
        raise DataError("config.lr is None, so the lr is searched, and that needs validation prompts: "
                        "pass validation=... (see training_prompts) or set lr.")
    else:
        lr_search = select_lr(model, prompts, validation, config, plan, progress)
        lr = lr_search.chosen

    torch.manual_seed(config.seed)
    runner = FinetuneRunner(model, prompts, config, lr, plan, params)
    resumed_from = None
    if finished.exists():  # a finished run: load its result instead of training again
        apply_tensors(model, read_trained_tensors(finished))
        resumed_from = config.steps
    else:
        checkpoint = latest_checkpoint(run_dir) if config.resume else None
        if checkpoint is not None:
            restore_checkpoint(checkpoint, runner)
            resumed_from = runner.completed
        # Steps logged after the checkpoint (by a killed process) are run again; drop their lines.
        if main:
            write_json_lines(metrics_path, _read_metrics(metrics_path, runner.completed))
            _save_record(run_dir, config, "running", lr, lr_search, params, plan, prompts, validation)
        _train(runner, run_dir, progress)
        if main:
            atomic_write_bytes(finished, save_safetensors(snapshot(params), metadata={"model": config.model}))
            shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
        distributed.barrier()  # rank 0's metrics file is complete before every rank reads it

    metrics = pd.DataFrame(_read_metrics(metrics_path, config.steps))
    result = FinetuneResult(
        run_dir=run_dir, config=config, lr=lr, metrics=metrics, trainable_names=list(params),
        trainable_params=sum(p.numel() for p in params.values()),
        train_seconds=float(metrics["seconds"].sum()), seconds_per_step=float(metrics["seconds"].median()),
        peak_memory_mb=peak_memory_mb(device), lr_search=lr_search, resumed_from_step=resumed_from,
    )
    if resumed_from != config.steps and main:
        _save_record(run_dir, config, "finished", lr, lr_search, params, plan, prompts, validation,
                     train_seconds=round(result.train_seconds, 2), seconds_per_step=round(result.seconds_per_step, 3),
                     peak_memory_mb=round(result.peak_memory_mb, 1))
    return result


def _train(runner: FinetuneRunner, run_dir: Path, progress: bool) -> None:
    config = runner.config
    bar = tqdm(total=config.steps, initial=runner.completed, desc=f"{config.method} {Path(config.dataset).stem}",
               unit="step", disable=not progress)
    with only_these_require_grad(runner.model, runner.params):
        while runner.completed < config.steps:
            row = {**runner.step(), "lr": runner.lr}
            if distributed.is_main_process():
                _append_metrics(run_dir / METRICS_FILE, row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", A=f"{row['punish_weight']:.3f}",
                            heads=f"{row['flagged_heads']:.1f}")
            bar.update(1)
            if (runner.completed % config.checkpoint_every == 0 or runner.completed == config.steps) \
                    and distributed.is_main_process():
                write_checkpoint(run_dir, runner)
    bar.close()


def _with_head_file(config: FinetuneConfig, run_dir: Path, heads: Sequence[Head]) -> FinetuneConfig:
    frame = pd.DataFrame([(int(layer), int(head)) for layer, head in heads], columns=["layer", "head"])
    if frame.empty:
        raise HeadSelectionError("The head set is empty: there is no head to train.")
    head_file = run_dir / "heads.csv"
    if distributed.is_main_process() and (not head_file.is_file()
                                          or pd.read_csv(head_file).values.tolist() != frame.values.tolist()):
        atomic_write_text(head_file, frame.to_csv(index=False))
    distributed.barrier()
    return dataclasses.replace(config, heads=str(head_file), head_top=None)


def _save_record(run_dir: Path, config: FinetuneConfig, status: str, lr: float, lr_search: LrSearch | None,
                 params: dict[str, torch.nn.Parameter], plan: HeadPlan, prompts: PromptSet,
                 validation: PromptSet | None, **extra: object) -> None:
    save_config(
        run_dir, config, status=status, lr=lr, lr_search=lr_search.to_dict() if lr_search else None,
        trainable=list(params), trainable_params=sum(p.numel() for p in params.values()),
        head_plan={"mode": plan.mode, "layers": list(plan.layers), "fixed_heads": [list(h) for h in plan.fixed_heads],
                   "forward_stops_after_layer": max(plan.layers) if config.method == "abft" else None},
        n_train_prompts=len(prompts), n_validation_prompts=len(validation) if validation else 0,
        mean_prompt_tokens=float(np.mean([len(p.tokens) for p in prompts.prompts])),
        prompts=prompts.metadata, design_choices=DESIGN_CHOICES, **extra)


def write_json_lines(path: Path, rows: list[dict[str, float]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


# --- the job: prompts, and a trained model from a run folder -------------------------------------------


def training_prompts(model, config: FinetuneConfig) -> tuple[PromptSet, PromptSet | None]:
    """Training and validation prompts from the training pool (never the test pool): the last
    ``n_val`` examples of the pool are validation queries, the rest give the ``n_train`` training
    queries and every demonstration (a query is never its own demonstration)."""
    dataset = load_dataset(config.dataset, config.label_words)
    pool = split_pools(dataset, seed=config.pool_seed).train
    n_val = min(config.n_val, len(pool) // 4)
    train_pool, validation_pool = (pool[:-n_val], pool[-n_val:]) if n_val else (pool, ())
    if config.n_train > len(train_pool):
        raise DataError(f"n_train = {config.n_train}, but the training pool of '{dataset.name}' has "
                        f"{len(train_pool)} examples after carving {n_val} for validation.")
    common = dict(k=config.k, max_length=model.cfg.n_ctx)
    train = build_prompts(model.tokenizer, dataset, train_pool, n_prompts=config.n_train, seed=config.seed, **common)
    validation = (build_prompts(model.tokenizer, dataset, validation_pool, seed=config.seed + 1,
                                demo_pool=train_pool, **common) if n_val else None)
    return train, validation


def run_finetune(config: FinetuneConfig, model=None, progress: bool = True) -> FinetuneResult:
    """The `finetune` job: load the model (or use ``model``, which must be ``config.model``), build the
    prompts, search the lr if asked, train, write the run folder."""
    with distributed.process_group():  # under torchrun: data parallel over the ranks
        model = model if model is not None else load_model(config.model, device=config.device,
                                                           dtype=WEIGHT_DTYPES[config.dtype])
        train, validation = training_prompts(model, config)
        return finetune(model, train, config, validation=validation, progress=progress)


def load_trained_model(run_dir: str | Path, device: str | None = None, dtype: WeightDtype = "float32"):
    """The base model named in the run's config.json with the run's trained tensors applied."""
    run_dir = Path(run_dir)
    trained = run_dir / TRAINED_FILE
    if not (run_dir / "config.json").is_file():
        raise AbftLensError(f"{run_dir} is not a fine-tuning run folder (no config.json).")
    if not trained.is_file():
        raise AbftLensError(f"{run_dir} has no {TRAINED_FILE}: the run has not finished. Resume it with "
                            f"`abft-lens finetune --config {run_dir / 'config.json'} --resume`.")
    config = load_config(run_dir / "config.json", FinetuneConfig)
    tensors = read_trained_tensors(trained)  # before the model loads: a damaged file fails at once
    model = load_model(config.model, device=device, dtype=WEIGHT_DTYPES[dtype])
    apply_tensors(model, tensors)
    model.eval()
    return model
