"""Prompt construction of the ICL tests (flipped and symbol labels) on real data with the real GPT-2
tokenizer: every demonstration and the answer key use the in-prompt mapping, every label is shown,
symbols are single tokens."""

from __future__ import annotations

import pytest

from abft_lens.data import load_dataset, split_pools
from abft_lens.errors import DataError
from abft_lens.icl_tests import derangement, flipped_labels, icl_test_k, memorised_share, symbol_labels
from abft_lens.prompts import build_prompts


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2_dir)


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_derangement_moves_every_label_and_is_fixed_by_its_seed(n):
    for seed in range(20):
        sigma = derangement(n, seed)
        assert sorted(sigma) == list(range(n)) and all(sigma[i] != i for i in range(n))
        assert derangement(n, seed) == sigma
    assert len({derangement(n, seed) for seed in range(20)}) > 1 or n == 2
    with pytest.raises(DataError):
        derangement(1, 0)


def shown_words(tokenizer, prompts) -> list[tuple[list[str], str]]:
    """Per prompt: the words at its demonstration label positions, and the answer key's word."""
    return [([tokenizer.decode([p.tokens[i]]).strip() for i in p.label_positions],
             tokenizer.decode([prompts.label_token_ids[p.query_label]]).strip()) for p in prompts.prompts]


@pytest.mark.parametrize("name", ["sst2", "trec", "sst5"])
def test_flipped_prompts_show_and_expect_the_permuted_words_and_every_label(tokenizer, name):
    dataset = load_dataset(name)
    words = dataset.label_words
    flipped, sigma = flipped_labels(dataset, seed=3)
    pools = split_pools(flipped, seed=42)
    k = icl_test_k(len(words), 4)
    prompts = build_prompts(tokenizer, flipped, pools.test[:12], k=k, seed=0, demo_pool=pools.demo,
                            demo_sampling="every_label")
    for prompt, (demo_words, answer) in zip(prompts.prompts, shown_words(tokenizer, prompts), strict=True):
        assert demo_words == [words[sigma[label]] for label in prompt.demo_labels], "demonstrations use the mapping"
        assert answer == words[sigma[prompt.query_label]], "so does the answer key"
        assert answer != words[prompt.query_label], "no word keeps its meaning"
        assert set(prompt.demo_labels) == set(range(len(words))), "every label is shown"
    assert k == max(4, len(words))


def test_every_label_sampling_needs_k_at_least_the_label_count(tokenizer):
    dataset = load_dataset("trec")
    pools = split_pools(dataset, seed=42)
    with pytest.raises(DataError, match="every_label"):
        build_prompts(tokenizer, dataset, pools.test[:2], k=4, demo_pool=pools.demo, demo_sampling="every_label")


@pytest.mark.parametrize("name", ["sst2", "trec"])
def test_symbol_labels_are_single_tokens_used_consistently(tokenizer, name):
    dataset = load_dataset(name)
    symbols = symbol_labels(dataset, tokenizer)
    assert len(symbols.label_words) == len(dataset.label_words)
    assert not set(symbols.label_words) & set(dataset.label_words)
    pools = split_pools(symbols, seed=42)
    prompts = build_prompts(tokenizer, symbols, pools.test[:8], k=icl_test_k(len(symbols.label_words), 4),
                            demo_pool=pools.demo, demo_sampling="every_label")
    for prompt, (demo_words, answer) in zip(prompts.prompts, shown_words(tokenizer, prompts), strict=True):
        assert demo_words == [symbols.label_words[label] for label in prompt.demo_labels]
        assert answer == symbols.label_words[prompt.query_label]


def test_memorised_share_counts_answers_that_keep_the_usual_meaning():
    sigma = (1, 2, 0)  # label i is shown as word sigma[i]
    # Query label 0 is shown as word 1. Answering label 2 gives word sigma[2] = 0: label 0's usual word.
    assert memorised_share([2, 0, 1], [0, 0, 0], sigma) == pytest.approx(1 / 3)
    assert memorised_share([0, 1, 2], [0, 1, 2], sigma) == 0.0  # all follow the prompt
    assert memorised_share([2, 0, 1], [0, 1, 2], sigma) == 1.0  # all memorised


def test_evaluate_with_icl_tests_scores_both_against_the_prompt_mapping(tiny_gpt2, predict_calls):
    """Plumbing on the tiny random model: the prompts ``evaluate`` runs for each test show and expect the
    test's words; with two labels, an answer that does not follow the flipped mapping gives the word's
    usual meaning, so the memorised share is exactly 1 - accuracy."""
    from abft_lens.evaluation import EvaluateConfig, evaluate

    sst2 = load_dataset("sst2")
    result = evaluate(tiny_gpt2, sst2, EvaluateConfig(n_test=6, demo_sets=1, k=2, icl_tests=True, attention=False,
                                                      precision="fp32"), progress=False)
    m = result.metrics
    for test_name, words in (("flipped", list(reversed(sst2.label_words))), ("symbols", ["A", "B"])):
        prompts = predict_calls.only(f"ICL test: {test_name}")
        assert len(prompts) == 6
        for prompt, (demo_words, answer) in zip(prompts.prompts, shown_words(tiny_gpt2.tokenizer, prompts), strict=True):
            assert demo_words == [words[label] for label in prompt.demo_labels], test_name
            assert answer == words[prompt.query_label], test_name
            assert set(prompt.demo_labels) == {0, 1}, test_name
    assert m["flipped_k"] == 2 and m["flipped_label_words"] == list(reversed(sst2.label_words))
    assert m["flipped_memorised_share"] == pytest.approx(1 - m["flipped_accuracy"])
    assert 0 <= m["symbols_accuracy"] <= 1 and m["symbols_label_words"] == ["A", "B"]
    assert set(result.tables) >= {"icl_flipped", "icl_symbols"} and len(result.tables["icl_flipped"]) == 6
