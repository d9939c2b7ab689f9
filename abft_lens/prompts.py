"""Token-exact ICL prompts.

A prompt is built by tokenising its pieces (instruction, each demonstration's text, its label
word, its affix, the query) separately and concatenating the ids, so the position of every
demonstration label token is known by construction; nothing is searched for in the text.
Batches are left-padded so that the query's last token sits at position -1 in every row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from abft_lens.data import Example, ICLDataset, Template
from abft_lens.errors import DataError, LabelTokenError, PromptTooLongError

DemoSampling = Literal["random", "unseen_label", "every_label", "label_covering", "label_covering_resampled"]
# Redraws a "label_covering_resampled" prompt may take before its query's label is called too rare to cover.
MAX_COVERING_DRAWS = 100_000


@dataclass(frozen=True)
class ICLPrompt:
    tokens: tuple[int, ...]
    label_positions: tuple[int, ...]  # I: index of each demonstration's label token in `tokens`
    demo_labels: tuple[int, ...]
    query_label: int

    @property
    def k(self) -> int:
        return len(self.label_positions)

    @property
    def correct_demos(self) -> tuple[bool, ...]:
        return tuple(label == self.query_label for label in self.demo_labels)

    @property
    def I_plus(self) -> tuple[int, ...]:  # noqa: N802 (the paper's name)
        """Positions of demonstration labels equal to the query's true label."""
        return tuple(p for p, ok in zip(self.label_positions, self.correct_demos, strict=True) if ok)

    @property
    def I_minus(self) -> tuple[int, ...]:  # noqa: N802
        return tuple(p for p, ok in zip(self.label_positions, self.correct_demos, strict=True) if not ok)


