"""Data-parallel glue on ``torch.distributed`` for jobs launched with ``torchrun``.

``torchrun --nproc-per-node N -m abft_lens find-heads ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. Each job wraps its work in
``process_group()``, takes its share of the prompts with ``shard_batches``, and merges its
``HeadStatistics`` with ``all_reduce_head_statistics``: the statistics are running sums, so one
float64 all-reduce gives every rank the totals of the whole probe set. Fine-tuning does the same
with each pseudo-batch's micro-batches, then ``all_reduce_gradients`` (DDP's gradient sum, by hand
after accumulation: only W_Q/W_K have gradients) and ``all_reduce_sums`` (the step's metric sums,
which the PID controller reads) before the optimiser step, so every rank takes the same step. Only
rank 0 writes files and prints (``is_main_process``).

Without ``torchrun`` (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every function here is the
single-process identity, so the same code path serves both.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import TypeVar

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from abft_lens.heads import HeadStatistics

SumsT = TypeVar("SumsT")

TIMEOUT_ENV = "ABFT_LENS_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT_S = 1800


def launched_distributed() -> bool:
    """Whether this process was started by ``torchrun`` with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank: from the process group, else from torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return get_rank() == 0


def default_backend() -> str:
    """nccl on CUDA, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def collective_device() -> torch.device:
    """Where tensors handed to a collective must live for the current backend."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def process_group(backend: str | None = None, timeout_s: float | None = None) -> Iterator[None]:
    """Join torchrun's process group for the duration of the block, and leave it afterwards.

    A no-op when not launched by torchrun, or when the caller already initialised a group (which
    the caller then also tears down). With nccl each rank uses ``cuda:LOCAL_RANK``.
    ``timeout_s`` (default ``$ABFT_LENS_DIST_TIMEOUT`` or 1800) bounds how long a collective waits
    for a rank that never arrives; torchrun itself stops the other ranks as soon as one exits with
    an error, so a failing rank ends the job without waiting for the timeout. On success every
    rank waits at a barrier before leaving the group, so no rank exits while another still works.
    """
    if not launched_distributed() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    seconds = timeout_s if timeout_s is not None else float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    try:
        yield
        # Leave together: a rank that tore gloo down while rank 0 was still writing the run folder
        # aborted now and then at exit ("terminate called without an active exception", SIGABRT).
        # Only on success: a rank that raised must not wait here for ranks that never come.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_batches(n_items: int, batch_size: int, rank: int | None = None,
                  world_size: int | None = None) -> list[int]:
    """This rank's share of ``range(n_items)``, in whole batches: batch ``b`` (items
    ``b*batch_size .. (b+1)*batch_size-1``) goes to rank ``b % world_size``.

    Sharding by batch rather than by item keeps every batch exactly the one a single process forms
    (same prompts, same padding), so each batch's attention is bitwise the single-process one and
    the merged sums differ from it only by float64 summation order. Chunking the returned list by
    ``batch_size`` gives back those batches (only the globally last batch can be short, and it is
    last in its rank's list)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    n_batches = -(-n_items // batch_size)
    return [i for b in range(rank, n_batches, world_size)
            for i in range(b * batch_size, min((b + 1) * batch_size, n_items))]


_SUM_FIELDS = tuple(f.name for f in fields(HeadStatistics) if f.name not in ("n_prompts", "uniform_mass", "threshold"))


def pack_head_statistics(stats: HeadStatistics) -> Float[Tensor, "values"]:
    """Every running sum of ``stats`` in one float64 vector (the per-head tensors, then
    n_prompts, uniform_mass and threshold), ready for a single all-reduce."""
    tensors = [getattr(stats, name).detach().to("cpu", torch.float64).reshape(-1) for name in _SUM_FIELDS]
    scalars = torch.tensor([stats.n_prompts, stats.uniform_mass, stats.threshold], dtype=torch.float64)
    return torch.cat([*tensors, scalars])


def unpack_head_statistics(values: Float[Tensor, "values"], like: HeadStatistics) -> HeadStatistics:
    values = values.to("cpu", torch.float64)
    shape = like.label_mass.shape
    size = like.label_mass.numel()
    sums = {name: values[i * size:(i + 1) * size].reshape(shape).clone() for i, name in enumerate(_SUM_FIELDS)}
    n_prompts, uniform_mass, threshold = values[len(_SUM_FIELDS) * size:].tolist()
    return HeadStatistics(int(round(n_prompts)), **sums, uniform_mass=uniform_mass, threshold=threshold)


def all_reduce_head_statistics(stats: HeadStatistics) -> HeadStatistics:
    """The statistics summed over all ranks (every rank gets the totals). The identity in a single
    process. Counts travel as float64, exact up to 2**53 prompts."""
    if not is_distributed():
        return stats
    values = pack_head_statistics(stats).to(collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return unpack_head_statistics(values, stats)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """DDP's gradient step, done by hand after gradient accumulation: every rank's ``.grad`` becomes
    the sum over ranks (one flat float32 all-reduce per dtype). Callers weight each micro-batch by its
    share of the *global* pseudo-batch, so the sum is the single-process gradient. A rank that saw no
    prompt contributes zeros. The identity in a single process."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    device = collective_device()
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1).to(device) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def all_reduce_sums(sums: SumsT) -> SumsT:
    """A dataclass of running sums (ints and floats, such as a training step's metric sums) summed
    over ranks, in float64; int fields stay ints. The identity in a single process."""
    if not is_distributed():
        return sums
    names = [f.name for f in fields(sums)]
    values = torch.tensor([float(getattr(sums, name)) for name in names], dtype=torch.float64,
                          device=collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    totals = {name: (int(round(v)) if isinstance(getattr(sums, name), int) else v)
              for name, v in zip(names, values.tolist(), strict=True)}
    return dataclasses.replace(sums, **totals)
