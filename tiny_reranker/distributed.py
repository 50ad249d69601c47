"""Sharded scoring under torchrun: each rank scores its share of the rows, rank 0 gathers them in input order.

    torchrun --nproc_per_node 4 eval.py ...      (or NPROC=4 bash scripts/run_eval.sh)

Rank ``r`` of ``W`` takes rows ``r, r + W, r + 2W, ...`` (strided, so a file sorted by query or
category still gives every rank a similar mix of lengths; accelerate's ``split_between_processes``
hands out contiguous blocks, which is why it is not used) and scores them with the normal
path. :meth:`Shard.gather` brings the results to rank 0 and puts every row back in its place.
In one process (no torchrun) the shard is rank 0 of 1: all rows, nothing started or sent.

Only results travel between ranks, as CPU arrays, so the process group is gloo even on GPUs;
each rank runs its model on its own GPU (``cuda:LOCAL_RANK``). Training's processes are the
Trainer's (accelerate's); they only ask :func:`world_size` here.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

# Ranks wait in the gather for the slowest one; shards are balanced, so this only guards against a hang.
GATHER_TIMEOUT = timedelta(hours=2)


def shard_rows(n: int, rank: int, world_size: int) -> np.ndarray:
    """The row indices rank ``rank`` of ``world_size`` scores: ``rank, rank + world_size, ...`` (< n)."""
    return np.arange(rank, n, world_size)


def unshard(parts: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Rank-ordered results of :func:`shard_rows` shards back in input order: ``[n, ...]``."""
    world_size = len(parts)
    out = np.empty((n, *np.shape(parts[0])[1:]), dtype=np.result_type(*parts))
    for rank, part in enumerate(parts):
        expected = len(shard_rows(n, rank, world_size))
        if len(part) != expected:
            raise RuntimeError(f"rank {rank} returned {len(part)} rows, expected {expected} of {n}")
        out[rank::world_size] = part
    return out


@dataclass(frozen=True)
class Shard:
    """This process's place: rank ``rank`` of ``world_size``; ``device`` None means the default device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints summaries, computes metrics and writes files."""
        return self.rank == 0

    def take(self, values: Sequence) -> list:
        """This rank's share of ``values`` (all of them in one process)."""
        return [values[i] for i in shard_rows(len(values), self.rank, self.world_size)]

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (a small picklable object)."""
        return _broadcast(value, self.world_size)

    def gather(self, part: np.ndarray, n: int) -> np.ndarray | None:
        """Every rank's ``part`` (its rows of :meth:`take`), in input order, on rank 0; None on the others."""
        if self.world_size == 1:
            return part
        parts = [None] * self.world_size if self.is_main else None
        dist.gather_object(np.asarray(part), parts, dst=0)
        return unshard(parts, n) if self.is_main else None


def _broadcast(value, world: int):
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def world_size() -> int:
    """How many processes this run has: torchrun's (or any launcher's) ``WORLD_SIZE``, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start() -> Shard:
    """This process's :class:`Shard`: from torchrun's environment (starting a gloo group), else rank 0 of 1."""
    if world_size() <= 1:
        return Shard()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a caller that started its own group keeps it
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
        atexit.register(dist.destroy_process_group)
    return Shard(dist.get_rank(), dist.get_world_size(), device)
