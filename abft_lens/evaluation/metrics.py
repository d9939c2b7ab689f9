"""The evaluation's metric math, pure tensor code: label words as indices, accuracy, macro-F1 (their
bootstrap standard errors over whole queries, and the paired bootstrap of two models' differences),
label distributions and collapse, prediction consistency, contextual calibration, and the induction
heads' label masses."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import einops
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from abft_lens.errors import DataError
from abft_lens.heads import correct_and_wrong_mass, induction_head_mask


def encode_labels(words: Iterable[str], *columns: Sequence[str],
                  strays: bool = False) -> tuple[list[str], list[Int[Tensor, "n"]]]:
    """The label space and each column of label words as indices into it. ``words`` is the evaluation's
    label space (every label counts in macro-F1, predicted or not). A word outside it is a DataError, or
    with ``strays`` (a hand-edited file, an older run) it joins the space after ``words``, sorted."""
    space = [str(word) for word in words]
    shown = {str(word) for column in columns for word in column}
    outside = sorted(shown - set(space))
    if outside and not strays:
        raise DataError(f"answers outside the label words {space}: {outside}")
    space += outside
    index = {word: i for i, word in enumerate(space)}
    return space, [torch.tensor([index[str(word)] for word in column], dtype=torch.long) for column in columns]


def accuracy(true: Int[Tensor, "n"], predicted: Int[Tensor, "n"]) -> float:
    if true.numel() == 0:
        raise ValueError("accuracy of zero predictions is undefined")
    return float((true == predicted).double().mean())


def macro_f1(true: Int[Tensor, "n"], predicted: Int[Tensor, "n"], n_labels: int) -> float:
    """Mean over all ``n_labels`` classes of F1 = 2 TP / (2 TP + FP + FN); a class with no true and
    no predicted example scores 0 (StaICC's convention: the average is over the whole label space)."""
    if true.numel() == 0:
        raise ValueError("macro-F1 of zero predictions is undefined")
    scores = []
    for label in range(n_labels):
        is_true, is_predicted = true == label, predicted == label
        tp = int((is_true & is_predicted).sum())
        fp = int((~is_true & is_predicted).sum())
        fn = int((is_true & ~is_predicted).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def resampled_groups(groups: Int[Tensor, "n"], n_boot: int, seed: int = 0) -> Iterator[Int[Tensor, "m"]]:
    """``n_boot`` bootstrap resamples of the inputs, as index tensors. Each draws whole ``groups`` (a query
    with all its demonstration sets) with replacement: the inputs of one query are not independent."""
    _, group_of = torch.unique(groups, return_inverse=True)
    order = torch.argsort(group_of, stable=True)
    members = list(torch.split(order, torch.bincount(group_of).tolist()))
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield torch.cat([members[g] for g in rng.integers(0, len(members), len(members))])


def bootstrap_standard_errors(true: Int[Tensor, "n"], predicted: Int[Tensor, "n"], groups: Int[Tensor, "n"],
                              n_labels: int, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Bootstrap standard errors of accuracy and macro-F1, resampling whole ``groups`` (resampled_groups)."""
    if not true.shape == predicted.shape == groups.shape:
        raise ValueError("true, predicted and groups need one entry per input")
    accuracies, f1s = [], []
    for pick in resampled_groups(groups, n_boot, seed):
        accuracies.append(accuracy(true[pick], predicted[pick]))
        f1s.append(macro_f1(true[pick], predicted[pick], n_labels))
    return {"accuracy": float(np.std(accuracies, ddof=1)), "macro_f1": float(np.std(f1s, ddof=1))}


def paired_difference(true: Int[Tensor, "n"], first: Int[Tensor, "n"], second: Int[Tensor, "n"],
                      groups: Int[Tensor, "n"], n_labels: int, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """``second`` minus ``first`` in accuracy and macro-F1 on the same inputs, with bootstrap standard
    errors of both differences. A resample draws whole ``groups`` (resampled_groups), and both predictions
    of an input stay paired, so what the two share (the query's difficulty) cancels."""
    if not true.shape == first.shape == second.shape == groups.shape:
        raise ValueError("true, first, second and groups need one entry per input")
    accuracy_diffs, f1_diffs = [], []
    for pick in resampled_groups(groups, n_boot, seed):
        accuracy_diffs.append(accuracy(true[pick], second[pick]) - accuracy(true[pick], first[pick]))
        f1_diffs.append(macro_f1(true[pick], second[pick], n_labels) - macro_f1(true[pick], first[pick], n_labels))
    return {"accuracy_difference": accuracy(true, second) - accuracy(true, first),
            "accuracy_difference_se": float(np.std(accuracy_diffs, ddof=1)),
            "macro_f1_difference": macro_f1(true, second, n_labels) - macro_f1(true, first, n_labels),
            "macro_f1_difference_se": float(np.std(f1_diffs, ddof=1)),
            "n_inputs": int(true.numel()), "n_groups": int(torch.unique(groups).numel())}


def label_distribution(labels: Int[Tensor, "n"], n_labels: int) -> Float[Tensor, "n_labels"]:
    """Fraction of ``labels`` equal to each class."""
    return torch.bincount(labels, minlength=n_labels).double() / max(labels.numel(), 1)


COLLAPSE_SHARE = 0.7  # a run has collapsed when more than this share of predictions is one label ...
COLLAPSE_MARGIN = 0.2  # ... and that share is at least this much above the label's true share


def collapsed_label(predicted: Float[Tensor, "n_labels"], true: Float[Tensor, "n_labels"]) -> int | None:
    """The label the predictions have collapsed onto, if any: more than 70% of the predictions on one
    label, at least 20 points more than its true share (a model that says one word most of the time; its
    accuracy can still rise where that label is common). The margin, not a cap on the true share, is what
    catches a collapse on a balanced two-label set (SUBJ: 98% 'objective' against 51% true) and leaves a
    skewed set's majority label alone when the model predicts it about as often as it is true.
    ``predicted``/``true`` are label distributions."""
    top = int(predicted.argmax())
    margin = float(predicted[top] - true[top])  # shares are count ratios: 0.75 - 0.55 is 0.19999999999999996
    if float(predicted[top]) > COLLAPSE_SHARE and margin >= COLLAPSE_MARGIN - 1e-12:
        return top
    return None


def consistency_score(predictions: Int[Tensor, "query variant"]) -> float:
    """The paper's robustness: per query, the size of the largest group of identical predictions
    over its variants (templates or demonstration sets) divided by the number of variants, averaged
    over queries. 1 = always the same prediction; 1 / n_labels = as spread as possible."""
    if predictions.ndim != 2 or predictions.shape[1] == 0:
        raise ValueError(f"expected predictions shaped [query, variant], got {tuple(predictions.shape)}")
    n_labels = int(predictions.max()) + 1
    counts = torch.nn.functional.one_hot(predictions, n_labels).sum(dim=1)  # [query, label]
    largest_group = counts.max(dim=-1).values
    return float((largest_group.double() / predictions.shape[1]).mean())


def calibrate_probabilities(
    probabilities: Float[Tensor, "batch n_labels"], content_free: Float[Tensor, "n_cf n_labels"]
) -> Float[Tensor, "batch n_labels"]:
    """Contextual calibration: divide each label's probability by its mean over the content-free
    queries and renormalise (Zhao et al. 2021, the paper's calibration baseline)."""
    bias = einops.reduce(content_free, "n_cf n_labels -> n_labels", "mean")
    if bool((bias <= 0).any()):
        raise ValueError(f"content-free label probabilities must be positive, got {bias.tolist()}")
    scaled = probabilities / bias
    return scaled / einops.reduce(scaled, "batch n_labels -> batch 1", "sum")


def induction_label_mass(
    label_attention: Float[Tensor, "batch layer head k"],
    correct_mask: Bool[Tensor, "batch k"],
    prompt_lengths: Int[Tensor, "batch"],
) -> dict[str, Float[Tensor, ""]]:
    """Sums over the (prompt, head) pairs that pass the paper's induction threshold: their number,
    their attention on correct labels (S_plus) and on wrong labels (S_minus). Sums, not means, so
    batches add up exactly; ``summarise_induction`` turns them into means."""
    flagged = induction_head_mask(label_attention, prompt_lengths).double()
    plus, minus = correct_and_wrong_mass(label_attention.double(), correct_mask)
    return {"prompts": torch.tensor(float(label_attention.shape[0]), dtype=torch.float64),
            "flagged": flagged.sum(), "correct_mass": (plus * flagged).sum(),
            "wrong_mass": (minus * flagged).sum()}


def summarise_induction(sums: dict[str, Tensor]) -> dict[str, float]:
    flagged = float(sums["flagged"])
    return {
        "induction_heads_per_prompt": flagged / float(sums["prompts"]),
        "induction_correct_mass": float(sums["correct_mass"]) / flagged if flagged else float("nan"),
        "induction_wrong_mass": float(sums["wrong_mass"]) / flagged if flagged else float("nan"),
    }
