"""An interrupted evaluation's finished batches, so that running it again goes on where it stopped.

An evaluation of a fine-tuned SmolLM2 with the ICL tests is about 4,000 forwards: 20 minutes on a fast
CPU, well over an hour on a slow one. ``predict`` saves the predictions of the batches it has finished
(``PREDICTION_SAVE_SECONDS`` apart, when a prompt set is done, and on Ctrl-C or an error) into the output
folder's ``runs.PARTIAL_PREDICTIONS_DIR``; the same evaluation run again loads them and computes only
the rest. The batches are cut as before (``PromptSet.by_length`` order, saves fall on batch boundaries),
so the resumed predictions are the ones an uninterrupted run gives. ``run_evaluation`` removes the folder
once the results are written.

A saved set is reused only where its file name matches: a digest of the model's weights, the caller's
context (``run_evaluation``: ``numerics_context``: precision, weight dtype, device and its name, the
precision choice, the float32 matmul setting, the CPU's instruction set and thread count, package versions
and ``code_digest``), the batch size, whether attention is collected, and every prompt's tokens and
labels. A changed model, another data set, seed, precision, machine or code finds no file and starts
afresh; batches that match are the same computation, so ``--overwrite`` (which replaces the results)
reads them back too. Not in the digest: forward hooks a caller attaches, and buffers that are not
parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from abft_lens.evaluation.outputs import Predictions
from abft_lens.prompts import PromptSet
from abft_lens.runs import atomic_write_bytes, package_versions

log = logging.getLogger("abft_lens.evaluate")

PREDICTION_SAVE_SECONDS = 60.0  # at most this much of a prompt set's work is lost on an interruption
_SUMS = "induction_sums."


def weights_digest(model) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes: once per evaluation, in time linear in the
    model's size (0.5 s for SmolLM2-135M on 2 CPU cores)."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(f"{name} {parameter.dtype} {tuple(parameter.shape)}".encode())
        digest.update(parameter.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _sources_digest() -> str:
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# Taken when abft_lens is imported, so that it describes the code that runs, not the files on disk when a
# long job reaches its evaluation (a commit to the checkout in between would otherwise be credited with
# batches the old code computed). Any edit of a source file counts, a docstring's too: it only costs a resume.
CODE_DIGEST = _sources_digest()


def code_digest() -> str:
    """SHA-256 of this package's Python sources as they were when it was imported: batches saved by other
    code (an editable install keeps its version string across edits) are not mixed with these."""
    return CODE_DIGEST


def numerics_context(precision: str, weight_dtype: str, device: torch.device, precision_reason: str) -> str:
    """What decides an evaluation's numbers besides the weights and prompts, as one string: precision,
    weight dtype, device (and a GPU's name), the precision choice (native or emulated bf16), the float32
    matmul setting (TF32 on a GPU), the CPU's instruction set and thread count (float32 sums differ in the
    last digits between them), the packages' versions and abft_lens's code."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return json.dumps([precision, weight_dtype, str(device), device_name, precision_reason,
                       torch.get_float32_matmul_precision(), torch.backends.cpu.get_cpu_capability(),
                       torch.get_num_threads(), package_versions(), code_digest()])


def prompt_set_digest(prompts: PromptSet) -> str:
    """SHA-256 of what a prediction depends on in a prompt set: every prompt's tokens, label positions
    and labels, the label tokens and the padding token."""
    digest = hashlib.sha256(repr((prompts.label_token_ids, prompts.pad_token_id)).encode())
    for prompt in prompts.prompts:
        digest.update(repr((prompt.tokens, prompt.label_positions, prompt.demo_labels, prompt.query_label)).encode())
    return digest.hexdigest()


def predictions_bytes(predictions: Predictions) -> bytes:
    """``predictions`` as a safetensors file's bytes (the induction sums under their own key prefix)."""
    tensors = {"logits": predictions.logits.contiguous(), "true": predictions.true.contiguous()}
    tensors.update({_SUMS + key: value.contiguous() for key, value in (predictions.induction_sums or {}).items()})
    return save(tensors, metadata={"seconds": repr(predictions.seconds)})


