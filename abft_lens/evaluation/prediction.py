"""Running the model for predictions: ``predict`` is the one loop that runs a model over a prompt set
(label logits at the query's last position, and optionally the induction heads' label attention from
the same forward); ``content_free_probabilities`` feeds the calibration."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens.data import Example, ICLDataset
from abft_lens.errors import DataError
from abft_lens.evaluation.metrics import induction_label_mass
from abft_lens.evaluation.outputs import Predictions
from abft_lens.evaluation.partial import PartialPredictions
from abft_lens.forward import label_logits, query_logits_and_rows
from abft_lens.heads import gather_label_attention
from abft_lens.prompts import PromptBatch, PromptSet, build_prompts


def _logits_and_label_attention(
    model, batch: PromptBatch
) -> tuple[Float[Tensor, "batch n_labels"], Float[Tensor, "batch layer head k"]]:
    """One forward: the label logits and every head's attention from the last position to the
    demonstration labels."""
    logits, rows = query_logits_and_rows(model, batch, range(model.cfg.n_layers))
    return logits.index_select(-1, batch.label_token_ids), gather_label_attention(rows, batch.label_positions)


def predict(model, prompts: PromptSet, batch_size: int = 8, attention: bool = False,
            progress: bool = True, desc: str = "evaluating", partial: PartialPredictions | None = None
            ) -> Predictions:
    """Label logits of every prompt (no gradients); with ``attention``, also the induction heads'
    label-attention sums (``induction_label_mass``) from the same forward. With ``partial``, finished
    batches are saved as they go and a run of the same computation resumes from them."""
    device = next(model.parameters()).device
    attention = attention and prompts.k > 0
    file = partial.file_for(prompts, batch_size, attention) if partial is not None else None
    saved = file.load(len(prompts), batch_size) if file is not None else None
    done = len(saved.true) if saved is not None else 0
    if partial is not None:
        partial.count_read_back(file, done)
    logits, true = ([saved.logits], [saved.true]) if saved is not None else ([], [])
    saved_sums = saved.induction_sums if saved is not None else None
    # The finished batches: how many of ``logits``/``true`` and the sums over them, set in one assignment
    # after each batch, so that a save on Ctrl-C never holds one batch's sums without its logits.
    finished: tuple[int, dict[str, Tensor] | None] = (len(logits), saved_sums)
    started = time.perf_counter() - (saved.seconds if saved is not None else 0.0)

    def so_far() -> Predictions:
        n_parts, sums = finished
        return Predictions(torch.cat(logits[:n_parts]), torch.cat(true[:n_parts]), sums,
                           time.perf_counter() - started)

    bar = tqdm(total=len(prompts), initial=done, desc=desc, unit="prompt", disable=not progress)
    order = prompts.by_length()  # batches of similar length; results go back to the set's order below
    try:
        with torch.inference_mode():
            # A resumed set starts after its saved prompts, a whole number of batches: the batches are the same.
            for batch in prompts.batches(batch_size, order[done:]):
                batch = batch.to(device)
                sums = finished[1]
                if attention:
                    batch_logits, label_attention = _logits_and_label_attention(model, batch)
                    batch_sums = induction_label_mass(label_attention.cpu(), batch.correct_mask.cpu(),
                                                      batch.prompt_lengths.cpu())
                    sums = batch_sums if sums is None else {key: sums[key] + batch_sums[key] for key in sums}
                else:
                    batch_logits = label_logits(model, batch)
                logits.append(batch_logits.float().cpu())
                true.append(batch.query_labels.cpu())
                finished = (len(logits), sums)
                bar.update(len(batch.query_labels))
                if file is not None:
                    file.save_if_due(so_far)
        computed = so_far()
        if file is not None and done < len(prompts):
            file.save(computed)  # a finished set is not computed again when a later one is interrupted
    except BaseException:
        if file is not None and finished[0]:  # Ctrl-C or an error: keep the batches finished until then
            file.save(so_far())
        raise
    finally:
        bar.close()
    restore = torch.argsort(torch.tensor(order))
    return Predictions(computed.logits[restore], computed.true[restore], computed.induction_sums,
                       computed.seconds)


def content_free_probabilities(
    model, dataset: ICLDataset, demo_pool: Sequence[Example], n: int = 512, k: int = 4, seed: int = 42,
    inputs: Sequence[str] = ("",), batch_size: int = 8, progress: bool = True,
    partial: PartialPredictions | None = None,
) -> Float[Tensor, "n n_labels"]:
    """Label-space probabilities of ``n`` content-free queries (the strings ``inputs`` in turn; StaICC
    uses the empty string, Zhao et al. "N/A", "" and "[MASK]"), each after k real demonstrations
    drawn afresh from ``demo_pool``."""
    if n < 1 or not inputs:
        raise DataError("Calibration needs at least one content-free query and one content-free input.")
    queries = [Example(inputs[i % len(inputs)], 0) for i in range(n)]  # the label is never read
    prompts = build_prompts(model.tokenizer, dataset, queries, k=k, seed=seed, demo_pool=demo_pool,
                            max_length=model.cfg.n_ctx)
    return predict(model, prompts, batch_size, progress=progress, desc="calibrating", partial=partial).probabilities
