"""The `finetune` job: the training and validation prompts, the run (lr search, training with
checkpoints and metrics, the finished tensors) and its run folder (see ``abft_lens.runs``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from abft_lens import distributed
from abft_lens.data import load_dataset, split_pools
from abft_lens.errors import AbftLensError, DataError, HeadSelectionError
from abft_lens.heads import Head
from abft_lens.lora import attach_lora
from abft_lens.models import load_model
from abft_lens.precision import WEIGHT_DTYPES, keep_float32_masters, resolve_config_precision
from abft_lens.prompts import PromptSet, build_prompts, share_without_query_label
from abft_lens.runs import (
    CONFIG_FILE,
    LR_SEARCH_FILE,
    METRICS_FILE,
    TRAINED_FILE,
    append_metrics,
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_dirs,
    read_metrics,
    read_trained_tensors,
    run_log,
    save_config,
    write_json_lines,
)
from abft_lens.training.checkpoints import (
    finish_checkpoints,
    latest_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from abft_lens.training.config import _RESUME_FREE, DESIGN_CHOICES, FinetuneConfig, lr_trial_steps
from abft_lens.training.head_plan import HeadPlan, plan_heads
from abft_lens.training.lr_search import LrSearch, select_lr
from abft_lens.training.parameters import (
    apply_tensors,
    full_precision_parameter_count,
    only_these_require_grad,
    parameters_to_train,
    snapshot,
)
from abft_lens.training.runner import FinetuneRunner

log = logging.getLogger("abft_lens.finetune")


@dataclass
class FinetuneResult:
    run_dir: Path
    config: FinetuneConfig
    lr: float
    metrics: pd.DataFrame  # one row per step
    trainable_names: list[str]
    trainable_params: int  # number of trained scalars
    full_precision_params: int  # the paper's Param.* (training.parameters.full_precision_parameter_count)
    train_seconds: float  # sum of the optimiser steps' wall time (over all processes of a resumed run)
    seconds_per_step: float  # median wall time of one optimiser step (forward, backward, update)
    peak_memory_mb: float
    lr_search: LrSearch | None = None
    resumed_from_step: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device, else this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check_resumable(run_dir: Path, config: FinetuneConfig, file_name: str = CONFIG_FILE) -> dict[str, object]:
    """The record saved as ``file_name`` (config.json, or lr_search.json); an error if it was made with other
    settings."""
    record = json.loads((run_dir / file_name).read_text())
    # A field the saved config lacks came after the run was started: the run had its default behaviour.
    defaults = json.loads(json.dumps(dataclasses.asdict(FinetuneConfig()), default=str))
    saved = {**defaults, **record.get("config", {})}
    current = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    for fields in (saved, current):
        # The trial length matters only to an lr search, and None is the run's own length: a fixed-lr run saved
        # when the default was 8 resumes under today's default, and 32 resumes as None for a 32-step run.
        searched = fields.get("lr") is None
        fields["lr_search_steps"] = (lr_trial_steps(fields.get("lr_search_steps"), fields["steps"]) if searched
                                     else None)
    differ = sorted(name for name in current
                    if name not in _RESUME_FREE and saved.get(name) != current[name])
    if differ:
        shown = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in differ)
        raise AbftLensError(f"Cannot resume {run_dir}: its {file_name} was made with other settings ({shown}).")
    return record


def finetune(model, prompts: PromptSet, config: FinetuneConfig, validation: PromptSet | None = None,
             heads: Sequence[Head] | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``prompts`` and write the run folder (see the module doc).

    ``validation`` is needed when ``config.lr`` is None (the lr search). ``heads``, if given, is a fixed
    head set that overrides ``config.heads``; it is written to the run folder as heads.csv and the saved
    config points at it, so the run can be repeated from its folder. With ``config.resume`` a killed
    run continues from its latest checkpoint (or its lr search from the finished trials), and a finished one
    is loaded instead of trained again."""
    run_dir = config.run_dir()
    main = distributed.is_main_process()  # under torchrun, rank 0 alone writes and shows progress
    progress = progress and main
    device = next(model.parameters()).device
    # Resolved (and its reason recorded) whether asked for or chosen: config.json then says whether the
    # step times were measured with native or emulated bf16.
    config, precision_choice = resolve_config_precision(config, device, announce=progress)
    if heads is not None:
        config = _with_head_file(config, run_dir, heads)
    plan = plan_heads(config.heads, model.cfg.n_layers, model.cfg.n_heads, config.head_top)
    if len(prompts) == 0:
        raise DataError("No training prompts.")
    model.eval()
    finished = run_dir / TRAINED_FILE
    metrics_path = run_dir / METRICS_FILE

    record: dict[str, object] = {}
    if config.resume and (run_dir / CONFIG_FILE).is_file():
        record = _check_resumable(run_dir, config)
    elif finished.exists() or checkpoint_dirs(run_dir):
        raise AbftLensError(f"{run_dir} already holds a run; pass resume=True (--resume) to continue it, "
                            "or choose another output folder (--out).")
    distributed.barrier()  # every rank has looked at the folder before rank 0 writes to it
    # Adapters (seeded, B = 0) go on after the folder checks, so a refused run leaves the model as it was.
    lora_targets = attach_lora(model, config.lora_settings(), config.seed) if config.uses_lora else None
    params = parameters_to_train(model, config)
    keep_float32_masters(params.values())
    costs = {"full_precision_params": full_precision_parameter_count(model, params, config.objective)}
    if lora_targets is not None:
        costs["lora"] = {**dataclasses.asdict(config.lora_settings()), "target_modules": lora_targets}
    recorded = {"precision_reason": precision_choice.reason, **costs}  # config.json's facts beyond the config
    # A run resumed on other hardware (native bf16, then emulated) has step times of both: keep every reason.
    reasons = list(record.get("precision_reasons") or filter(None, [record.get("precision_reason")]))
    # (A finished run is only loaded: no step runs under the new reason.)
    precision_changed = bool(reasons) and reasons[-1] != precision_choice.reason and not finished.exists()
    if not reasons or precision_changed:
        reasons.append(precision_choice.reason)
    if len(reasons) > 1:
        recorded["precision_reasons"] = reasons

    with contextlib.ExitStack() as stack:
        if main:  # rank 0 alone writes the run folder, its log included
            stack.enter_context(run_log(run_dir, "finetune"))
        log.info("finetune %s on %s: method %s, %d prompts, %d steps of %d (micro-batch %d), heads %s, "
                 "precision %s (%s)%s", config.model, config.dataset, config.method, len(prompts), config.steps,
                 config.batch_size, config.micro_batch_size, config.heads, config.precision, precision_choice.reason,
                 ", resuming" if config.resume else "")
        if precision_changed and main:
            log.warning("%s was started under precision %r and resumes under %r: its step times mix both "
                        "(config.json precision_reasons)", run_dir, reasons[-2], reasons[-1])
        lr_search = LrSearch(**record["lr_search"]) if record.get("lr_search") else None
        if config.lr is not None:
            lr = float(config.lr)
        elif lr_search is not None:
            lr = lr_search.chosen
        elif validation is None:
            raise DataError("config.lr is None, so the lr is searched, and that needs validation prompts: "
                            "pass validation=... (see training_prompts) or set lr.")
        else:
            lr_search, search_reasons = _search_lr(model, prompts, validation, config, plan, progress,
                                                   precision_choice.reason)
            lr = lr_search.chosen
            if len(search_reasons) > 1:  # a killed search's trials were timed under another reason
                recorded["precision_reasons"] = search_reasons  # (the steps run under the last one)

        torch.manual_seed(config.seed)
        runner = FinetuneRunner(model, prompts, config, lr, plan, params)
        resumed_from = None
        if finished.exists():  # a finished run: load its result instead of training again
            apply_tensors(model, read_trained_tensors(finished))
            resumed_from = config.steps
            log.info("%s is a finished run: loaded its trained tensors instead of training again", run_dir)
        else:
            checkpoint = latest_checkpoint(run_dir) if config.resume else None
            if checkpoint is not None:
                restore_checkpoint(checkpoint, runner)
                resumed_from = runner.completed
                log.info("resumed from %s (step %d)", checkpoint, runner.completed)
            # Steps logged after the checkpoint (by a killed process) are run again; drop their lines.
            if main:
                write_json_lines(metrics_path, read_metrics(metrics_path, runner.completed))
                _save_record(run_dir, config, "running", lr, lr_search, params, plan, prompts, validation, **recorded)
                (run_dir / LR_SEARCH_FILE).unlink(missing_ok=True)  # config.json holds the search now
            _train(runner, run_dir, progress)
            if main:
                atomic_write_bytes(finished, save_safetensors(snapshot(params), metadata={"model": config.model}))
                finish_checkpoints(run_dir, keep=config.keep_checkpoints)
            distributed.barrier()  # rank 0's metrics file is complete before every rank reads it

        metrics = pd.DataFrame(read_metrics(metrics_path, config.steps))
        result = FinetuneResult(
            run_dir=run_dir, config=config, lr=lr, metrics=metrics, trainable_names=list(params),
            trainable_params=sum(p.numel() for p in params.values()),
            full_precision_params=costs["full_precision_params"],
            train_seconds=float(metrics["seconds"].sum()), seconds_per_step=float(metrics["seconds"].median()),
            peak_memory_mb=peak_memory_mb(device), lr_search=lr_search, resumed_from_step=resumed_from,
        )
        if resumed_from != config.steps and main:
            _save_record(run_dir, config, "finished", lr, lr_search, params, plan, prompts, validation, **recorded,
                         train_seconds=round(result.train_seconds, 2), seconds_per_step=round(result.seconds_per_step, 3),
                         peak_memory_mb=round(result.peak_memory_mb, 1))
            log.info("finished: %d steps at lr %g in %.1f s, trained tensors in %s", config.steps, lr,
                     result.train_seconds, finished)
        return result