def read_predictions(path: Path) -> Predictions:
    """The predictions ``predictions_bytes`` wrote to ``path``."""
    with safe_open(path, framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        seconds = float((file.metadata() or {}).get("seconds", 0.0))
    sums = {key.removeprefix(_SUMS): value for key, value in tensors.items() if key.startswith(_SUMS)}
    return Predictions(tensors["logits"], tensors["true"], sums or None, seconds)


@dataclass
class PredictionFile:
    """Where one prompt set's finished batches are kept; ``save_if_due`` writes at most every
    ``every_seconds``."""

    path: Path
    every_seconds: float = PREDICTION_SAVE_SECONDS
    last_saved: float = field(default_factory=time.monotonic)

    def load(self, n_prompts: int, batch_size: int) -> Predictions | None:
        """The saved predictions, or None where there are none or they cannot be resumed from (an
        unreadable file, or a count that is not whole batches of this set)."""
        if not self.path.is_file():
            return None
        try:
            saved = read_predictions(self.path)
        except (SafetensorError, KeyError, ValueError, OSError) as error:
            log.warning("ignoring unreadable saved predictions %s (%s)", self.path, error)
            return None
        done = len(saved.true)
        if len(saved.logits) != done or done > n_prompts or (done % batch_size and done != n_prompts):
            log.warning("ignoring saved predictions %s: %d prompts do not resume a set of %d in batches of %d",
                        self.path, done, n_prompts, batch_size)
            return None
        log.info("resuming from %s: %d of %d prompts already predicted", self.path, done, n_prompts)
        return saved

    def save(self, saved: Predictions) -> None:
        atomic_write_bytes(self.path, predictions_bytes(saved))
        self.last_saved = time.monotonic()

    def save_if_due(self, saved: Callable[[], Predictions]) -> None:
        """``saved()`` (built only when a save is due) written if ``every_seconds`` have passed."""
        if time.monotonic() - self.last_saved >= self.every_seconds:
            self.save(saved())


@dataclass
class PartialPredictions:
    """The finished batches of one evaluation's prompt sets, under ``folder``, for one model
    (``weights``: ``weights_digest``) computed in one way (``context``: whatever else decides the numerics,
    ``numerics_context``). ``read_back``: how many prompts ``predict`` took from batches an earlier,
    interrupted run saved, instead of computing them."""

    folder: Path
    weights: str
    context: str
    every_seconds: float = PREDICTION_SAVE_SECONDS
    read_back: int = 0
    earlier: set[Path] = field(default_factory=set)  # files an earlier run left, not yet read back

    @classmethod
    def for_model(cls, folder: Path, model, context: str, every_seconds: float = PREDICTION_SAVE_SECONDS
                  ) -> PartialPredictions:
        folder = Path(folder)
        return cls(folder, weights_digest(model), context, every_seconds, earlier=set(folder.glob("*.safetensors")))

    def file_for(self, prompts: PromptSet, batch_size: int, attention: bool) -> PredictionFile:
        key = hashlib.sha256(repr((self.weights, self.context, batch_size, attention,
                                   prompt_set_digest(prompts))).encode()).hexdigest()
        return PredictionFile(self.folder / f"{key[:32]}.safetensors", self.every_seconds)

    def count_read_back(self, file: PredictionFile, n_prompts: int) -> None:
        """Count ``n_prompts`` read back from ``file`` if an earlier run saved it (once per file): not a
        set this evaluation saved itself, and read again (e.g. robustness's first template, which can be
        the test set)."""
        if file.path in self.earlier:
            self.earlier.discard(file.path)
            self.read_back += n_prompts

    def discard(self) -> None:
        """Remove the folder (the evaluation's results are written)."""
        try:
            shutil.rmtree(self.folder)
        except FileNotFoundError:
            pass
        except OSError as error:  # untidy, not wrong: a later run reads back only batches of its own key
            log.warning("could not remove the saved batches %s (%s)", self.folder, error)
