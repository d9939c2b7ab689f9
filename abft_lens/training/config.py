"""The typed config of one fine-tuning run (``FinetuneConfig``), validated before any work, and the
design choices every run saves beside it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from abft_lens.choices import LORA_METHODS, Method, PidInput, TrainingDemos
from abft_lens.config import validate_config
from abft_lens.errors import ConfigError
from abft_lens.heads import ThresholdKind
from abft_lens.lora import LoraSettings
from abft_lens.loss import PID_REFERENCE_HEADS, AbftLossConfig, E2ESoftmax, Reduction, Terms
from abft_lens.models import DEFAULT_MODEL
from abft_lens.precision import Precision, WeightDtype

Objective = Literal["abft", "e2e"]
Trainable = Literal["qk", "all"]
HEAD_MODES = ("per-prompt", "all")

# Choices the paper leaves open, saved with every run.
DESIGN_CHOICES = {
    "trained_tensors": "weights of the q and k projections only (no biases); for GPT-2, views of c_attn's Q/K slices",
    "model_mode": "eval (no dropout) during fine-tuning",
    "pseudo_batch": "gradient of the mean over the pseudo-batch: each micro-batch's loss is weighted by its share "
                    "(exact for reduction sum_heads_mean_prompts; for 'mean' a prompt-weighted mean of micro-batch means)",
    "data_order": "a fresh seeded permutation of the training prompts per epoch; a pseudo-batch may span two",
    "validation_split": "the last n_val examples of the training pool are validation queries (never training "
                        "queries); training queries and all demonstrations come from the rest",
    "pid_input": "mean number of induction heads per prompt among the heads given the loss (with the per-prompt "
                 "filter, the flagged heads; with 'all' or a head set, those above the threshold) over the step's "
                 "pseudo-batch (pid_input 'count', the paper's), or that mean over its value at the first step "
                 "with any such head, times "
                 "pid_reference_heads ('relative', ours: the same gains on any number of heads)",
    "training_demos": "training prompts' demonstrations at random (the paper's) or with at least one of the query's "
                      "label: 'label_covering' forces one, 'label_covering_resampled' redraws random sets until one "
                      "holds it; validation prompts always at random, as the test prompts are",
    "keep_checkpoints": "kept intermediate checkpoints hold the trained tensors and the step record; only the "
                        "newest keeps the optimiser state (for resuming), none once the run has finished",
    "lora": "abft-lora/e2e-lora: peft LoRA on the q and k projections of every layer (no bias, no other module); "
            "alpha 32 = 2r by default (the paper gives r = 16 only); dropout 0 by default, and where set it is "
            "active during training steps only",
}


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
    # Optimiser steps of each lr trial; None: the run's full length (``steps``). Full-length trials predicted
    # the test result better than 8-step ones (benchmarks/RESULTS.md, "Choosing the lr"; one seed, four data
    # sets), at four times the search's training.
    lr_search_steps: int | None = None
    batch_size: int = 32  # prompts per optimiser step (pseudo-batch, by gradient accumulation)
    micro_batch_size: int = 8  # prompts per forward; the CLI lowers it to --batch-size when only that is given
    steps: int = 32
    heads: str = "per-prompt"  # "per-prompt" (the paper), "all" (no head filter) or a heads.csv path
    head_top: int | None = 20  # with a heads.csv: its first head_top rows (None: every row)
    threshold: ThresholdKind = "paper"
    tau: float = 2.0  # for threshold "uniform"
    pid: bool = True
    pid_input: PidInput = "count"  # "relative": the flagged-head count over its first value (loss.pid_inputs)
    pid_reference_heads: float = PID_REFERENCE_HEADS  # the "relative" input's scale (loss.PID_REFERENCE_HEADS)
    terms: Terms = "both"
    initial_punish_weight: float = 0.5  # A_0
    reward_weight: float = 1.0  # B
    reduction: Reduction = "sum_heads_mean_prompts"
    e2e_softmax: E2ESoftmax = "label"  # E2E cross-entropy over the label tokens or the whole vocabulary
    trainable: Trainable = "qk"  # "all": every parameter (full fine-tuning, for the cost comparison)
    checkpoint_every: int = 4  # steps between checkpoints
    keep_checkpoints: bool = False  # keep every checkpoint (a trajectory to evaluate), not only the latest
    training_demos: TrainingDemos = "random"  # "label_covering*": the query's label among the demonstrations
    seed: int = 42  # prompts (demonstrations), data order, torch RNG
    pool_seed: int = 42  # the train/demo/test split, fixed across seeds so the test pool stays the same
    label_words: tuple[str, ...] | None = None
    out: str | None = None  # default: runs/finetune_<method>_<model>_<dataset>_seed<seed>
    resume: bool = False
    device: str | None = None
    precision: Precision = "auto"  # bf16 autocast mixed precision or fp32; auto: bf16 where it is fast
    dtype: WeightDtype = "float32"  # how the frozen weights are held; bfloat16 halves their memory
    # The LoRA methods (abft-lora, e2e-lora): the adapters' rank, alpha (update scale alpha / rank) and
    # dropout; the adapted modules are the q and k projections of every layer (config.json lists them).
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    # Base weights in 4-bit NF4 (bitsandbytes; needs a CUDA GPU), the paper's setting for models over 10B;
    # computation in ``dtype``. Only with a LoRA method: 4-bit weights themselves cannot be trained.
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        validate_config(self, positive=("n_train", "k", "batch_size", "micro_batch_size", "steps",
                                        "checkpoint_every", "lora_rank"),
                        non_negative=("n_val", "seed", "pool_seed"),
                        optional_positive=("head_top", "lr_search_steps"),
                        positive_float=("tau", "lora_alpha"))
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise ConfigError(f"lora_dropout must be a number in [0, 1); got {self.lora_dropout!r}.")
        if self.uses_lora and self.trainable != "qk":
            raise ConfigError(f"method {self.method} trains LoRA adapters on q/k; trainable {self.trainable!r} "
                              "applies to the full-rank methods (abft, e2e).")
        if self.load_in_4bit and not self.uses_lora:
            raise ConfigError(f"load_in_4bit holds the base weights in 4 bits, which cannot be trained: use a LoRA "
                              f"method (abft-lora or e2e-lora), not {self.method}.")
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
        try:  # the loss weights and PID settings, checked where they are defined
            self.loss_config()
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def uses_lora(self) -> bool:
        return self.method in LORA_METHODS

    @property
    def lr_trial_steps(self) -> int:
        return lr_trial_steps(self.lr_search_steps, self.steps)

    @property
    def objective(self) -> Objective:
        """The loss: "abft" (attention on the demonstration labels) or "e2e" (the query label's cross-entropy)."""
        return "e2e" if self.method.startswith("e2e") else "abft"

    def lora_settings(self) -> LoraSettings | None:
        return LoraSettings(self.lora_rank, float(self.lora_alpha), float(self.lora_dropout)) if self.uses_lora else None

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"finetune_{self.method}_{Path(self.model).name}_{Path(self.dataset).stem}_seed{self.seed}"

    def loss_config(self) -> AbftLossConfig:
        return AbftLossConfig(terms=self.terms, reward_weight=self.reward_weight,
                              initial_punish_weight=self.initial_punish_weight, pid=self.pid,
                              reduction=self.reduction, pid_input=self.pid_input,
                              pid_reference_heads=self.pid_reference_heads)


# Fields that may differ between a run and its resumption.
_RESUME_FREE = ("resume", "device", "out")


def lr_trial_steps(lr_search_steps: int | None, steps: int) -> int:
    """Optimiser steps of each trial of the lr search: ``lr_search_steps``, or the run's own length where it is
    None (the default). Also applied to a saved config.json's fields when a run resumes."""
    return lr_search_steps or steps
