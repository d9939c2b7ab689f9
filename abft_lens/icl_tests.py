"""Tests of in-context learning that memorising the task cannot pass (issue 15).

Accuracy cannot tell a better in-context learner from a model that learned the task into its
weights. Two label substitutions can:

- ``flipped``: the label words are permuted by a *derangement* (no word keeps its meaning),
  consistently in the demonstrations and in the answer key. A model that follows its demonstrations
  answers with the word the prompt uses for the query's label; one that memorised the task answers
  with the word's usual meaning (``memorised_share``).
- ``symbols``: the label words are replaced by neutral single tokens (``A``, ``B``, ... or digits),
  consistently within the prompt: no prior meaning to fall back on.

Both are data-set transforms: a flipped data set is the same examples with label ``i`` shown as word
``words[sigma[i]]``, so prompts, label positions, batching and scoring are the ordinary ones and the
scores are against the in-prompt mapping. The demonstrations must show every label
(``demo_sampling="every_label"``, k >= the number of labels: ``icl_test_k``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np

from abft_lens.data import ICLDataset
from abft_lens.errors import DataError, LabelTokenError
from abft_lens.prompts import label_token_ids

ICLTest = Literal["flipped", "symbols"]
SYMBOL_CANDIDATES = (tuple("ABCDEFGHIJ"), tuple("0123456789"))


def derangement(n: int, seed: int) -> tuple[int, ...]:
    """A random permutation of ``range(n)`` with no fixed point (n >= 2), by rejection: the share of
    derangements is ~1/e, so a few draws suffice."""
    if n < 2:
        raise DataError(f"A derangement needs at least 2 labels; got {n}.")
    rng = np.random.default_rng(seed)
    while True:
        sigma = rng.permutation(n)
        if not (sigma == np.arange(n)).any():
            return tuple(int(i) for i in sigma)


def flipped_labels(dataset: ICLDataset, seed: int) -> tuple[ICLDataset, tuple[int, ...]]:
    """``dataset`` with label ``i`` shown (and expected) as ``label_words[sigma[i]]``, and sigma."""
    sigma = derangement(len(dataset.label_words), seed)
    words = dataset.label_words
    flipped = dataset.with_label_words([words[sigma[i]] for i in range(len(words))])
    return replace(flipped, name=f"{dataset.name}-flipped"), sigma


def symbol_labels(dataset: ICLDataset, tokenizer) -> ICLDataset:
    """``dataset`` with neutral symbol label words, each checked to be one token after the template's
    label prefix (letters, or digits where a letter is not one token)."""
    n = len(dataset.label_words)
    for candidates in SYMBOL_CANDIDATES:
        if n > len(candidates):
            continue
        symbols = candidates[:n]
        try:
            label_token_ids(tokenizer, symbols, dataset.template.label_prefix)
        except LabelTokenError:
            continue
        return replace(dataset.with_label_words(symbols), name=f"{dataset.name}-symbols")
    raise DataError(f"No single-token symbols for the {n} labels of '{dataset.name}' with this tokenizer.")


def icl_test_dataset(test: ICLTest, dataset: ICLDataset, tokenizer, seed: int
                     ) -> tuple[ICLDataset, tuple[int, ...] | None]:
    """The transformed data set of ``test`` and, for ``flipped``, its permutation."""
    if test == "flipped":
        return flipped_labels(dataset, seed)
    if test == "symbols":
        return symbol_labels(dataset, tokenizer), None
    raise DataError(f"ICL test must be flipped or symbols; got {test!r}.")


def icl_test_k(n_labels: int, k: int) -> int:
    """Demonstrations per prompt for the ICL tests: at least one per label."""
    return max(k, n_labels)


def memorised_share(predicted: Sequence[int], query_labels: Sequence[int], sigma: Sequence[int]) -> float:
    """For a flipped data set: the share of answers that give the word whose *usual* meaning is the
    query's label (``words[query_label]``, which the flipped set calls label ``sigma^-1[query_label]``),
    instead of the word the prompt's mapping asks for."""
    predicted, query_labels = np.asarray(predicted), np.asarray(query_labels)
    if len(predicted) == 0:
        return float("nan")
    return float((np.asarray(sigma)[predicted] == query_labels).mean())
