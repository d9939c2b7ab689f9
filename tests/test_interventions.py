"""Head ablation: plumbing on the tiny GPT-2, one behavioural check on the embedded model."""

from __future__ import annotations

import pytest
import torch

from abft_lens.interventions import ablate_heads, head_output_means, random_heads
from abft_lens.prompts import ICLPrompt, PromptSet


def _logits(model, tokens):
    with torch.inference_mode():
        return model(tokens)


def _one_token_set(token: int) -> PromptSet:
    return PromptSet([ICLPrompt((token,), (), (), 0)], ("a",), (token,), 0)


def test_ablating_no_heads_changes_nothing(tiny_gpt2):
    tokens = torch.tensor([[10, 20, 30, 40]])
    with ablate_heads(tiny_gpt2, []):
        assert torch.equal(_logits(tiny_gpt2, tokens), _logits(tiny_gpt2, tokens.clone()))


def test_zero_ablation_changes_the_output_and_is_undone_after_the_block(tiny_gpt2):
    tokens = torch.tensor([[10, 20, 30, 40]])
    before = _logits(tiny_gpt2, tokens)
    with ablate_heads(tiny_gpt2, [(0, 1), (1, 2)]):
        ablated = _logits(tiny_gpt2, tokens)
    assert not torch.allclose(before, ablated)
    assert torch.equal(before, _logits(tiny_gpt2, tokens))


def test_mean_ablation_with_the_prompts_own_mean_is_the_identity(tiny_gpt2):
    # One token: a head's mean z over the reference is that token's own z, so nothing changes.
    tokens = torch.tensor([[17]])
    heads = [(0, 0), (1, 3)]
    means = head_output_means(tiny_gpt2, _one_token_set(17), heads)
    assert set(means) == set(heads) and means[(0, 0)].shape == (tiny_gpt2.cfg.d_head,)
    with ablate_heads(tiny_gpt2, heads, means=means):
        ablated = _logits(tiny_gpt2, tokens)
    assert torch.allclose(ablated, _logits(tiny_gpt2, tokens), atol=1e-5)


def test_unknown_heads_are_an_error(tiny_gpt2):
    with pytest.raises(ValueError, match="No head"):
        with ablate_heads(tiny_gpt2, [(5, 0)]):
            pass


def test_random_heads_are_distinct_and_avoid_the_excluded():
    chosen = random_heads(4, 3, 5, exclude=[(0, 0), (1, 1)], seed=1)
    assert len(set(chosen)) == 5 and not {(0, 0), (1, 1)} & set(chosen)
    assert chosen == random_heads(4, 3, 5, exclude=[(0, 0), (1, 1)], seed=1)
    with pytest.raises(ValueError):
        random_heads(2, 2, 4, exclude=[(0, 0)])
