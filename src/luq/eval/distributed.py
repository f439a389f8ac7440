"""Data-parallel evaluation: every process takes its share of the batches, results are gathered.

Start it with accelerate (or torchrun) and nothing else changes::

    accelerate launch --multi_gpu --num_processes 4 -m luq.cli eval MODEL --task mme --device cuda
    accelerate launch --multi_gpu --num_processes 2 -m luq.cli eval MODEL --task mme   # CPUs, gloo
    torchrun --nproc_per_node 2 -m luq.cli eval MODEL --task mme                       # the same

(on a machine without GPUs ``--multi_gpu`` still starts the processes the torchrun way;
``accelerate launch --cpu --num_processes N`` instead expects ``mpirun`` and, without it,
starts one process). The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) is read by accelerate's ``PartialState``, which opens the process group:
gloo when the evaluation device is the CPU, NCCL (or the accelerator's own) otherwise.
Work is split in whole batches, batch ``b`` to process ``b % world_size``: a batch is
computed the same way whatever the number of processes (same samples, same padding, same
shapes), so scores do not depend on how many processes ran them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the evaluating processes (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | torch.device) -> torch.device:
        """The device this process uses: an unindexed accelerator becomes this process's own
        ("cuda" -> "cuda:LOCAL_RANK" when several processes share a machine)."""
        device = torch.device(requested)
        if device.type != "cpu" and device.index is None and self.world_size > 1:
            return torch.device(device.type, self.local_rank)
        return device

    def my_batches(self, n_batches: int) -> list[int]:
        """The indices of the batches this process computes."""
        return list(range(self.rank, n_batches, self.world_size))

    def gather(self, local: list[Any]) -> list[Any]:
        """Every process's ``local`` list, concatenated in rank order, on every process."""
        if self.world_size == 1:
            return list(local)
        parts: list[list[Any] | None] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, local)
        return [item for part in parts for item in part]


def data_parallel_from_env(device: str | torch.device) -> DataParallel:
    """The DataParallel of this process: from the launcher's environment, opening the
    process group through accelerate when more than one process runs (gloo when ``device``
    is the CPU); rank 0 of 1 otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DataParallel()
    from accelerate import PartialState

    # reads the launcher's variables and opens the process group (once per process)
    state = PartialState(cpu=torch.device(device).type == "cpu")
    return DataParallel(rank=state.process_index, world_size=state.num_processes,
                        local_rank=state.local_process_index)


def batched(items: Sequence[T], batch_size: int) -> list[list[T]]:
    """``items`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def run_sharded(batches: Sequence[T], compute, parallel: DataParallel) -> list[Any]:
    """``compute(batch)`` (a list, one result per item) over this process's batches, then the
    results of all processes gathered back into batch order: one list, one result per item."""
    local = [(index, compute(batches[index])) for index in parallel.my_batches(len(batches))]
    by_batch = dict(parallel.gather(local))
    return [result for index in range(len(batches)) for result in by_batch[index]]
