"""Head scores: the pure math on hand-made attention, then real behaviour on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from abft_lens.data import split_pools
from abft_lens.errors import HeadSelectionError
from abft_lens.heads import (
    HeadScoreConfig, HeadStatistics, correct_and_wrong_mass, gather_label_attention, induction_head_mask,
    induction_thresholds, label_attention, score_heads,
)
from abft_lens.prompts import build_prompts
from tolerances import ATTENTION_ATOL, MASS_ATOL


def test_paper_threshold_is_k_over_k_plus_log_length():
    thresholds = induction_thresholds(torch.tensor([100, 50]), k=4)
    assert thresholds.tolist() == pytest.approx([4 / (4 + math.log(100)), 4 / (4 + math.log(50))])
    assert thresholds[0] == pytest.approx(0.4648, abs=1e-4)


def test_uniform_threshold_is_a_multiple_of_uniform_attention():
    assert induction_thresholds(torch.tensor([80]), k=4, kind="uniform", tau=2.0).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="Unknown threshold"):
        induction_thresholds(torch.tensor([80]), k=4, kind="median")


def test_gather_picks_the_label_positions_of_each_prompt():
    rows = torch.arange(2 * 1 * 2 * 6, dtype=torch.float32).reshape(2, 1, 2, 6)
    gathered = gather_label_attention(rows, torch.tensor([[1, 3], [0, 5]]))
    assert gathered[0, 0, 1].tolist() == [7.0, 9.0]
    assert gathered[1, 0, 0].tolist() == [12.0, 17.0]


def test_induction_mask_flags_heads_whose_label_mass_exceeds_the_threshold():
    attention = torch.zeros(1, 1, 3, 4)
    attention[0, 0, 0] = torch.tensor([0.2, 0.2, 0.1, 0.0])  # S = 0.5 > 0.4648
    attention[0, 0, 1] = torch.tensor([0.1, 0.1, 0.1, 0.1])  # S = 0.4 < 0.4648
    attention[0, 0, 2] = torch.tensor([0.9, 0.0, 0.0, 0.0])
    mask = induction_head_mask(attention, torch.tensor([100]))
    assert mask[0, 0].tolist() == [True, False, True]


def test_correct_and_wrong_mass_split_by_the_query_label():
    attention = torch.tensor([0.1, 0.2, 0.3, 0.15]).reshape(1, 1, 1, 4)
    plus, minus = correct_and_wrong_mass(attention, torch.tensor([[True, False, True, False]]))
    assert plus.item() == pytest.approx(0.4) and minus.item() == pytest.approx(0.35)


def test_statistics_merge_exactly_across_batches():
    torch.manual_seed(0)
    attention = torch.rand(10, 2, 3, 4) / 2
    correct = torch.rand(10, 4) > 0.5
    lengths = torch.randint(40, 120, (10,))
    whole = HeadStatistics.zeros(2, 3)
    whole.add(attention, correct, lengths, "paper", 2.0)
    first, second = HeadStatistics.zeros(2, 3), HeadStatistics.zeros(2, 3)
    first.add(attention[:4], correct[:4], lengths[:4], "paper", 2.0)
    second.add(attention[4:], correct[4:], lengths[4:], "paper", 2.0)
    merged = first.merge(second).to_frame()
    expected = whole.to_frame()
    assert merged["label_mass"].to_numpy() == pytest.approx(expected["label_mass"].to_numpy())
    assert merged["pass_rate"].tolist() == expected["pass_rate"].tolist()
    assert expected["label_mass"].iloc[0] == pytest.approx(
        attention.sum(-1).mean(0).max().item())


def test_table_ranks_by_the_chosen_column_and_select_takes_the_top():
    stats = HeadStatistics.zeros(1, 3)
    attention = torch.tensor([[0.05, 0.05], [0.3, 0.3], [0.25, 0.0]]).reshape(1, 1, 3, 2)
    stats.add(attention, torch.tensor([[True, False]]), torch.tensor([50]), "paper", 2.0)
    frame = stats.to_frame("label_mass")
    assert frame["head"].tolist() == [1, 2, 0] and frame["rank"].tolist() == [1, 2, 3]
    by_correctness = stats.to_frame("correctness")
    assert by_correctness["head"].tolist()[0] == 2
    from abft_lens.heads import HeadScores

    scores = HeadScores(frame)
    assert scores.select(top=2) == [(0, 1), (0, 2)]
    assert scores.select(min_pass_rate=1.0) == [(0, 1)]
    with pytest.raises(HeadSelectionError, match="empty"):
        scores.select(min_pass_rate=1.1)


@pytest.fixture(scope="module")
def real_scores(smollm2, sst2):
    pools = split_pools(sst2, seed=42)
    prompts = build_prompts(smollm2.tokenizer, sst2, pools.train, n_prompts=24, k=4, seed=42)
    return prompts, score_heads(smollm2, prompts, HeadScoreConfig(batch_size=8), progress=False)


def test_smollm2_has_label_attending_heads_far_above_uniform(real_scores):
    _, scores = real_scores
    table = scores.table
    assert len(table) == 30 * 9
    top = table.iloc[0]
    # Measured: the top heads (layers 17-24) put 0.7-0.95 of their attention on the 4 labels,
    # against 0.05 for uniform attention, and pass the paper's threshold on nearly every prompt.
    assert top["label_mass"] > 10 * top["uniform_mass"]
    assert (table["pass_rate"] >= 0.9).sum() >= 5
    assert table.head(5)["layer"].between(12, 29).all(), "induction heads sit in the upper half"
    assert table["pass_rate"].iloc[-1] == 0 and table["label_mass"].median() < 0.3


def test_scores_of_a_layer_subset_equal_the_full_run(smollm2, real_scores):
    prompts, scores = real_scores
    subset = score_heads(smollm2, prompts, HeadScoreConfig(batch_size=8, layers=(17, 20)), progress=False)
    assert set(subset.table["layer"]) == {17, 20}
    full = scores.table.set_index(["layer", "head"]).loc[list(zip(subset.table["layer"], subset.table["head"]))]
    assert subset.table["label_mass"].to_numpy() == pytest.approx(full["label_mass"].to_numpy(), abs=MASS_ATOL)


def test_label_attention_matches_run_with_cache(smollm2, real_scores):
    prompts, _ = real_scores
    batch = prompts.collate([0])
    with torch.no_grad():
        ours = label_attention(smollm2, batch, [20])
        _, cache = smollm2.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    reference = cache["blocks.20.attn.hook_pattern"][0, :, -1, batch.label_positions[0]]
    torch.testing.assert_close(ours[0, 0], reference, atol=ATTENTION_ATOL, rtol=0)


def test_label_attention_is_differentiable_to_the_query_weights(smollm2, real_scores):
    prompts, _ = real_scores
    weight = smollm2.blocks[20].attn.q.weight
    was_trainable = weight.requires_grad
    weight.requires_grad_(True)
    try:
        attention = label_attention(smollm2, prompts.collate([0, 1]), [20])
        grad, = torch.autograd.grad(attention.sum(), weight)
        assert grad.abs().sum() > 0
    finally:
        weight.requires_grad_(was_trainable)


def test_gpt2_family_scores_and_pads_like_llama(tiny_gpt2, sst2):
    """Plumbing of the GPT-2 path (absolute positions, fused c_attn) on a tiny random model."""
    prompts = build_prompts(tiny_gpt2.tokenizer, sst2, split_pools(sst2, seed=0).train, n_prompts=4, k=2, seed=0,
                            max_length=tiny_gpt2.cfg.n_ctx)
    assert prompts[0].tokens[0] == tiny_gpt2.tokenizer.bos_token_id
    table = score_heads(tiny_gpt2, prompts, HeadScoreConfig(batch_size=4), progress=False).table
    assert len(table) == 2 * 4 and table["label_mass"].between(0, 1).all()
    batch = prompts.collate(range(4))
    with torch.no_grad():
        padded = label_attention(tiny_gpt2, batch, [0, 1])
        for row in range(4):
            alone = label_attention(tiny_gpt2, prompts.collate([row]), [0, 1])
            torch.testing.assert_close(padded[row], alone[0], atol=ATTENTION_ATOL, rtol=0)
