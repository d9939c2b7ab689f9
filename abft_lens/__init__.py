"""abft-lens: find, score and fine-tune the induction heads behind in-context learning.

The core API reads like the method::

    model = load_model("smollm2-135m")
    dataset = load_dataset("sst2")
    pools = split_pools(dataset, seed=42)
    prompts = build_prompts(model.tokenizer, dataset, pools.train, n_prompts=256, k=4)
    scores = score_heads(model, prompts)
    heads = scores.select(top=20)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Names are imported on first use (PEP 562), so that `import abft_lens.cli` and the config checks do
# not pay for torch and transformer-lens: a bad command line fails at once, before any model work.
_EXPORTS = {
    "ICLDataset": "abft_lens.data", "Template": "abft_lens.data", "load_dataset": "abft_lens.data",
    "split_pools": "abft_lens.data", "AbftLensError": "abft_lens.errors", "HeadScoreConfig": "abft_lens.heads",
    "HeadScores": "abft_lens.heads", "score_heads": "abft_lens.heads", "load_model": "abft_lens.models",
    "ICLPrompt": "abft_lens.prompts", "PromptSet": "abft_lens.prompts", "build_prompts": "abft_lens.prompts",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from abft_lens.data import ICLDataset, Template, load_dataset, split_pools
    from abft_lens.errors import AbftLensError
    from abft_lens.heads import HeadScoreConfig, HeadScores, score_heads
    from abft_lens.models import load_model
    from abft_lens.prompts import ICLPrompt, PromptSet, build_prompts


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'abft_lens' has no attribute {name!r}")
