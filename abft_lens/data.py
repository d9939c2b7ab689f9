"""Classification data sets for ICL: the paper's eight (from StaICC), StaICC's two extra ones, and
user CSV/JSONL files; their templates, label words and seeded, disjoint pools."""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from abft_lens.errors import DataError


@dataclass(frozen=True)
class Template:
    """How one demonstration is rendered:
    ``instruction`` once, then per demonstration
    ``input_prefix + text + input_affix + label_prefix + label + label_affix``,
    then ``query_prefix + input_prefix + query + input_affix + label_prefix`` (its trailing
    whitespace stripped, so the prediction is read at the ':' and labels are space-prefixed tokens).
    """

    instruction: str = ""
    input_prefix: str = "Input: "
    input_affix: str = " "
    label_prefix: str = "Label: "
    label_affix: str = "\n"
    query_prefix: str = ""


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into the data set's label_words


@dataclass(frozen=True)
class ICLDataset:
    name: str
    examples: tuple[Example, ...]
    label_words: tuple[str, ...]
    template: Template
    # StaICC's alternatives per template slot (instruction, input_prefix, label_prefix,
    # label_affix), three each: the options of the robustness test's L9 orthogonal array.
    template_options: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def with_label_words(self, label_words: Sequence[str]) -> ICLDataset:
        if len(label_words) != len(self.label_words):
            raise DataError(
                f"{self.name} has {len(self.label_words)} labels {list(self.label_words)}; "
                f"got {len(label_words)} label words {list(label_words)}."
            )
        return replace(self, label_words=tuple(label_words))


# short name -> StaICC loader class name. The first eight are the paper's.
STAICC_DATASETS: dict[str, str] = {
    "sst2": "glue_sst2",
    "mr": "rotten_tomatoes",
    "fp": "financial_phrasebank",
    "sst5": "sst5",
    "trec": "trec",
    "subj": "subjective",
    "tee": "tweet_eval_emotion",
    "teh": "tweet_eval_hate",
    "agnews": "agnews",
    "hate_speech18": "hate_speech_18",
}
PAPER_DATASETS: tuple[str, ...] = ("sst2", "mr", "fp", "sst5", "trec", "subj", "tee", "teh")

# The paper's label words where they differ from StaICC's (method.md, Table 5), in StaICC's label
# order: StaICC's SUBJ labels ("false", "true") answer "subjectiveness:", so false = objective.
PAPER_LABEL_WORDS: dict[str, tuple[str, ...]] = {"subj": ("objective", "subjective")}

_L9_SLOTS = ("instruction", "input_prefix", "label_prefix", "label_affix")


@functools.cache  # about 0.9 s a read (StaICC unpickles and deep-copies every example); the result is immutable
def _from_staicc(short_name: str) -> ICLDataset:
    from StaICC.util import hgf_dataset_loader

    loader = getattr(hgf_dataset_loader, STAICC_DATASETS[short_name])()
    if loader.get_label_space() is None:
        loader.reduct_label_token()
    label_words = tuple(loader.get_label_space())
    examples = tuple(
        Example(
            text=" ".join(loader.get_input_text(i)),
            label=label_words.index(loader.get_label(i)),
        )
        for i in range(len(loader))
    )
    options = loader.get_alternate_template()
    template = Template(
        instruction=loader.get_instruction(),
        input_prefix=loader.get_input_text_prefixes()[0],
        input_affix=loader.get_input_text_affixes()[0],
        label_prefix=loader.get_label_prefix(),
        label_affix=loader.get_label_affix(),
        query_prefix=loader.get_query_prefix(),
    )
    template_options = {
        "instruction": tuple(options["instruction"]),
        "input_prefix": tuple(prefixes[0] for prefixes in options["input_text_prefixes"]),
        "label_prefix": tuple(options["label_prefix"]),
        "label_affix": tuple(options["label_affix"]),
    }
    # Examples index StaICC's label space; the paper's words (Table 5) replace it word for word.
    label_words = PAPER_LABEL_WORDS.get(short_name, label_words)
    return ICLDataset(short_name, examples, label_words, template, template_options)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line (blank lines skipped); a bad line is a DataError naming it."""
    rows = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object with the text and label, got "
                                f"{type(row).__name__}.")
            rows.append(row)
    return pd.DataFrame(rows)


def _read_table(path: Path) -> pd.DataFrame:
    """A user's CSV/JSONL/JSON file as a frame; unreadable content is a DataError naming the file."""
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path)
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".json":
            return pd.read_json(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: a CSV data set needs a header row and one row per example.") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text: {error}.") from None
    except (pd.errors.ParserError, ValueError) as error:
        raise DataError(f"{path} cannot be read as {path.suffix[1:].upper()}: {error}") from None
    raise DataError(f"{path}: expected a .csv or .jsonl file.")