def _search_lr(model, prompts: PromptSet, validation: PromptSet, config: FinetuneConfig, plan: HeadPlan,
               progress: bool, precision_reason: str) -> tuple[LrSearch, list[str]]:
    """``select_lr``, with each finished trial saved to the run folder's lr_search.json, and a resumed
    run's search going on from the trials saved there by a killed process. Also returns the precision
    reasons its trials ran under, oldest first, ``precision_reason`` (this process's) last: more than
    one when a killed search resumes on other hardware (saved in lr_search.json too)."""
    run_dir = config.run_dir()
    earlier, reasons = None, [precision_reason]
    if config.resume and (run_dir / LR_SEARCH_FILE).is_file():
        saved = _check_resumable(run_dir, config, LR_SEARCH_FILE)
        # (a file from before precision_reasons were saved: its trials count as this process's reason)
        earlier, before = saved["lr_search"], saved.get("precision_reasons", [])
        reasons = before if before[-1:] == [precision_reason] else [*before, precision_reason]
        log.info("lr search: resuming, %d trial(s) done before", len(earlier["trials"]))
        if len(reasons) > len(before) > 0 and distributed.is_main_process():
            log.warning("%s's lr search was started under precision %r and resumes under %r: its trial times "
                        "mix both (config.json precision_reasons)", run_dir, before[-1], precision_reason)
    distributed.barrier()  # every rank has read the saved trials before rank 0 adds to them or removes them
    if not config.resume and distributed.is_main_process():
        # A fresh run starts a fresh search: an older run's trials must not be resumed into this one's.
        (run_dir / LR_SEARCH_FILE).unlink(missing_ok=True)
    search = select_lr(model, prompts, validation, config, plan, progress, earlier=earlier,
                       on_trial=lambda so_far: _save_lr_search_progress(run_dir, config, so_far, reasons))
    log.info("lr search: %s -> lr %g", ", ".join(f"{t['lr']:g}: validation accuracy "
             f"{t['validation_accuracy']:.3f}" for t in search.trials), search.chosen)
    return search, reasons


