"""abft-lens: find, score and fine-tune the induction heads behind in-context learning.

The core API reads like the method::

    model = load_model("smollm2-135m")
    dataset = load_dataset("sst2")
    pools = split_pools(dataset, seed=42)
    prompts = build_prompts(model.tokenizer, dataset, pools.train, n_prompts=256, k=4)
    scores = score_heads(model, prompts)
    heads = scores.select(top=20)
"""

from abft_lens.data import ICLDataset, Template, load_dataset, split_pools
from abft_lens.errors import AbftLensError
from abft_lens.heads import HeadScoreConfig, HeadScores, score_heads
from abft_lens.models import load_model
from abft_lens.prompts import ICLPrompt, PromptSet, build_prompts

__all__ = [
    "AbftLensError", "HeadScoreConfig", "HeadScores", "ICLDataset", "ICLPrompt", "PromptSet", "Template",
    "build_prompts", "load_dataset", "load_model", "score_heads", "split_pools",
]
