"""Validation accuracy along a run's trajectory: the base model (step 0), every checkpoint the run kept
(``keep_checkpoints``) and its final tensors, each scored on the run's own validation prompts (queries
carved from the training pool, never the test pool; ``training_prompts``) as the lr search scores its
trials. With it an lr can be chosen from full-length runs, or from their checkpoints every few steps,
instead of from the search's short trials."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from abft_lens.errors import DataError
from abft_lens.runs import (
    CONFIG_FILE,
    VALIDATION_TRAJECTORY_FILE,
    apply_tensors,
    atomic_write_text,
    load_config,
    read_trained_tensors,
    run_payload,
    trained_tensor_files,
)
from abft_lens.training.config import FinetuneConfig
from abft_lens.training.job import training_prompts
from abft_lens.training.lr_search import validation_accuracy
from abft_lens.training.parameters import parameters_to_train, snapshot


def validation_trajectory(run_dir: str | Path, model=None, device: str | None = None,
                          progress: bool = True) -> pd.DataFrame:
    """One row per step with trained tensors in ``run_dir`` (and step 0, the base model): ``step``,
    ``validation_accuracy``, ``n_validation``, ``lr``. Written to the run folder's
    validation_trajectory.csv. ``model`` (the run's base model) is left as it was given. A LoRA run's
    adapters are attached for the scoring (B = 0 at step 0: the base model) and removed afterwards."""
    from abft_lens.lora import lora_attached
    from abft_lens.models import load_model
    from abft_lens.precision import WEIGHT_DTYPES, resolve_config_precision

    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE, FinetuneConfig)
    files = trained_tensor_files(run_dir)
    if not files:
        raise DataError(f"{run_dir} holds no trained tensors: no kept checkpoint and no trained.safetensors.")
    model = model if model is not None else load_model(config.model, device=device, dtype=WEIGHT_DTYPES[config.dtype])
    _, validation = training_prompts(model, config)
    if validation is None:
        raise DataError(f"{run_dir} was trained with n_val = 0: it has no validation split to score.")
    # Each file's tensors replace the adapters' initial values.
    with lora_attached(model, config.lora_settings(), seed=config.seed):
        base = snapshot(parameters_to_train(model, config))
        config, _ = resolve_config_precision(config, next(model.parameters()).device, announce=False)
        rows = []
        try:
            steps = tqdm([(0, None), *files], desc="validation", unit="checkpoint", disable=not progress)
            for step, path in steps:
                apply_tensors(model, base if path is None else read_trained_tensors(path))
                accuracy = validation_accuracy(model, validation, config.micro_batch_size, config.precision)
                rows.append({"step": step, "validation_accuracy": accuracy, "n_validation": len(validation)})
        finally:
            apply_tensors(model, base)
    frame = pd.DataFrame(rows).assign(lr=run_payload(run_dir).get("lr"))
    atomic_write_text(run_dir / VALIDATION_TRAJECTORY_FILE, frame.to_csv(index=False, float_format="%.6g"))
    return frame