@dataclass
class PromptBatch:
    """Left-padded prompts; positions are in padded coordinates."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    label_positions: Int[Tensor, "batch k"]
    correct_mask: Bool[Tensor, "batch k"]
    demo_labels: Int[Tensor, "batch k"]
    query_labels: Int[Tensor, "batch"]
    prompt_lengths: Int[Tensor, "batch"]
    label_token_ids: Int[Tensor, "n_labels"]

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(**{name: value.to(device) for name, value in self.__dict__.items()})


@dataclass
class PromptSet:
    prompts: list[ICLPrompt]
    label_words: tuple[str, ...]
    label_token_ids: tuple[int, ...]
    pad_token_id: int
    metadata: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> ICLPrompt:
        return self.prompts[index]

    @property
    def k(self) -> int:
        return self.prompts[0].k

    def subset(self, indices: Sequence[int]) -> PromptSet:
        return PromptSet([self.prompts[i] for i in indices], self.label_words, self.label_token_ids,
                         self.pad_token_id, dict(self.metadata))

    def collate(self, indices: Sequence[int]) -> PromptBatch:
        chosen = [self.prompts[i] for i in indices]
        width = max(len(p.tokens) for p in chosen)
        tokens = torch.full((len(chosen), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, prompt in enumerate(chosen):
            tokens[row, width - len(prompt.tokens):] = torch.tensor(prompt.tokens)
            mask[row, width - len(prompt.tokens):] = 1
        offsets = torch.tensor([width - len(p.tokens) for p in chosen])
        return PromptBatch(
            tokens=tokens,
            attention_mask=mask,
            label_positions=torch.tensor([p.label_positions for p in chosen], dtype=torch.long) + offsets[:, None],
            correct_mask=torch.tensor([p.correct_demos for p in chosen], dtype=torch.bool),
            demo_labels=torch.tensor([p.demo_labels for p in chosen], dtype=torch.long),
            query_labels=torch.tensor([p.query_label for p in chosen]),
            prompt_lengths=torch.tensor([len(p.tokens) for p in chosen]),
            label_token_ids=torch.tensor(self.label_token_ids),
        )

    def by_length(self, indices: Sequence[int] | None = None) -> list[int]:
        """``indices`` (default: every prompt) ordered by token count, stable. Batches cut from this
        order pad little: a batch of prompts in the set's order pads every prompt to the longest of
        its batch, 20-50% more tokens than the prompts hold on the paper's data sets (batches of 8-32),
        under 3% when sorted. A left-padded prompt's results equal its lone ones, so only the work
        changes."""
        indices = range(len(self)) if indices is None else indices
        return sorted(indices, key=lambda index: len(self.prompts[index].tokens))

    def batches(self, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[PromptBatch]:
        """Batches in the given order; prompts of similar length are not regrouped, so results
        are independent of the batch size up to float summation order."""
        indices = list(range(len(self))) if indices is None else list(indices)
        for start in range(0, len(indices), batch_size):
            yield self.collate(indices[start : start + batch_size])


def share_without_query_label(prompts: PromptSet) -> float:
    """The share of ``prompts`` none of whose demonstrations carries the query's label (I_plus empty). On
    such a prompt the ABFT loss has no reward term: only the punishment of wrong labels acts. With k random
    demonstrations it grows with the number of labels (about (1 - 1/n_labels)^k for balanced labels)."""
    if len(prompts) == 0:
        raise DataError("No prompts to measure.")
    return sum(not any(prompt.correct_demos) for prompt in prompts.prompts) / len(prompts)


def query_label_demo_share(prompts: PromptSet) -> float:
    """The mean share of a prompt's demonstrations that carry its query's label: 1/n_labels for random
    demonstrations and balanced labels. Forcing one demonstration of the query's label (``label_covering``)
    raises it to 1/k + (k - 1)/(k n_labels): the query's label is then the demonstrations' majority more often
    than at test time, a shortcut a model trained on such prompts can learn. Redrawing random sets until one
    holds it (``label_covering_resampled``) raises it less, to (1/n_labels) / (1 - (1 - 1/n_labels)^k): close to
    random's on two labels, two thirds of the way to forcing's on five or six."""
    shares = [sum(prompt.correct_demos) / len(prompt.correct_demos) for prompt in prompts.prompts
              if prompt.correct_demos]
    if not shares:
        raise DataError("No prompts with demonstrations to measure.")
    return sum(shares) / len(shares)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def label_token_ids(
    tokenizer, label_words: Sequence[str], label_prefix: str, first_token: bool = False
) -> tuple[int, ...]:
    """The single token of each label word as it follows ``label_prefix`` (space-prefixed for
    ``"sentiment: "``). Raises ``LabelTokenError`` for a multi-token word unless ``first_token``."""
    separator = label_prefix[len(label_prefix.rstrip()):]
    ids = []
    for word in label_words:
        pieces = _encode(tokenizer, separator + word)
        if len(pieces) != 1 and not first_token:
            shown = [tokenizer.decode([piece]) for piece in pieces]
            raise LabelTokenError(
                f"Label word {word!r} is not a single token: it tokenises as {shown} (ids {pieces}). "
                "Choose label words that are one token each with --label-words (comma-separated)."
            )
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise LabelTokenError(f"Label words {list(label_words)} share a first token; they must differ.")
    return tuple(ids)


class PromptBuilder:
    """Renders ICL prompts of one data set and template into token ids with exact label positions."""

    def __init__(
        self,
        tokenizer,
        label_words: Sequence[str],
        template: Template,
        prepend_bos: bool = True,
        max_length: int | None = None,
        first_token_labels: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.label_words = tuple(label_words)
        self.label_ids = label_token_ids(tokenizer, label_words, template.label_prefix, first_token_labels)
        bos = tokenizer.bos_token_id
        self.prefix_ids = ([bos] if prepend_bos and bos is not None else []) + _encode(tokenizer, template.instruction)
        self.max_length = max_length
        self.affix_ids = _encode(tokenizer, template.label_affix)
        self.label_lead = template.label_prefix.rstrip()

    def _text_ids(self, text: str) -> list[int]:
        t = self.template
        return _encode(self.tokenizer, f"{t.input_prefix}{text}{t.input_affix}{self.label_lead}")

    def build(self, demos: Sequence[Example], query: Example) -> ICLPrompt:
        ids = list(self.prefix_ids)
        positions = []
        for demo in demos:
            ids += self._text_ids(demo.text)
            positions.append(len(ids))
            ids.append(self.label_ids[demo.label])
            ids += self.affix_ids
        ids += _encode(self.tokenizer, self.template.query_prefix) + self._text_ids(query.text)
        if self.max_length is not None and len(ids) > self.max_length:
            raise PromptTooLongError(
                f"A prompt is {len(ids)} tokens long, more than the model's context of "
                f"{self.max_length}. Use fewer demonstrations (k) or shorter examples."
            )
        return ICLPrompt(tuple(ids), tuple(positions), tuple(d.label for d in demos), query.label)


def _sample_demos(
    rng: np.random.Generator, pool: Sequence[Example], by_label: dict[int, np.ndarray], k: int,
    query_index: int | None, query: Example, mode: DemoSampling,
) -> list[Example]:
    if mode == "unseen_label":
        candidates = np.concatenate([idx for label, idx in by_label.items() if label != query.label])
    else:
        candidates = np.arange(len(pool))
    if query_index is not None:
        candidates = candidates[candidates != query_index]
    if len(candidates) < k:
        raise DataError(f"Cannot draw {k} demonstrations from a pool of {len(candidates)} candidates.")
    if mode == "label_covering_resampled":
        return _resampled_until_covering(rng, pool, candidates, by_label.get(query.label, np.array([], dtype=int)),
                                         k, query)
    if mode not in ("every_label", "label_covering"):
        return [pool[i] for i in rng.choice(candidates, size=k, replace=False)]
    # One demonstration of each required label first, the rest at random, in a random order. "every_label"
    # shows the whole label mapping (the ICL tests); "label_covering" only the query's label, so that the
    # prompt always has a correct label for the ABFT reward term to act on.
    required = sorted(by_label) if mode == "every_label" else [query.label]
    if k < len(required):
        raise DataError(f"demo sampling '{mode}' needs k >= {len(required)} (a demonstration of each required "
                        f"label); got k = {k}.")
    first = []
    for label in required:
        idx = by_label.get(label, np.array([], dtype=int))
        idx = idx[idx != query_index] if query_index is not None else idx
        if not len(idx):
            raise DataError(f"demo sampling '{mode}': the demonstration pool has no other example of label "
                            f"{label} to show with a query of that label.")
        first.append(int(rng.choice(idx)))
    rest = rng.choice(np.setdiff1d(candidates, first), size=k - len(first), replace=False)
    chosen = rng.permutation(np.concatenate([first, rest]).astype(int))
    return [pool[i] for i in chosen]


def _resampled_until_covering(rng: np.random.Generator, pool: Sequence[Example], candidates: np.ndarray,
                              with_query_label: np.ndarray, k: int, query: Example) -> list[Example]:
    """Random demonstration sets, redrawn until one holds the query's label: random demonstrations conditioned
    on covering the label. That raises the label's share less than forcing one ("label_covering") does, but
    does not remove the rise: covering alone over-represents it where the label is rare in random sets."""
    if k < 1:
        raise DataError(f"demo sampling 'label_covering_resampled' needs k >= 1 (a demonstration of the query's "
                        f"label); got k = {k}.")
    carries = np.isin(candidates, with_query_label)
    if not carries.any():
        raise DataError("demo sampling 'label_covering_resampled': the demonstration pool has no other example of "
                        f"label {query.label} to show with a query of that label.")
    for _ in range(MAX_COVERING_DRAWS):
        drawn = rng.choice(len(candidates), size=k, replace=False)
        if carries[drawn].any():
            return [pool[i] for i in candidates[drawn]]
    raise DataError(f"demo sampling 'label_covering_resampled': {MAX_COVERING_DRAWS} random sets of {k} "
                    f"demonstrations held no example of label {query.label}; it is too rare to cover this way.")


def build_prompts(
    tokenizer,
    dataset: ICLDataset,
    queries: Sequence[Example],
    n_prompts: int | None = None,
    k: int = 4,
    seed: int = 42,
    demo_pool: Sequence[Example] | None = None,
    demo_sampling: DemoSampling = "random",
    repeats: int = 1,
    template: Template | None = None,
    prepend_bos: bool = True,
    max_length: int | None = None,
    first_token_labels: bool = False,
) -> PromptSet:
    """ICL prompts with k demonstrations each.

    Queries are the first ``n_prompts`` of ``queries`` (all by default), each used ``repeats``
    times with fresh demonstrations. Demonstrations come from ``demo_pool`` or, when it is None,
    from ``queries`` itself without the query (training prompts). ``demo_sampling="unseen_label"``
    draws only demonstrations whose label differs from the query's (the paper's bias test);
    ``"every_label"`` shows every label at least once (k >= the number of labels; the ICL tests);
    ``"label_covering"`` shows the query's label at least once (training prompts with a correct label), by
    forcing one such demonstration; ``"label_covering_resampled"`` by redrawing random sets until one holds it.
    """
    if k < 0:
        raise DataError(f"k must be at least 0 (0-shot), got {k}.")
    chosen = list(queries[:n_prompts] if n_prompts is not None else queries)
    if n_prompts is not None and len(chosen) < n_prompts:
        raise DataError(f"Asked for {n_prompts} queries but the pool has only {len(queries)}.")
    pool = list(demo_pool) if demo_pool is not None else list(queries)
    if len(pool) - (demo_pool is None) < k:
        raise DataError(f"k = {k} demonstrations, but the demonstration pool has only {len(pool)} examples.")
    labels = np.array([example.label for example in pool])
    by_label = {int(label): np.flatnonzero(labels == label) for label in np.unique(labels)}
    if demo_sampling == "unseen_label" and len(by_label) < 2:
        raise DataError("The unseen-label test needs a demonstration pool with at least two labels.")
    builder = PromptBuilder(tokenizer, dataset.label_words, template or dataset.template,
                            prepend_bos, max_length, first_token_labels)
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(repeats):
        for index, query in enumerate(chosen):
            demos = _sample_demos(rng, pool, by_label, k, index if demo_pool is None else None,
                                  query, demo_sampling)
            prompts.append(builder.build(demos, query))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metadata = {"dataset": dataset.name, "k": k, "seed": seed, "demo_sampling": demo_sampling,
                "repeats": repeats, "prepend_bos": prepend_bos, "template": (template or dataset.template).__dict__}
    return PromptSet(prompts, dataset.label_words, builder.label_ids, int(pad or 0), metadata)