def _save_lr_search_progress(run_dir: Path, config: FinetuneConfig, so_far: dict[str, object],
                             precision_reasons: list[str]) -> None:
    if distributed.is_main_process():
        save_config(run_dir, config, name=LR_SEARCH_FILE, lr_search=so_far, precision_reasons=precision_reasons)


def _train(runner: FinetuneRunner, run_dir: Path, progress: bool) -> None:
    config = runner.config
    bar = tqdm(total=config.steps, initial=runner.completed, desc=f"{config.method} {Path(config.dataset).stem}",
               unit="step", disable=not progress)
    with only_these_require_grad(runner.model, runner.params):
        while runner.completed < config.steps:
            row = {**runner.step(), "lr": runner.lr}
            if distributed.is_main_process():
                append_metrics(run_dir / METRICS_FILE, row)
            log.info("step %d: loss %.4f, flagged heads %.2f, correct mass %.3f, wrong mass %.3f",
                     row["step"], row["loss"], row["flagged_heads"], row["correct_mass"], row["wrong_mass"])
            bar.set_postfix(loss=f"{row['loss']:.3f}", A=f"{row['punish_weight']:.3f}",
                            heads=f"{row['induction_heads']:.1f}")
            bar.update(1)
            if (runner.completed % config.checkpoint_every == 0 or runner.completed == config.steps) \
                    and distributed.is_main_process():
                write_checkpoint(run_dir, runner, keep=config.keep_checkpoints)
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
                   "forward_stops_after_layer": max(plan.layers) if config.objective == "abft" else None},
        n_train_prompts=len(prompts), n_validation_prompts=len(validation) if validation else 0,
        mean_prompt_tokens=float(np.mean([len(p.tokens) for p in prompts.prompts])),
        prompts={**prompts.metadata, "share_without_query_label": share_without_query_label(prompts)},
        design_choices=DESIGN_CHOICES, **extra)


