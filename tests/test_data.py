"""Data sets, pools and templates (no model needed)."""

from __future__ import annotations

import json

import pytest

from abft_lens.data import (
    PAPER_DATASETS, PAPER_LABEL_WORDS, STAICC_DATASETS, Example, l9_templates, label_counts, load_dataset,
    split_pools,
)
from abft_lens.errors import DataError

# method.md, Table 5: the unit `<input prefix>[x] <label prefix>[y]\n` and the label words, per data set.
PAPER_TABLE_5 = {
    "sst2": ("sentence: ", "sentiment: ", ("negative", "positive")),
    "mr": ("review: ", "sentiment: ", ("negative", "positive")),
    "fp": ("sentence: ", "sentiment: ", ("negative", "neutral", "positive")),
    "sst5": ("sentence: ", "sentiment: ", ("poor", "bad", "neutral", "good", "great")),
    "trec": ("question: ", "target: ", ("short", "entity", "description", "person", "location", "number")),
    "subj": ("review: ", "subjectiveness: ", ("objective", "subjective")),
    "tee": ("tweet: ", "emotion: ", ("anger", "joy", "positive", "sad")),
    "teh": ("tweet: ", "hate speech: ", ("normal", "hate")),
}
EXPECTED_LABEL_WORDS = {
    **{name: words for name, (_, _, words) in PAPER_TABLE_5.items()},
    "agnews": ("world", "sports", "business", "science"),
    "hate_speech18": ("normal", "hate", "skip", "relation"),
}


@pytest.mark.parametrize("name", list(STAICC_DATASETS))
def test_every_staicc_dataset_loads_with_its_label_words(name):
    dataset = load_dataset(name)
    assert dataset.label_words == EXPECTED_LABEL_WORDS[name]
    assert len(dataset.examples) > 2000
    counts = label_counts(dataset.examples, len(dataset.label_words))
    assert all(count > 0 for count in counts), "every label occurs"
    assert dataset.template.label_prefix.endswith(": ")


def test_the_paper_datasets_are_the_eight_of_table_1():
    assert PAPER_DATASETS == ("sst2", "mr", "fp", "sst5", "trec", "subj", "tee", "teh")


def test_sst2_template_matches_the_paper():
    template = load_dataset("sst2").template
    assert (template.input_prefix, template.input_affix, template.label_prefix, template.label_affix) == (
        "sentence: ", " ", "sentiment: ", "\n")


def test_subj_offers_the_paper_label_words():
    dataset = load_dataset("subj", label_words=PAPER_LABEL_WORDS["subj"])
    assert dataset.label_words == ("objective", "subjective")
    with pytest.raises(DataError, match="2 labels"):
        load_dataset("subj", label_words=("a", "b", "c"))


def test_pools_are_disjoint_seeded_and_sized_like_the_paper():
    dataset = load_dataset("sst2")
    pools = split_pools(dataset, seed=3)
    assert pools.sizes() == {"train": 1024, "demo": 4096, "test": 512}
    assert split_pools(dataset, seed=3) == pools
    assert split_pools(dataset, seed=4).test != pools.test
    # Disjoint as examples of the data set (SST-2 holds duplicate sentences, so compare indices).
    index = {id(example): i for i, example in enumerate(dataset.examples)}
    seen = [set(index[id(e)] for e in pool) for pool in (pools.train, pools.demo, pools.test)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_small_datasets_are_split_by_fractions():
    dataset = load_dataset("fp")
    pools = split_pools(dataset, seed=0, train_size=4000)
    assert pools.sizes()["train"] == len(dataset.examples) // 2


def test_user_csv_and_jsonl_files_load(tmp_path):
    rows = [{"text": f"example {i}", "label": "yes" if i % 2 else "no"} for i in range(20)]
    csv = tmp_path / "mine.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (csv, jsonl):
        dataset = load_dataset(str(path))
        assert dataset.label_words == ("no", "yes")
        assert dataset.examples[1] == Example("example 1", 1)


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="Unknown data set 'imdb'"):
        load_dataset("imdb")
    single = tmp_path / "single.csv"
    single.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="single class"):
        load_dataset(str(single))
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset(str(empty))
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("sentence,y\na,1\n")
    with pytest.raises(DataError, match="no column"):
        load_dataset(str(wrong))


def test_l9_templates_vary_every_slot_three_ways():
    templates = l9_templates(load_dataset("sst2"))
    assert len(set(templates)) == 9
    for slot in ("instruction", "input_prefix", "label_prefix", "label_affix"):
        assert len({getattr(t, slot) for t in templates}) == 3


@pytest.mark.parametrize("name", sorted(PAPER_TABLE_5))
def test_every_paper_dataset_uses_the_papers_template_and_label_words(name):
    input_prefix, label_prefix, words = PAPER_TABLE_5[name]
    dataset = load_dataset(name)
    template = dataset.template
    assert (template.instruction, template.input_prefix, template.input_affix) == ("", input_prefix, " ")
    assert (template.label_prefix, template.label_affix, template.query_prefix) == (label_prefix, "\n", "")
    assert dataset.label_words == words


def test_subj_objective_is_the_label_of_plot_descriptions():
    """StaICC's SUBJ labels are false/true for "subjectiveness"; the paper's words replace them in that
    order, so a plot summary (objective) keeps label 0."""
    subj = load_dataset("subj")
    first = subj.examples[0]
    assert first.text.startswith("watch as the archetypal stories of life and death")
    assert subj.label_words[first.label] == "objective"
