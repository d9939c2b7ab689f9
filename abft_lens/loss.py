"""The ABFT loss (method.md section 4) and the PID controller that adapts its punishment weight A.

For an induction head on a prompt, with alpha its attention from the query's last token to the k
demonstration label tokens:

    L = A * sum_{i in I_minus} alpha_i  +  B * sum_{i in I_plus} (1 - alpha_i)

Heads that are not flagged contribute 0. The "no head filter" ablation is an all-True head mask.

The end-to-end baseline's loss (``e2e_loss``, method.md section 6) lives here too, so that the
training loop and the gradient analysis use one definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from abft_lens.choices import PidInput

Terms = Literal["both", "reward", "punish"]
E2ESoftmax = Literal["label", "vocab"]
# The paper does not say how per-head losses combine; the default is recorded in the run config.
Reduction = Literal["sum_heads_mean_prompts", "mean"]

# The "relative" PID input's fixed scale: the controller sees PID_REFERENCE_HEADS * n_t / n_1. The paper tuned
# its gains (0.03, 0.005, 0.005) on models that flag tens to hundreds of heads per prompt; SmolLM2-135M flags
# about 11-15 of its 270 (4-5.5%). The same share of Llama3-8B's 1024 heads or GPT2-XL's 1200 is 41-66, so 50
# puts any model's input on the scale the gains were tuned for (an estimate: the paper gives no count). On
# SmolLM2 this makes A react about 4x more to the same relative change than the paper's count input does.
PID_REFERENCE_HEADS = 50.0


@dataclass(frozen=True)
class AbftLossConfig:
    """Loss weights, the ablation of its terms, and the PID gains on the punishment weight A.

    ``min_punish_weight`` is our design choice, not the paper's: the controller clamps A at this
    floor (>= 0), so that punishing wrong labels can never turn into rewarding them.

    ``pid_input`` "relative" (ours, not the paper's) feeds the controller ``pid_reference_heads * n_t / n_1``
    (n_1 the first non-zero count, at least one head) instead of n_t (see ``pid_inputs``), so that its gains
    act alike whatever the number of heads.
    """

    terms: Terms = "both"
    reward_weight: float = 1.0  # B
    initial_punish_weight: float = 0.5  # A_0
    pid: bool = True  # False: A stays at A_0 (the paper's "no PID" ablation)
    kp: float = 0.03
    ki: float = 0.005
    kd: float = 0.005
    min_punish_weight: float = 0.0
    reduction: Reduction = "sum_heads_mean_prompts"
    pid_input: PidInput = "count"
    pid_reference_heads: float = PID_REFERENCE_HEADS

    def __post_init__(self) -> None:
        if self.pid_input not in get_args(PidInput):
            raise ValueError(f"pid_input must be one of {get_args(PidInput)}, got {self.pid_input!r}")
        if not (isinstance(self.pid_reference_heads, (int, float)) and math.isfinite(self.pid_reference_heads)
                and self.pid_reference_heads > 0):
            raise ValueError(f"pid_reference_heads must be a finite number > 0, got {self.pid_reference_heads!r}")
        if self.terms not in get_args(Terms):
            raise ValueError(f"terms must be one of {get_args(Terms)}, got {self.terms!r}")
        if self.reduction not in get_args(Reduction):
            raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {self.reduction!r}")
        for name in ("reward_weight", "initial_punish_weight", "kp", "ki", "kd", "min_punish_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.initial_punish_weight < self.min_punish_weight:
            raise ValueError(
                f"initial_punish_weight ({self.initial_punish_weight}) is below "
                f"min_punish_weight ({self.min_punish_weight})"
            )


def weights_for(config: AbftLossConfig, punish_weight: float) -> tuple[float, float]:
    """(A, B) to pass to `abft_loss`, with the ``terms`` ablation applied to the current A."""
    reward_weight = config.reward_weight
    if config.terms == "reward":
        punish_weight = 0.0
    elif config.terms == "punish":
        reward_weight = 0.0
    return punish_weight, reward_weight


@dataclass
class AbftLossOutput:
    """The loss and detached diagnostics; per-prompt means are 0 where no head is flagged."""

    loss: Float[Tensor, ""]
    flagged_heads_per_prompt: Float[Tensor, " batch"]
    correct_mass: Float[Tensor, " batch"]  # mean over flagged heads of sum(alpha[I_plus])
    wrong_mass: Float[Tensor, " batch"]  # mean over flagged heads of sum(alpha[I_minus])
    reward_term: Float[Tensor, ""]  # B * sum(1 - alpha[I_plus]), reduced like the loss
    punish_term: Float[Tensor, ""]  # A * sum(alpha[I_minus]), reduced like the loss


def _check_shapes(label_attention: Tensor, correct_mask: Tensor, head_mask: Tensor) -> None:
    if label_attention.ndim != 4 or not label_attention.is_floating_point():
        raise ValueError(
            "label_attention must be a float tensor [batch, layer, head, k], "
            f"got {label_attention.dtype} of shape {tuple(label_attention.shape)}"
        )
    batch, layer, head, k = label_attention.shape
    for name, mask, expected in (
        ("correct_mask", correct_mask, (batch, k)),
        ("head_mask", head_mask, (batch, layer, head)),
    ):
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(
                f"{name} must be a bool tensor of shape {expected} to match label_attention "
                f"{tuple(label_attention.shape)}, got {mask.dtype} of shape {tuple(mask.shape)}"
            )


def abft_loss(
    label_attention: Float[Tensor, "batch layer head k"],
    correct_mask: Bool[Tensor, "batch k"],
    head_mask: Bool[Tensor, "batch layer head"],
    punish_weight: float,
    reward_weight: float = 1.0,
    reduction: Reduction = "sum_heads_mean_prompts",
) -> AbftLossOutput:
    """ABFT loss over the flagged heads. ``head_mask`` is treated as a constant (no gradient)."""
    _check_shapes(label_attention, correct_mask, head_mask)
    if reduction not in get_args(Reduction):
        raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {reduction!r}")

    correct = correct_mask.to(label_attention.dtype)
    correct_mass = einops.einsum(label_attention, correct, "b l h k, b k -> b l h")
    wrong_mass = einops.einsum(label_attention, 1 - correct, "b l h k, b k -> b l h")
    n_correct = einops.reduce(correct, "b k -> b", "sum")
    reward = reward_weight * (n_correct[:, None, None] - correct_mass)
    punish = punish_weight * wrong_mass

    # torch.where rather than multiplying by the mask: NaN/inf in an unflagged head stays out of
    # the loss, and with nothing flagged the result is still a 0 connected to the graph.
    zero = label_attention.new_zeros(())
    reward = einops.reduce(torch.where(head_mask, reward, zero), "b l h -> b", "sum")
    punish = einops.reduce(torch.where(head_mask, punish, zero), "b l h -> b", "sum")

    flagged = einops.reduce(head_mask.to(label_attention.dtype), "b l h -> b", "sum")
    if reduction == "sum_heads_mean_prompts":
        # Prompts with no flagged head still count in the mean: they contribute a loss of 0.
        reward_term, punish_term = reward.mean(), punish.mean()
    else:
        n_pairs = flagged.sum().clamp(min=1)
        reward_term, punish_term = reward.sum() / n_pairs, punish.sum() / n_pairs

    def per_prompt_mean(mass: Tensor) -> Tensor:
        total = einops.reduce(torch.where(head_mask, mass, zero), "b l h -> b", "sum")
        return (total / flagged.clamp(min=1)).detach()

    return AbftLossOutput(
        loss=reward_term + punish_term,
        flagged_heads_per_prompt=flagged.detach(),
        correct_mass=per_prompt_mean(correct_mass),
        wrong_mass=per_prompt_mean(wrong_mass),
        reward_term=reward_term.detach(),
        punish_term=punish_term.detach(),
    )


def pid_inputs(counts: Sequence[float], mode: PidInput = "count",
               reference_heads: float = PID_REFERENCE_HEADS) -> list[float]:
    """The PID controller's inputs for the induction-head counts n_1, ..., n_t: the counts themselves
    ("count", the paper's), or ``reference_heads * n_i / n_ref`` ("relative"), n_ref the first non-zero
    count (the first step's, unless no head was flagged then; inputs before it are 0), at least one head.
    Relative inputs do not change when every count is multiplied by the same factor: the gains act alike on
    270 heads and on 1024. A pure function of the counts, so the controller's saved history is all a resumed
    run needs."""
    if mode == "count":
        return [float(n) for n in counts]
    if mode != "relative":
        raise ValueError(f"mode must be one of {get_args(PidInput)}, got {mode!r}")
    first = next((float(n) for n in counts if n > 0), None)
    if first is None:
        return [0.0 for _ in counts]
    # Counts are means per prompt: a first count far below one head (a head flagged on a few prompts) would
    # multiply every later input by a huge factor and throw A about; below one head the scale is one head.
    reference = max(first, 1.0)
    return [reference_heads * float(n) / reference for n in counts]


class PunishWeightController:
    """The paper's PID controller on A, driven by n_t = mean induction heads per prompt at step t among the
    heads given the loss (the flagged heads, with the paper's per-prompt filter; the training runner counts
    them with ``training.head_plan.counted_heads``) (or, with
    ``pid_input`` "relative", by ``pid_inputs``' scaled counts in place of every n).

    Call `step(n_t)` after optimiser step t = 1, 2, ...; it returns A_t for the next step. A is
    unchanged for t <= 2; afterwards

        A_t = A_{t-1} + kp (n_t - n_{t-1}) + ki sum_{i=2..t} (n_i - n_{i-1}) + kd (n_t - 2 n_{t-1} + n_{t-2})

    clamped at ``min_punish_weight``. The clamped value is the next step's A_{t-1}.
    """

    def __init__(self, config: AbftLossConfig) -> None:
        self.config = config
        self.punish_weight = config.initial_punish_weight
        self.history: list[float] = []  # n_1, ..., n_t as counted (the inputs are derived from them)

    def step(self, n_flagged: float) -> float:
        n_flagged = float(n_flagged)
        if not (math.isfinite(n_flagged) and n_flagged >= 0):
            raise ValueError(f"n_flagged must be a finite number >= 0, got {n_flagged!r}")
        self.history.append(n_flagged)
        cfg = self.config
        if not cfg.pid or len(self.history) <= 2:
            return self.punish_weight
        inputs = pid_inputs(self.history, cfg.pid_input, cfg.pid_reference_heads)
        n_first, n_before, n_prev, n_now = inputs[0], inputs[-3], inputs[-2], inputs[-1]
        proportional = cfg.kp * (n_now - n_prev)
        integral = cfg.ki * (n_now - n_first)  # the sum of differences telescopes
        derivative = cfg.kd * (n_now - 2 * n_prev + n_before)
        updated = self.punish_weight + proportional + integral + derivative
        self.punish_weight = max(cfg.min_punish_weight, updated)
        return self.punish_weight

    def state_dict(self) -> dict[str, float | list[float]]:
        """Plain floats and lists (JSON-friendly); the config is saved with the run, not here."""
        return {"punish_weight": self.punish_weight, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, float | list[float]]) -> None:
        if set(state) != {"punish_weight", "history"}:
            raise ValueError(f"expected keys punish_weight and history, got {sorted(state)}")
        punish_weight, history = state["punish_weight"], state["history"]
        if not isinstance(history, list) or isinstance(punish_weight, list):
            raise ValueError("punish_weight must be a number and history a list of numbers")
        self.punish_weight = float(punish_weight)
        self.history = [float(n) for n in history]


def e2e_loss(
    logits: Float[Tensor, "batch d_vocab"], label_token_ids: Int[Tensor, "n_labels"],
    query_labels: Int[Tensor, "batch"], softmax: E2ESoftmax = "label",
) -> Float[Tensor, ""]:
    """Cross-entropy of the query's true label at the last position, over the label tokens
    (``label``, the default) or the whole vocabulary (``vocab``); mean over the batch, in float32."""
    logits = logits.float()
    if softmax == "label":
        return F.cross_entropy(logits.index_select(-1, label_token_ids), query_labels)
    if softmax == "vocab":
        return F.cross_entropy(logits, label_token_ids[query_labels])
    raise ValueError(f"softmax must be 'label' or 'vocab', got {softmax!r}")