# --- the job: prompts, and a trained model from a run folder -------------------------------------------


def training_prompts(model, config: FinetuneConfig) -> tuple[PromptSet, PromptSet | None]:
    """Training and validation prompts from the training pool (never the test pool): the last
    ``n_val`` examples of the pool are validation queries, the rest give the ``n_train`` training
    queries and every demonstration (a query is never its own demonstration), drawn as
    ``config.training_demos`` says."""
    dataset = load_dataset(config.dataset, config.label_words)
    pool = split_pools(dataset, seed=config.pool_seed).train
    n_val = min(config.n_val, len(pool) // 4)
    train_pool, validation_pool = (pool[:-n_val], pool[-n_val:]) if n_val else (pool, ())
    if config.n_train > len(train_pool):
        raise DataError(f"n_train = {config.n_train}, but the training pool of '{dataset.name}' has "
                        f"{len(train_pool)} examples after carving {n_val} for validation.")
    common = dict(k=config.k, max_length=model.cfg.n_ctx)
    train = build_prompts(model.tokenizer, dataset, train_pool, n_prompts=config.n_train, seed=config.seed,
                          demo_sampling=config.training_demos, **common)
    # Validation prompts keep random demonstrations whatever config.training_demos: they stand in for the test.
    validation = (build_prompts(model.tokenizer, dataset, validation_pool, seed=config.seed + 1,
                                demo_pool=train_pool, **common) if n_val else None)
    return train, validation


def run_finetune(config: FinetuneConfig, model=None, progress: bool = True) -> FinetuneResult:
    """The `finetune` job: load the model (or use ``model``, which must be ``config.model``), build the
    prompts, search the lr if asked, train, write the run folder."""
    with distributed.process_group():  # under torchrun: data parallel over the ranks
        model = model if model is not None else load_model(config.model, device=config.device,
                                                           dtype=WEIGHT_DTYPES[config.dtype],
                                                           load_in_4bit=config.load_in_4bit)
        train, validation = training_prompts(model, config)
        return finetune(model, train, config, validation=validation, progress=progress)
