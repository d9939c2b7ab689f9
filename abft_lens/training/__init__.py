"""Fine-tuning W_Q and W_K: ABFT (method.md sections 4-5) and the end-to-end baseline (section 6).

    cfg = FinetuneConfig(dataset="sst2", method="abft", lr=1e-4)
    train, validation = training_prompts(model, cfg)
    result = finetune(model, train, cfg, validation=validation)
    model = load_trained_model(result.run_dir)

What is trained: only the query and key projection weights of every layer (``q_proj``/``k_proj`` for
Llama-family models; for GPT-2 the bridge splits the fused ``c_attn`` into ``attn.q``/``attn.k``
modules whose weights are views of ``c_attn``, so updating them changes only its Q and K
slices). ``trainable="all"`` trains every parameter (the full-parameter E2E cost comparison). The LoRA
methods (``abft-lora``, ``e2e-lora``: the paper's E2E baseline and its recipe for models over 10B) train
peft LoRA adapters on those q/k projections instead (``abft_lens.lora``); optionally over 4-bit base
weights (``load_in_4bit``, CUDA and bitsandbytes only).

Per optimiser step a pseudo-batch of ``batch_size`` prompts is accumulated from micro-batches.
ABFT reads only the query rows of ``hook_pattern`` and stops the forward after the deepest layer
that can contribute; E2E runs the whole model and takes the cross-entropy of the query's true label
at the last position, and logs the same attention diagnostics from the same forward.

A run folder holds ``config.json`` (the config, the lr search, design choices), ``run.log``,
``metrics.jsonl`` (one line per step), ``checkpoints/step-NNNNNN/`` (trained tensors, optimiser, PID
and RNG state, each directory published atomically) and, when finished, ``trained.safetensors`` (only
the trained tensors, by parameter name: W_Q/W_K, or the LoRA adapters' A and B); ``abft_lens.runs`` owns
that format and loads a trained model back (attaching the adapters for a LoRA run). ``resume=True``
continues from the latest checkpoint to the same final weights as an uninterrupted run: the data order
is a pure function of the seed and the step; a killed lr search goes on from its finished trials.

One module per part of training:

- ``config``: ``FinetuneConfig``, the typed config every run saves;
- ``parameters``: which tensors are trained (W_Q/W_K, all, or LoRA adapters), freezing the rest, and
  the full-precision parameter count (the paper's Param.*);
- ``head_plan``: which heads count in the loss (per prompt, all, or a fixed heads.csv);
- ``runner``: ``FinetuneRunner``, the optimiser, PID controller and data order, one step at a time;
- ``checkpoints``: writing and restoring ``checkpoints/step-NNNNNN/``;
- ``lr_search``: the validation-accuracy search over the lr grid (resumable trial by trial);
- ``job``: ``finetune`` (the run and its folder), ``training_prompts`` and ``run_finetune``;
- ``trajectory``: validation accuracy at each checkpoint a run kept (``keep_checkpoints``).
"""

from abft_lens.runs import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    TRAINED_FILE,
    apply_tensors,
    load_trained_model,
    read_trained_tensors,
    write_json_lines,
)
from abft_lens.training.checkpoints import finish_checkpoints, latest_checkpoint, restore_checkpoint, write_checkpoint
from abft_lens.choices import Method
from abft_lens.training.config import DESIGN_CHOICES, HEAD_MODES, FinetuneConfig, Objective, Trainable
from abft_lens.training.head_plan import HeadPlan, head_mask_for, plan_heads, read_head_set
from abft_lens.training.job import FinetuneResult, finetune, peak_memory_mb, run_finetune, training_prompts
from abft_lens.training.lr_search import LrSearch, select_lr, validation_accuracy
from abft_lens.training.parameters import (
    full_precision_parameter_count,
    only_these_require_grad,
    parameters_to_train,
    snapshot,
    trainable_parameters,
    trainable_qk_parameters,
)
from abft_lens.training.runner import FinetuneRunner, StepSums, training_order
from abft_lens.training.trajectory import validation_trajectory

__all__ = [
    "CHECKPOINTS_DIR", "DESIGN_CHOICES", "HEAD_MODES", "METRICS_FILE", "TRAINED_FILE", "FinetuneConfig",
    "FinetuneResult", "FinetuneRunner", "HeadPlan", "LrSearch", "Method", "Objective", "StepSums", "Trainable",
    "apply_tensors", "finetune", "finish_checkpoints", "full_precision_parameter_count", "head_mask_for",
    "latest_checkpoint", "load_trained_model", "only_these_require_grad", "parameters_to_train", "peak_memory_mb",
    "plan_heads", "read_head_set", "read_trained_tensors",
    "restore_checkpoint", "run_finetune", "select_lr", "snapshot", "trainable_parameters",
    "trainable_qk_parameters", "training_order", "training_prompts", "validation_accuracy", "validation_trajectory",
    "write_checkpoint", "write_json_lines",
]
