"""Specification of the ABFT loss and of the PID controller on its punishment weight."""

import json
import math

import pytest
import torch

from abft_lens.loss import AbftLossConfig, PunishWeightController, abft_loss, pid_inputs, weights_for

T, F = True, False


def two_prompt_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two prompts, 1 layer x 2 heads, k = 4, with values chosen so the loss is easy by hand."""
    attention = torch.tensor(
        [
            [[[0.10, 0.20, 0.30, 0.15], [0.40, 0.40, 0.10, 0.05]]],
            [[[0.05, 0.05, 0.10, 0.60], [0.20, 0.10, 0.10, 0.10]]],
        ],
        dtype=torch.float64,
    )
    correct_mask = torch.tensor([[T, F, T, F], [F, F, F, T]])
    head_mask = torch.tensor([[[T, F]], [[T, T]]])
    return attention, correct_mask, head_mask


def one_head(row: list[float], correct: list[bool], flagged: bool = True):
    attention = torch.tensor([[[row]]], dtype=torch.float64, requires_grad=True)
    return attention, torch.tensor([correct]), torch.tensor([[[flagged]]])


# --- the loss ---------------------------------------------------------------------------------


def test_loss_matches_hand_computed_value():
    attention, correct_mask, head_mask = two_prompt_example()
    out = abft_loss(attention, correct_mask, head_mask, punish_weight=0.5, reward_weight=1.0)
    # Prompt 0, head 0 (head 1 not flagged): punish 0.5*(0.20+0.15) = 0.175, reward (1-0.1)+(1-0.3) = 1.6
    # Prompt 1, head 0: punish 0.5*(0.05+0.05+0.10) = 0.1, reward 1-0.6 = 0.4
    # Prompt 1, head 1: punish 0.5*(0.2+0.1+0.1) = 0.2, reward 1-0.1 = 0.9
    # Sum over heads, mean over the 2 prompts:
    assert out.punish_term.item() == pytest.approx((0.175 + 0.1 + 0.2) / 2)
    assert out.reward_term.item() == pytest.approx((1.6 + 0.4 + 0.9) / 2)
    assert out.loss.item() == pytest.approx((0.175 + 1.6 + 0.1 + 0.4 + 0.2 + 0.9) / 2)
    assert out.flagged_heads_per_prompt.tolist() == [1.0, 2.0]
    assert out.correct_mass.tolist() == pytest.approx([0.40, (0.6 + 0.1) / 2])
    assert out.wrong_mass.tolist() == pytest.approx([0.35, (0.2 + 0.4) / 2])


def test_mean_reduction_averages_over_flagged_prompt_head_pairs():
    attention, correct_mask, head_mask = two_prompt_example()
    out = abft_loss(attention, correct_mask, head_mask, 0.5, 1.0, reduction="mean")
    assert out.loss.item() == pytest.approx((1.775 + 0.5 + 1.1) / 3)
    assert out.punish_term.item() == pytest.approx(0.475 / 3)


def test_loss_rewards_correct_labels_and_punishes_wrong_ones():
    attention, correct_mask, head_mask = one_head([0.1, 0.2, 0.3, 0.15], [T, F, T, F])
    abft_loss(attention, correct_mask, head_mask, punish_weight=0.7, reward_weight=1.3).loss.backward()
    # One prompt, one head: d loss / d alpha is -B on correct labels and +A on wrong ones.
    assert attention.grad.flatten().tolist() == pytest.approx([-1.3, 0.7, -1.3, 0.7])


def test_gradient_is_scaled_by_one_over_batch_and_zero_on_unflagged_heads():
    attention, correct_mask, head_mask = two_prompt_example()
    attention.requires_grad_(True)
    abft_loss(attention, correct_mask, head_mask, punish_weight=0.5, reward_weight=1.0).loss.backward()
    grad = attention.grad
    assert grad[0, 0, 0].tolist() == pytest.approx([-0.5, 0.25, -0.5, 0.25])
    assert grad[0, 0, 1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert grad[1, 0, 1].tolist() == pytest.approx([0.25, 0.25, 0.25, -0.5])


def test_non_induction_heads_do_not_change_the_loss():
    attention, correct_mask, head_mask = two_prompt_example()
    before = abft_loss(attention, correct_mask, head_mask, 0.5).loss
    changed = attention.clone()
    changed[0, 0, 1] = torch.tensor([0.9, 0.0, 0.05, float("nan")])  # head (0, 1) is not flagged on prompt 0
    after = abft_loss(changed, correct_mask, head_mask, 0.5)
    assert after.loss.item() == before.item()
    assert after.correct_mass[0].item() == pytest.approx(0.40)


def test_zero_flagged_heads_give_a_finite_zero_loss_that_backpropagates():
    for reduction in ("sum_heads_mean_prompts", "mean"):
        attention = torch.rand(3, 2, 4, 4, requires_grad=True)
        correct_mask = torch.rand(3, 4) > 0.5
        nothing_flagged = torch.zeros(3, 2, 4, dtype=torch.bool)
        out = abft_loss(attention, correct_mask, nothing_flagged, 0.5, reduction=reduction)
        assert out.loss.item() == 0.0
        assert out.loss.grad_fn is not None
        out.loss.backward()
        assert torch.equal(attention.grad, torch.zeros_like(attention))
        assert out.flagged_heads_per_prompt.tolist() == [0.0, 0.0, 0.0]
        assert out.correct_mass.tolist() == [0.0, 0.0, 0.0]
        assert out.wrong_mass.tolist() == [0.0, 0.0, 0.0]


def test_diagnostics_are_detached():
    attention, correct_mask, head_mask = two_prompt_example()
    out = abft_loss(attention.requires_grad_(True), correct_mask, head_mask, 0.5)
    assert out.loss.requires_grad
    for name in ("flagged_heads_per_prompt", "correct_mass", "wrong_mass", "reward_term", "punish_term"):
        assert not getattr(out, name).requires_grad, name


def test_reward_only_ablation_sets_punish_weight_to_zero():
    config = AbftLossConfig(terms="reward", reward_weight=1.0)
    punish_weight, reward_weight = weights_for(config, punish_weight=0.8)
    assert (punish_weight, reward_weight) == (0.0, 1.0)
    attention, correct_mask, head_mask = one_head([0.1, 0.2, 0.3, 0.15], [T, F, T, F])
    out = abft_loss(attention, correct_mask, head_mask, punish_weight, reward_weight)
    out.loss.backward()
    assert out.punish_term.item() == 0.0
    assert attention.grad.flatten().tolist() == [-1.0, 0.0, -1.0, 0.0]


def test_punish_only_ablation_sets_reward_weight_to_zero():
    config = AbftLossConfig(terms="punish", reward_weight=1.0)
    punish_weight, reward_weight = weights_for(config, punish_weight=0.8)
    assert (punish_weight, reward_weight) == (0.8, 0.0)
    attention, correct_mask, head_mask = one_head([0.1, 0.2, 0.3, 0.15], [T, F, T, F])
    out = abft_loss(attention, correct_mask, head_mask, punish_weight, reward_weight)
    out.loss.backward()
    assert out.reward_term.item() == 0.0
    assert out.loss.item() == pytest.approx(0.8 * 0.35)
    assert attention.grad.flatten().tolist() == pytest.approx([0.0, 0.8, 0.0, 0.8])


def test_both_terms_pass_the_weights_through():
    assert weights_for(AbftLossConfig(reward_weight=2.0), punish_weight=0.3) == (0.3, 2.0)


@pytest.mark.parametrize("reduction", ["sum_heads_mean_prompts", "mean"])
def test_loss_passes_gradcheck_in_float64(reduction):
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(3, 2, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    correct_mask = torch.rand(3, 4, generator=generator) > 0.5
    head_mask = torch.rand(3, 2, 3, generator=generator) > 0.4
    assert head_mask.any() and not head_mask.all()

    def loss(x):
        return abft_loss(x, correct_mask, head_mask, 0.37, 1.0, reduction=reduction).loss

    assert torch.autograd.gradcheck(loss, (attention,))


@pytest.mark.parametrize(
    "correct_mask, head_mask, message",
    [
        (torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 1, 2, dtype=torch.bool), "correct_mask"),
        (torch.zeros(1, 4, dtype=torch.bool), torch.zeros(2, 1, 2, dtype=torch.bool), "correct_mask"),
        (torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 2, 1, dtype=torch.bool), "head_mask"),
        (torch.zeros(2, 4), torch.zeros(2, 1, 2, dtype=torch.bool), "bool"),
    ],
)
def test_mismatched_shapes_raise_a_clear_error(correct_mask, head_mask, message):
    attention = torch.rand(2, 1, 2, 4)
    with pytest.raises(ValueError, match=message):
        abft_loss(attention, correct_mask, head_mask, 0.5)


def test_attention_must_have_four_axes():
    with pytest.raises(ValueError, match=r"\[batch, layer, head, k\]"):
        correct_mask, head_mask = torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 1, 1, dtype=torch.bool)
        abft_loss(torch.rand(2, 4), correct_mask, head_mask, 0.5)


# --- the config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"terms": "neither"}, "terms"),
        ({"reduction": "sum"}, "reduction"),
        ({"reward_weight": -1.0}, "reward_weight"),
        ({"initial_punish_weight": float("nan")}, "initial_punish_weight"),
        ({"kp": -0.1}, "kp"),
        ({"ki": float("inf")}, "ki"),
        ({"min_punish_weight": -0.5}, "min_punish_weight"),
        ({"initial_punish_weight": 0.1, "min_punish_weight": 0.2}, "below min_punish_weight"),
        ({"pid_input": "ratio"}, "pid_input"),
        ({"pid_reference_heads": 0.0}, "pid_reference_heads"),
        ({"pid_reference_heads": float("inf")}, "pid_reference_heads"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AbftLossConfig(**kwargs)


def test_config_defaults_are_the_papers():
    config = AbftLossConfig()
    assert (config.terms, config.reward_weight, config.initial_punish_weight) == ("both", 1.0, 0.5)
    assert config.pid and config.min_punish_weight == 0.0
    assert (config.kp, config.ki, config.kd) == (0.03, 0.005, 0.005)
    assert config.reduction == "sum_heads_mean_prompts"
    assert config.pid_input == "count"  # the paper's input; "relative" is ours


# --- the PID controller -----------------------------------------------------------------------


def test_pid_follows_a_hand_computed_sequence():
    controller = PunishWeightController(AbftLossConfig())
    # n = 10, 12, 9, 9, 14, 6. A stays at 0.5 for t <= 2.
    assert controller.step(10) == 0.5
    assert controller.step(12) == 0.5
    # t=3: P 0.03*(9-12) = -0.09; I 0.005*((12-10)+(9-12)) = -0.005; D 0.005*(9-24+10) = -0.025
    assert controller.step(9) == pytest.approx(0.5 - 0.09 - 0.005 - 0.025)  # 0.38
    # t=4: P 0.03*(9-9) = 0; I 0.005*(2-3+0) = -0.005; D 0.005*(9-18+12) = 0.015
    assert controller.step(9) == pytest.approx(0.38 + 0.0 - 0.005 + 0.015)  # 0.39
    # t=5: P 0.03*(14-9) = 0.15; I 0.005*(2-3+0+5) = 0.02; D 0.005*(14-18+9) = 0.025
    assert controller.step(14) == pytest.approx(0.39 + 0.15 + 0.02 + 0.025)  # 0.585
    # t=6: P 0.03*(6-14) = -0.24; I 0.005*(2-3+0+5-8) = -0.02; D 0.005*(6-28+9) = -0.065
    assert controller.step(6) == pytest.approx(0.585 - 0.24 - 0.02 - 0.065)  # 0.26
    assert controller.punish_weight == pytest.approx(0.26)


def test_more_flagged_heads_raise_the_punish_weight():
    controller = PunishWeightController(AbftLossConfig())
    weights = [controller.step(n) for n in (5, 5, 8, 11)]
    assert weights[2] > weights[1] and weights[3] > weights[2]


def test_without_pid_the_punish_weight_stays_fixed():
    controller = PunishWeightController(AbftLossConfig(pid=False, initial_punish_weight=0.4))
    assert [controller.step(n) for n in (10, 12, 9, 9, 14, 6, 0)] == [0.4] * 7


def test_punish_weight_is_clamped_and_updates_continue_from_the_clamp():
    controller = PunishWeightController(AbftLossConfig(min_punish_weight=0.1))
    controller.step(20)
    controller.step(20)
    # t=3: 0.5 + 0.03*(0-20) + 0.005*(0-20) + 0.005*(0-40+20) = 0.5 - 0.6 - 0.1 - 0.1 = -0.3 -> 0.1
    assert controller.step(0) == 0.1
    # t=4: 0.1 + 0.03*(0-0) + 0.005*(0-20) + 0.005*(0-0+20) = 0.1 + 0 - 0.1 + 0.1 -> 0.1
    assert controller.step(0) == pytest.approx(0.1)
    # t=5: 0.1 + 0.03*(4-0) + 0.005*(4-20) + 0.005*(4-0+0) = 0.1 + 0.12 - 0.08 + 0.02
    assert controller.step(4) == pytest.approx(0.16)


def test_default_clamp_keeps_the_punish_weight_non_negative():
    controller = PunishWeightController(AbftLossConfig())
    assert min(controller.step(n) for n in (30, 30, 0, 0, 0)) == 0.0


def test_state_dict_round_trip_continues_identically():
    config = AbftLossConfig()
    sequence = [10, 12, 9, 9.5, 14, 6, 7.25, 3]
    uninterrupted = PunishWeightController(config)
    expected = [uninterrupted.step(n) for n in sequence]

    first = PunishWeightController(config)
    for n in sequence[:4]:
        first.step(n)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = PunishWeightController(config)
    resumed.load_state_dict(saved)
    assert [resumed.step(n) for n in sequence[4:]] == expected[4:]
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_load_state_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="punish_weight"):
        PunishWeightController(AbftLossConfig()).load_state_dict({"A": 0.5})


def test_step_rejects_a_negative_or_nan_count():
    controller = PunishWeightController(AbftLossConfig())
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="n_flagged"):
            controller.step(bad)


# --- the relative (scale-free) PID input -------------------------------------------------------------


def test_relative_inputs_are_the_reference_times_the_count_over_the_first_non_zero_count():
    assert pid_inputs([0, 0, 4, 2, 6], "relative", reference_heads=50) == [0.0, 0.0, 50.0, 25.0, 75.0]
    assert pid_inputs([8, 2], "relative", reference_heads=10) == [10.0, 2.5]
    assert pid_inputs([0, 0], "relative", reference_heads=10) == [0.0, 0.0]
    # A first count of a fraction of a head (one flagged on a few prompts) is scaled as one head, not blown up.
    assert pid_inputs([0.03, 1.0, 1.2], "relative", reference_heads=50) == pytest.approx([1.5, 50.0, 60.0])
    assert pid_inputs([3, 5], "count") == [3.0, 5.0]


def test_relative_pid_on_doubled_counts_follows_the_hand_computed_sequence():
    controller = PunishWeightController(AbftLossConfig(pid_input="relative", pid_reference_heads=10))
    # Counts 20, 24, 18, 18, 28, 12 are 10 * n / 20 = 10, 12, 9, 9, 14, 6 as inputs: the sequence of
    # test_pid_follows_a_hand_computed_sequence, so the same A.
    assert [controller.step(n) for n in (20, 24, 18, 18, 28, 12)] == pytest.approx(
        [0.5, 0.5, 0.38, 0.39, 0.585, 0.26])


@pytest.mark.parametrize("factor", [0.25, 1024 / 270, 8.0])
def test_relative_pid_gives_the_same_punish_weights_when_every_count_is_scaled(factor):
    counts = [12.0, 13.5, 11.4, 9.0, 6.2, 4.1, 2.2, 2.5, 3.0]

    def trajectory(pid_input: str, scale: float) -> list[float]:
        controller = PunishWeightController(AbftLossConfig(pid_input=pid_input))
        return [controller.step(n * scale) for n in counts]

    assert trajectory("relative", factor) == pytest.approx(trajectory("relative", 1.0))
    # The paper's input is in heads: the same relative course on more heads moves A further.
    assert trajectory("count", factor) != pytest.approx(trajectory("count", 1.0))


def test_paper_pid_on_doubled_counts_moves_twice_as_far():
    controller = PunishWeightController(AbftLossConfig())
    # t=3: P 0.03*(18-24) = -0.18; I 0.005*(18-20) = -0.01; D 0.005*(18-48+20) = -0.05 (twice the 1x steps)
    assert [controller.step(n) for n in (20, 24, 18)] == pytest.approx([0.5, 0.5, 0.26])


def test_relative_pid_state_dict_round_trip_continues_identically():
    config = AbftLossConfig(pid_input="relative")
    sequence = [0, 11.5, 12, 9, 9.5, 14, 6, 7.25, 3]  # no head flagged at first: the reference is 11.5
    uninterrupted = PunishWeightController(config)
    expected = [uninterrupted.step(n) for n in sequence]
    first = PunishWeightController(config)
    for n in sequence[:4]:
        first.step(n)
    resumed = PunishWeightController(config)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.step(n) for n in sequence[4:]] == expected[4:]
