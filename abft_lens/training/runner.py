"""The training loop's state and one optimiser step: ``FinetuneRunner`` owns the optimiser, the PID
controller, the data order and the step counter; ``step`` runs one pseudo-batch by gradient
accumulation over micro-batches. No files here (``abft_lens.training.job`` adds them)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from abft_lens import distributed
from abft_lens.errors import AbftLensError, DataError
from abft_lens.forward import query_logits_and_rows
from abft_lens.heads import gather_label_attention, label_attention
from abft_lens.lora import lora_dropout_active
from abft_lens.loss import PunishWeightController, abft_loss, e2e_loss, weights_for
from abft_lens.precision import autocast
from abft_lens.prompts import PromptBatch, PromptSet
from abft_lens.training.config import FinetuneConfig, Objective
from abft_lens.training.head_plan import HeadPlan, counted_heads, head_mask_for


# What the PID's history counts, saved with a checkpoint: the induction heads among the loss's heads
# (``head_plan.counted_heads``). Checkpoints without it counted the loss's heads, the same only per prompt.
PID_COUNTS = "induction heads"


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
    flagged: float = 0.0  # heads the loss acts on (all of them without the head filter)
    induction: float = 0.0  # of those, the heads above the induction threshold: the PID's input
    prompts_with_flagged: int = 0
    correct_mass: float = 0.0  # summed over prompts with at least one flagged head
    wrong_mass: float = 0.0
    reward_term: float = 0.0
    punish_term: float = 0.0
    abft_loss: float = 0.0  # E2E only: the ABFT loss (A_0) on the same attention, for comparison
    ce_loss: float = 0.0  # E2E only
    correct_predictions: int = 0  # E2E only: label-space argmax on the training prompts

    def metrics(self, objective: Objective) -> dict[str, float]:
        n, with_flagged = self.prompts, max(self.prompts_with_flagged, 1)
        row = {
            "loss": self.loss / n,
            "flagged_heads": self.flagged / n,
            "induction_heads": self.induction / n,
            "prompts_with_flagged": self.prompts_with_flagged / n,
            "correct_mass": self.correct_mass / with_flagged,
            "wrong_mass": self.wrong_mass / with_flagged,
        }
        if objective == "abft":
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
        if cfg.objective == "abft":
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
        sums.induction += float(counted_heads(self.plan, mask, attention, batch.prompt_lengths, cfg.threshold,
                                              cfg.tau).sum())
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
        # The pseudo-batch's prompts by length, so that its micro-batches pad little. Which micro-batch a
        # prompt falls in does not change the step's gradient (exactly so for the default reduction:
        # DESIGN_CHOICES["pseudo_batch"]), nor the PID input, a mean over the pseudo-batch.
        indices = self.prompts.by_length(self.order[self.completed])
        sums = StepSums()
        punish_weight = weights_for(self.loss_config, self.controller.punish_weight)[0]
        self.optimizer.zero_grad(set_to_none=True)
        # Data parallel (torchrun): this rank runs its whole micro-batches of the pseudo-batch with their
        # global shares, so the gradients summed over ranks are the single-process ones (see
        # abft_lens.distributed). In a single process the three distributed calls are the identity.
        mine = [indices[i] for i in distributed.shard_batches(len(indices), self.config.micro_batch_size)]
        with lora_dropout_active(self.model) if self.config.uses_lora else contextlib.nullcontext():
            for batch in self.prompts.batches(self.config.micro_batch_size, mine):
                self._micro_step(batch.to(self.device), len(batch.query_labels) / len(indices), sums)
        distributed.all_reduce_gradients(self.params.values())
        sums = distributed.all_reduce_sums(sums)
        self.optimizer.step()
        self.completed += 1
        row = {"step": self.completed, **sums.metrics(self.config.objective), "punish_weight": punish_weight}
        if self.config.objective == "abft":
            self.controller.step(row["induction_heads"])
        row["seconds"] = time.perf_counter() - started
        return row

    def state_dict(self) -> dict[str, object]:
        return {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "completed": self.completed, "pid": self.controller.state_dict(), "pid_counts": PID_COUNTS}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state.get("pid_counts") != PID_COUNTS and self.plan.mode != "per-prompt":
            # Its PID history holds the loss's head count (a constant 270 without the filter); appending
            # induction-head counts to it would drive A to its floor through the integral term.
            raise AbftLensError(f"Cannot resume this run: it was started before the PID counted the induction "
                                f"heads among the loss's heads (with --heads {self.config.heads}); start it over.")
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.completed = int(state["completed"])
        self.controller.load_state_dict(state["pid"])
