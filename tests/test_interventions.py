"""Head ablation on the tiny GPT-2 (plumbing); notebooks/01_head_discovery runs it on the embedded model
(tests/test_notebooks.py)."""

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
    before = _logits(tiny_gpt2, tokens)
    with ablate_heads(tiny_gpt2, []):
        inside = _logits(tiny_gpt2, tokens)
    assert torch.equal(inside, before)  # the same computation: equality


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


def test_head_output_means_average_z_over_the_real_tokens_of_every_prompt(tiny_gpt2):
    # Two prompts of 3 and 5 tokens in one batch: the shorter is padded, and the mean is over the 8 real
    # tokens (not the pads, not per prompt), as each prompt run alone shows.
    prompts = PromptSet([ICLPrompt((11, 12, 13), (), (), 0), ICLPrompt((21, 22, 23, 24, 25), (), (), 0)],
                        ("a",), (11,), 0)
    heads = [(0, 1), (1, 3)]
    means = head_output_means(tiny_gpt2, prompts, heads, batch_size=2)
    with torch.inference_mode():
        caches = [tiny_gpt2.run_with_cache(torch.tensor([prompt.tokens]))[1] for prompt in prompts.prompts]
    for layer, head in heads:
        z = torch.cat([cache[f"blocks.{layer}.attn.hook_z"][0, :, head, :] for cache in caches])
        assert z.shape[0] == 8
        # A padded batch against lone prompts: equal to float32 rounding (2 layers of width 64; a pad
        # counted, or a mean per prompt, moves it by a tenth or more).
        torch.testing.assert_close(means[(layer, head)], z.mean(0), rtol=1e-4, atol=1e-6)


def test_mean_ablation_puts_the_given_means_in_place_of_the_heads_outputs(tiny_gpt2):
    tokens = torch.tensor([[10, 20, 30, 40]])
    heads = [(0, 1), (1, 3)]
    d_head = tiny_gpt2.cfg.d_head
    with ablate_heads(tiny_gpt2, heads):
        zero_ablated = _logits(tiny_gpt2, tokens)
    with ablate_heads(tiny_gpt2, heads, means={head: torch.zeros(d_head) for head in heads}):
        zero_means = _logits(tiny_gpt2, tokens)
    assert torch.equal(zero_means, zero_ablated)  # the same computation
    fixed = {head: torch.linspace(-1, 1, d_head) for head in heads}
    with ablate_heads(tiny_gpt2, heads, means=fixed), torch.inference_mode():
        logits, cache = tiny_gpt2.run_with_cache(tokens)
    assert not torch.allclose(logits, zero_ablated, atol=1e-4)
    for layer, head in heads:  # what W_O sees is the mean, at every position
        assert torch.equal(cache[f"blocks.{layer}.attn.hook_z"][0, :, head, :], fixed[(layer, head)].expand(4, -1))


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
