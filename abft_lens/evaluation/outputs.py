"""What the evaluation's forwards give: ``Predictions``, a prompt set's label logits beside its true labels.

Its own module because both the model loop (``prediction``) and the saved batches an interrupted
evaluation resumes from (``partial``) hold one."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class Predictions:
    """Label-space logits of a set's prompts with their true labels; ``induction_sums``: the induction
    heads' label-attention sums (``induction_label_mass``) where collected; ``seconds``: the compute time.
    ``predict`` returns a whole set in the set's order; a partial one holds its first prompts in computing
    order (``PromptSet.by_length``)."""

    logits: Float[Tensor, "prompt n_labels"]
    true: Int[Tensor, "prompt"]
    induction_sums: dict[str, Tensor] | None
    seconds: float

    @property
    def predicted(self) -> Int[Tensor, "prompt"]:
        return self.logits.argmax(-1)

    @property
    def probabilities(self) -> Float[Tensor, "prompt n_labels"]:
        return self.logits.softmax(-1)
