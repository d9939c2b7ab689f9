"""The learning-rate search: a trial run (by default as long as the run itself) at each lr of the grid,
scored by validation accuracy on queries from the training pool (never the test pool). Each trial starts
from the same weights and seed, so a killed search resumes from its finished trials (``earlier``) to the same choice."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from abft_lens.errors import DataError
from abft_lens.evaluation.prediction import predict
from abft_lens.precision import autocast
from abft_lens.prompts import PromptSet
from abft_lens.training.config import FinetuneConfig
from abft_lens.training.head_plan import HeadPlan, plan_heads
from abft_lens.training.parameters import apply_tensors, only_these_require_grad, parameters_to_train, snapshot
from abft_lens.training.runner import FinetuneRunner


@dataclass
class LrSearch:
    """Validation accuracy after a trial run (``steps``) at each lr; ``chosen`` is the best (ties:
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
              plan: HeadPlan | None = None, progress: bool = True, earlier: dict[str, object] | None = None,
              on_trial: Callable[[dict[str, object]], None] | None = None) -> LrSearch:
    """Train ``config.lr_search_steps`` steps (None: ``config.steps``, a full-length trial) at each lr of
    ``config.lr_grid`` from the current weights, score label-space accuracy on ``validation`` (queries never
    used for training), restore the weights. Validation prompts must come from the training pool, never from
    the test pool.

    ``on_trial`` is given the search so far (LrSearch's fields less ``chosen``) after each trial;
    ``earlier`` is such a record from a killed search of the same config (the caller checks that, grid
    included), whose trials are not run again. ``seconds`` then adds up the processes' finished trials: the
    trial a killed process did not finish is not counted."""
    if len(validation) == 0:
        raise DataError("The lr search needs validation prompts (n_val > 0).")
    started = time.perf_counter()
    earlier = earlier or {}
    trials = [dict(trial) for trial in earlier.get("trials", [])]
    earlier_seconds = float(earlier.get("seconds", 0.0))
    plan = plan or plan_heads(config.heads, model.cfg.n_layers, model.cfg.n_heads, config.head_top)
    params = parameters_to_train(model, config)
    initial = snapshot(params)
    trial_config = dataclasses.replace(config, steps=config.lr_trial_steps)
    baseline = earlier.get("baseline_accuracy")
    if baseline is None:
        baseline = validation_accuracy(model, validation, config.micro_batch_size, config.precision)
    done = {trial["lr"] for trial in trials}
    if done and progress:
        tqdm.write(f"lr search: {len(done)} of {len(config.lr_grid)} trials done before, "
                   f"{', '.join(f'{lr:g}' for lr in sorted(done))}: not run again")
    with only_these_require_grad(model, params):
        for lr in config.lr_grid:
            if lr in done:
                continue
            torch.manual_seed(config.seed)
            runner = FinetuneRunner(model, prompts, trial_config, lr, plan, params)
            bar = tqdm(range(trial_config.steps), desc=f"lr search {lr:g}", unit="step", disable=not progress)
            rows = [runner.step() for _ in bar]
            bar.close()
            accuracy = validation_accuracy(model, validation, config.micro_batch_size, config.precision)
            trials.append({"lr": lr, "validation_accuracy": accuracy, "final_loss": rows[-1]["loss"],
                           "first_loss": rows[0]["loss"]})
            if progress:
                tqdm.write(f"lr {lr:g}: validation accuracy {accuracy:.3f} (untrained {baseline:.3f}), "
                           f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
            apply_tensors(model, initial)
            if on_trial is not None:
                on_trial({"steps": trial_config.steps, "n_validation": len(validation),
                          "baseline_accuracy": baseline,
                          "trials": list(trials), "seconds": earlier_seconds + time.perf_counter() - started})
    trials.sort(key=lambda trial: config.lr_grid.index(trial["lr"]))
    best = max(trials, key=lambda trial: (trial["validation_accuracy"], -trial["lr"]))
    return LrSearch(trial_config.steps, len(validation), baseline, trials, best["lr"],
                    earlier_seconds + time.perf_counter() - started)