def _from_file(path: Path, text_column: str, label_column: str) -> ICLDataset:
    frame = _read_table(path)
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}; columns are {list(frame.columns)}.")
    frame = frame.dropna(subset=[text_column, label_column])
    label_words = tuple(sorted(str(label) for label in frame[label_column].unique()))
    index = {word: i for i, word in enumerate(label_words)}
    examples = tuple(
        Example(str(text), index[str(label)])
        for text, label in zip(frame[text_column], frame[label_column], strict=True)
    )
    return ICLDataset(path.stem, examples, label_words, Template())


def load_dataset(
    name_or_path: str,
    label_words: Sequence[str] | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> ICLDataset:
    """A data set by short name (``sst2``, ``mr``, ... see ``STAICC_DATASETS``) or a CSV/JSONL file
    with ``text`` and ``label`` columns (label words are the sorted distinct labels)."""
    if name_or_path in STAICC_DATASETS:
        dataset = _from_staicc(name_or_path)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            known = ", ".join(STAICC_DATASETS)
            raise DataError(f"Unknown data set '{name_or_path}': not one of {known}, nor a file.")
        dataset = _from_file(path, text_column, label_column)
    if label_words is not None:
        dataset = dataset.with_label_words(label_words)
    _check_classes(dataset)
    return dataset


def _check_classes(dataset: ICLDataset) -> None:
    if not dataset.examples:
        raise DataError(f"Data set '{dataset.name}' is empty.")
    present = {example.label for example in dataset.examples}
    if len(present) < 2:
        raise DataError(
            f"Data set '{dataset.name}' has a single class ({dataset.label_words[present.pop()]}); "
            "ICL classification needs at least two."
        )


@dataclass(frozen=True)
class Pools:
    """Disjoint example pools: training prompts come from ``train`` (demonstrations and queries
    alike), test prompts take queries from ``test`` and demonstrations from ``demo``."""

    train: tuple[Example, ...]
    demo: tuple[Example, ...]
    test: tuple[Example, ...]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "demo": len(self.demo), "test": len(self.test)}


def split_pools(
    dataset: ICLDataset,
    seed: int = 42,
    train_size: int = 1024,
    test_size: int = 512,
    demo_size: int = 4096,
) -> Pools:
    """Shuffle with ``seed`` and cut three disjoint pools. A data set too small for the asked
    sizes is split 1/2 train, 1/4 demo, 1/4 test."""
    order = np.random.default_rng(seed).permutation(len(dataset.examples))
    shuffled = [dataset.examples[i] for i in order]
    n = len(shuffled)
    if n < train_size + test_size + 2:
        train_size, test_size = n // 2, n // 4
    test = tuple(shuffled[:test_size])
    train = tuple(shuffled[test_size : test_size + train_size])
    demo = tuple(shuffled[test_size + train_size : test_size + train_size + demo_size])
    for pool_name, pool in (("train", train), ("demo", demo), ("test", test)):
        if len(pool) < 2:
            raise DataError(f"Data set '{dataset.name}' ({n} examples) is too small for a {pool_name} pool.")
    return Pools(train, demo, test)


def label_counts(examples: Sequence[Example], n_labels: int) -> list[int]:
    counts = Counter(example.label for example in examples)
    return [counts.get(label, 0) for label in range(n_labels)]


def l9_templates(dataset: ICLDataset) -> list[Template]:
    """The nine templates of StaICC's L9(3^4) orthogonal array over instruction, input prefix,
    label prefix and label affix (the paper's template-robustness test)."""
    from StaICC.util.configs import STANDARD_SETTINGS

    if not dataset.template_options:
        raise DataError(f"Data set '{dataset.name}' has no template options for the robustness test.")
    templates = []
    for row in STANDARD_SETTINGS["L9(3,4)_orthogonal_table"]:
        choice = {slot: dataset.template_options[slot][level] for slot, level in zip(_L9_SLOTS, row, strict=True)}
        templates.append(replace(dataset.template, **choice))
    return templates


def dataset_summary(dataset: ICLDataset) -> dict[str, object]:
    return {
        "name": dataset.name,
        "examples": len(dataset.examples),
        "label_words": list(dataset.label_words),
        "template": json.loads(json.dumps(dataset.template.__dict__)),
    }
