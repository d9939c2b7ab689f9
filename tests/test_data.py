"""Data sets, pools and templates (no model needed)."""

from __future__ import annotations

import json

import pytest

from abft_lens.data import (
    PAPER_DATASETS, PAPER_LABEL_WORDS, STAICC_DATASETS, Example, l9_templates, label_counts, load_dataset,
    split_pools,
)
from abft_lens.errors import DataError

EXPECTED_LABEL_WORDS = {
    "sst2": ("negative", "positive"),
    "mr": ("negative", "positive"),
    "fp": ("negative", "neutral", "positive"),
    "sst5": ("poor", "bad", "neutral", "good", "great"),
    "trec": ("short", "entity", "description", "person", "location", "number"),
    "subj": ("false", "true"),
    "tee": ("anger", "joy", "positive", "sad"),
    "teh": ("normal", "hate"),
    "agnews": ("world", "sports", "business", "science"),
    "hate_speech18": ("normal", "hate", "skip", "relation"),
}


@pytest.mark.parametrize("name", list(STAICC_DATASETS))
def test_every_staicc_dataset_loads_with_the_paper_label_words(name):
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
