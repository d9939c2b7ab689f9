"""Token-exact prompts: positions, masks, padding and the errors a user can hit."""

from __future__ import annotations

import pytest
import torch

from abft_lens.data import Example, Template, load_dataset, split_pools
from abft_lens.errors import DataError, LabelTokenError, PromptTooLongError
from abft_lens.heads import query_attention_rows
from abft_lens.prompts import ICLPrompt, PromptSet, build_prompts, label_token_ids, share_without_query_label
from tolerances import ATTENTION_ATOL


@pytest.fixture(scope="module")
def sst2_prompts(smollm2, sst2):
    pools = split_pools(sst2, seed=0)
    return build_prompts(smollm2.tokenizer, sst2, pools.train, n_prompts=12, k=4, seed=0,
                         max_length=smollm2.cfg.n_ctx)


def test_label_positions_hold_the_demonstration_label_tokens(smollm2, sst2_prompts):
    tokenizer = smollm2.tokenizer
    for prompt in sst2_prompts.prompts:
        shown = [tokenizer.decode([prompt.tokens[i]]) for i in prompt.label_positions]
        assert shown == [" " + sst2_prompts.label_words[label] for label in prompt.demo_labels]
        # Each label follows "sentiment:" and is followed by the newline of its demonstration.
        for position in prompt.label_positions:
            assert tokenizer.decode(list(prompt.tokens[position - 3:position])).endswith("sentiment:")
            assert tokenizer.decode([prompt.tokens[position + 1]]).startswith("\n")


def test_prompt_starts_with_bos_and_query_ends_at_the_colon(smollm2, sst2_prompts):
    prompt = sst2_prompts[0]
    assert prompt.tokens[0] == smollm2.tokenizer.bos_token_id
    assert smollm2.tokenizer.decode(list(prompt.tokens[-3:])).endswith("sentiment:")
    assert smollm2.tokenizer.decode([prompt.tokens[-1]]) == ":"


def test_concatenated_pieces_decode_to_the_rendered_template(smollm2, sst2):
    demos = [Example("a gem", 1), Example("a mess", 0)]
    query = Example("fine work", 1)
    prompts = build_prompts(smollm2.tokenizer, sst2, [query], k=2, demo_pool=demos)
    text = smollm2.tokenizer.decode(list(prompts[0].tokens[1:]))
    gem, mess = "sentence: a gem sentiment: positive\n", "sentence: a mess sentiment: negative\n"
    query = "sentence: fine work sentiment:"
    assert text in (gem + mess + query, mess + gem + query)


def test_correct_and_wrong_demonstrations_partition_the_labels(sst2_prompts):
    for prompt in sst2_prompts.prompts:
        assert sorted(prompt.I_plus + prompt.I_minus) == sorted(prompt.label_positions)
        assert all(prompt.demo_labels[prompt.label_positions.index(p)] == prompt.query_label for p in prompt.I_plus)
        assert all(prompt.demo_labels[prompt.label_positions.index(p)] != prompt.query_label for p in prompt.I_minus)


def test_training_prompts_never_use_the_query_as_its_own_demonstration(smollm2, sst2):
    queries = [Example(f"text number {i}", i % 2) for i in range(6)]
    prompts = build_prompts(smollm2.tokenizer, sst2, queries, k=5, seed=1)
    for index, prompt in enumerate(prompts.prompts):
        text = smollm2.tokenizer.decode(list(prompt.tokens))
        assert text.count(f"text number {index} ") == 1


def test_same_seed_gives_identical_prompts(smollm2, sst2):
    pools = split_pools(sst2, seed=0)
    first = build_prompts(smollm2.tokenizer, sst2, pools.test, n_prompts=5, demo_pool=pools.demo, seed=9)
    second = build_prompts(smollm2.tokenizer, sst2, pools.test, n_prompts=5, demo_pool=pools.demo, seed=9)
    third = build_prompts(smollm2.tokenizer, sst2, pools.test, n_prompts=5, demo_pool=pools.demo, seed=10)
    assert first.prompts == second.prompts
    assert first.prompts != third.prompts


