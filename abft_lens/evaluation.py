"""Predictions and evaluation metrics for ICL classification."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from abft_lens.prompts import PromptBatch


def label_logits(model, batch: PromptBatch) -> Float[Tensor, "batch n_labels"]:
    """Logits of the label tokens at the query's last position (differentiable when grad is on)."""
    logits = model(batch.tokens, attention_mask=batch.attention_mask)
    return logits[:, -1, :].index_select(-1, batch.label_token_ids)
