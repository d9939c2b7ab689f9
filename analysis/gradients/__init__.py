"""Path decomposition of the end-to-end (E2E) gradient on W_Q/W_K, and its agreement with ABFT.

The claim under test (method.md section 7): the E2E objective - cross-entropy of the query's true
label at the last position - "contains" the ABFT objective, i.e. part of what E2E fine-tuning does
to W_Q/W_K is exactly what ABFT does: move the query's attention onto correct demonstration labels
and off wrong ones.

Method
------
W_Q^l and W_K^l act on the model only through the attention scores of layer l, hence only through
its attention pattern ``P^l = blocks.{l}.attn.hook_pattern`` [batch, head, query_pos, key_pos].
By the chain rule, with ``G^l = dL/dP^l`` the *total* derivative of the loss with respect to that
pattern (every downstream path included),

    dL/dW^l = sum_{h, i, j} G^l[h, i, j] * dP^l[h, i, j]/dW^l        (W = W_Q or W_K of layer l)

where ``dP^l/dW^l`` is local: W^l does not affect layer l's input, so the derivative holds it
fixed. Split G^l by masks over (query_pos, key_pos) into three pieces that add up to G^l:

- ``correct``: the query's row (last position) on the demonstration label tokens equal to the
  query's true label (I_plus);
- ``wrong``: the query's row on the other demonstration label tokens (I_minus);
- ``rest``: everything else (the query row's other keys and every other row).

Back-propagate each piece separately from P^l to W_Q^l and W_K^l
(``torch.autograd.grad(P^l, [W_Q^l, W_K^l], grad_outputs=piece)``). The map G -> dL/dW is linear,
so the three parts add up to the plain back-propagated gradient; ``identity_error`` measures it.
The ``correct + wrong`` part is the "label-attention path": the share of the E2E gradient that
changes W^l by changing how much the query attends to the demonstration labels.

For GQA models (SmolLM2: 9 query heads, 3 KV heads, d_head 64) a query head's slice of W_Q is its
own d_head rows of ``q.weight``; its slice of W_K is its KV group's rows of ``k.weight``, which the
group's query heads share, so per-head W_K numbers are per KV group.

Agreement with ABFT, per prompt, from the same forward: the ABFT loss (abft_lens.loss.abft_loss,
A = 0.5, B = 1, heads flagged on that prompt by abft_lens.heads.induction_head_mask) and its
gradient. Reported: cosine(E2E gradient or one of its parts, ABFT gradient) per layer and per head,
on the gradient of the mean loss over the prompts and per prompt; the share of the E2E gradient
norm in the label path; and a sign test. Both losses are minimised, so a positive cosine means a
descent step of one lowers the other to first order.

The sign test asks, per (prompt, flagged head): does a small step *down* the E2E gradient raise the
head's attention on correct labels (dS_plus > 0) and lower it on wrong labels (dS_minus < 0)? That
is what descending the ABFT loss does by construction. The change is measured by a central finite
difference, ``(S(theta - s d) - S(theta + s d)) / 2`` for the descent direction d with
``||s d|| = sign_test_eps * ||theta_QK||``, and counted over (prompt, head) pairs; the confidence
intervals are Wilson's (pairs as independent) and a bootstrap over prompts (pairs of a prompt are
not independent). The same test along the ABFT gradient checks the sign convention (it must pass
nearly always), and ``aggregate`` steps along the mean E2E gradient of all prompts (one training
step) and measures every prompt.
"""

from .analyze import GradientAnalysis, GradientConfig, analyze_gradients, head_table, layer_table
from .decomposition import cosine, label_column_masks, norm, projection_share, split_pattern_gradient
from .parameters import QK, QKParameters, kv_group, per_head
from .prompt import PIECES, PromptGradients, Softmax, prompt_gradients
from .sign_test import (
    SIGN_CRITERIA,
    cluster_bootstrap_interval,
    label_attention_change,
    sign_test,
    wilson_interval,
)

__all__ = [
    "PIECES", "QK", "SIGN_CRITERIA", "GradientAnalysis", "GradientConfig", "PromptGradients", "QKParameters",
    "Softmax", "analyze_gradients", "cluster_bootstrap_interval", "cosine", "head_table", "kv_group",
    "label_attention_change", "label_column_masks", "layer_table", "norm", "per_head", "projection_share",
    "prompt_gradients", "sign_test", "split_pattern_gradient", "wilson_interval",
]