def test_unseen_label_demonstrations_never_carry_the_query_label(smollm2, sst2):
    pools = split_pools(sst2, seed=0)
    prompts = build_prompts(smollm2.tokenizer, sst2, pools.test, n_prompts=20, demo_pool=pools.demo,
                            demo_sampling="unseen_label")
    assert all(not prompt.I_plus for prompt in prompts.prompts)


def test_padded_batch_keeps_positions_and_query_rows_exact(smollm2, sst2_prompts):
    """Positions and the zero mass on pads are exact; the attention values are close, not identical:
    a padded batch and a lone prompt have different shapes, so the threads split the float32 sums
    differently (tolerances.py)."""
    batch = sst2_prompts.collate(range(4))
    lengths = [len(p.tokens) for p in sst2_prompts.prompts[:4]]
    assert len(set(lengths)) > 1, "the batch must actually need padding"
    width = batch.tokens.shape[1]
    for row, prompt in enumerate(sst2_prompts.prompts[:4]):
        offset = width - len(prompt.tokens)
        assert batch.tokens[row, batch.label_positions[row]].tolist() == [
            prompt.tokens[p] for p in prompt.label_positions]
        assert batch.attention_mask[row, :offset].sum() == 0
    layers = [0, 17, 20, smollm2.cfg.n_layers - 1]
    with torch.no_grad():
        padded = query_attention_rows(smollm2, batch, layers)
        for row in range(4):
            alone = query_attention_rows(smollm2, sst2_prompts.collate([row]), layers)[0]
            offset = width - lengths[row]
            assert padded[row, ..., :offset].abs().sum() == 0, "no attention on padding"
            torch.testing.assert_close(padded[row, ..., offset:], alone, atol=ATTENTION_ATOL, rtol=0)


def test_multi_token_label_word_is_an_error_naming_its_tokens(smollm2):
    with pytest.raises(LabelTokenError, match=r"'sci/tech' is not a single token.*\[' sci', '/"):
        label_token_ids(smollm2.tokenizer, ["world", "sci/tech"], "topic: ")
    assert len(label_token_ids(smollm2.tokenizer, ["world", "sci/tech"], "topic: ", first_token=True)) == 2


def test_every_paper_dataset_has_single_token_labels_for_the_embedded_model(smollm2):
    for name in ("sst2", "mr", "fp", "sst5", "trec", "subj", "tee", "teh"):
        dataset = load_dataset(name)
        ids = label_token_ids(smollm2.tokenizer, dataset.label_words, dataset.template.label_prefix)
        assert len(set(ids)) == len(dataset.label_words)


def test_prompt_longer_than_the_context_is_an_error(smollm2, sst2):
    pools = split_pools(sst2, seed=0)
    with pytest.raises(PromptTooLongError, match="more than the model's context of 40"):
        build_prompts(smollm2.tokenizer, sst2, pools.train, n_prompts=2, k=4, max_length=40)


def test_k_larger_than_the_pool_is_an_error(smollm2, sst2):
    pool = [Example("a", 0), Example("b", 1), Example("c", 0)]
    with pytest.raises(DataError, match="k = 3 demonstrations"):
        build_prompts(smollm2.tokenizer, sst2, pool, k=3)
    with pytest.raises(DataError, match="only 3"):
        build_prompts(smollm2.tokenizer, sst2, pool, n_prompts=5, k=1)


def test_custom_template_is_rendered(smollm2, sst2):
    template = Template(instruction="Classify.\n", input_prefix="review: ", label_prefix="label: ", label_affix="\t")
    prompts = build_prompts(smollm2.tokenizer, sst2, [Example("ok", 1)], k=1, demo_pool=[Example("bad", 0)],
                            template=template)
    assert smollm2.tokenizer.decode(list(prompts[0].tokens[1:])) == (
        "Classify.\nreview: bad label: negative\treview: ok label:")


# --- label-covering demonstrations (issue 18) ---------------------------------------------------------


def test_label_covering_prompts_show_the_query_label_on_real_trec(gpt2_tokenizer):
    """Real StaICC TREC (6 labels, k = 4), training prompts (demonstrations from the queries' own pool)
    and test-style prompts (a separate demonstration pool): random demonstrations miss the query's label
    on a large share of prompts (the issue measured 43%); label-covering ones never do."""
    trec = load_dataset("trec")
    pools = split_pools(trec, seed=42)
    for queries, demo_pool, n in ((pools.train, None, 300), (pools.test, pools.demo, 100)):
        random = build_prompts(gpt2_tokenizer, trec, queries, n_prompts=n, k=4, seed=1, demo_pool=demo_pool)
        assert share_without_query_label(random) > 0.2
        for sampling in ("label_covering", "label_covering_resampled"):
            covering = build_prompts(gpt2_tokenizer, trec, queries, n_prompts=n, k=4, seed=1, demo_pool=demo_pool,
                                     demo_sampling=sampling)
            assert share_without_query_label(covering) == 0.0
            assert all(prompt.query_label in prompt.demo_labels and len(prompt.demo_labels) == 4
                       for prompt in covering.prompts)
            assert covering.metadata["demo_sampling"] == sampling
            assert all(len(set(prompt.label_positions)) == 4 for prompt in covering.prompts)


def test_label_covering_never_shows_a_query_as_its_own_demonstration(gpt2_tokenizer, sst2):
    # Training prompts draw demonstrations from the queries' own pool. Each label has three examples, so a
    # sampler that did not exclude the query would pick it as its label's demonstration a third of the time.
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    pool = [Example(word, index % 2) for index, word in enumerate(words)]
    for sampling in ("label_covering", "label_covering_resampled"):
        prompts = build_prompts(gpt2_tokenizer, sst2, pool, k=2, seed=3, repeats=20, demo_sampling=sampling)
        for prompt in prompts.prompts:
            text = gpt2_tokenizer.decode(list(prompt.tokens))
            assert max(text.count(word) for word in words) == 1, text
            assert prompt.query_label in prompt.demo_labels


def test_resampled_label_covering_refuses_a_label_the_pool_cannot_show(gpt2_tokenizer, sst2):
    # The only example of label 1 is the query itself: no demonstration set can cover it, and redrawing must
    # stop with a clear error rather than loop.
    pool = [Example("alpha", 1), *(Example(word, 0) for word in ("bravo", "charlie", "delta"))]
    with pytest.raises(DataError, match="no other example of label 1"):
        build_prompts(gpt2_tokenizer, sst2, pool, k=2, seed=3, demo_sampling="label_covering_resampled")


def test_resampled_label_covering_gives_up_on_a_label_too_rare_to_draw(gpt2_tokenizer, sst2, monkeypatch):
    # One example of label 1 among 40 others: a random pair holds it 1 time in 20, so three draws usually miss.
    import abft_lens.prompts as prompts

    monkeypatch.setattr(prompts, "MAX_COVERING_DRAWS", 3)
    pool = [Example("query", 1), Example("rare", 1), *(Example(f"w{i}", 0) for i in range(39))]
    with pytest.raises(DataError, match="3 random sets of 2 demonstrations held no example of label 1"):
        build_prompts(gpt2_tokenizer, sst2, pool, n_prompts=1, k=2, seed=0, repeats=30,
                      demo_sampling="label_covering_resampled")


def test_share_without_query_label_counts_prompts_with_no_correct_demonstration():
    def prompt(demo_labels, query_label):
        return ICLPrompt((1, 2, 3), (0, 1), demo_labels, query_label)

    prompts = PromptSet([prompt((0, 1), 1), prompt((0, 0), 1), prompt((2, 2), 2), prompt((0, 2), 1)],
                        ("a", "b", "c"), (5, 6, 7), 0)
    assert share_without_query_label(prompts) == pytest.approx(2 / 4)
    with pytest.raises(DataError, match="No prompts"):
        share_without_query_label(prompts.subset([]))


def test_label_covering_needs_another_example_of_the_query_label(gpt2_tokenizer, sst2):
    pool = [Example("good", 1), Example("bad", 0), Example("awful", 0), Example("poor", 0)]
    with pytest.raises(DataError, match="no other example of label 1"):
        build_prompts(gpt2_tokenizer, sst2, pool, k=2, demo_sampling="label_covering")  # "good" is alone
    with pytest.raises(DataError, match="needs k >= 1"):
        build_prompts(gpt2_tokenizer, sst2, pool, k=0, demo_sampling="label_covering")
