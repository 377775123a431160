"""Data-parallel runs under torchrun: one contiguous shard of batches per process, results gathered on rank 0.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) lipcert joins the process group (NCCL
on GPUs, gloo on CPUs); each process certifies and attacks its shard, and rank 0 merges the per-sample
results in dataset order and writes the one report. Everything random is seeded per batch, so the merged
report equals a single-process run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class World:
    """This process's place in the run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The world torchrun describes in the environment (a single process when there is none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def joined(world: World, device: str) -> Iterator[str]:
    """This process's device (cuda:LOCAL_RANK on GPUs), in the process group for the duration: joined (NCCL on
    GPUs, gloo on CPUs) and left here, unless the caller had joined it already."""
    if not world.distributed:
        yield device
        return
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    joining = not dist.is_initialized()
    if joining:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    yield device
    if joining and dist.is_initialized():
        dist.destroy_process_group()


def shard(num_batches: int, world: World) -> tuple[int, int]:
    """This process's contiguous range of batch indices."""
    per, extra = divmod(num_batches, world.size)
    first = world.rank * per + min(world.rank, extra)
    return first, first + per + (1 if world.rank < extra else 0)


def gather(obj: Any, world: World) -> list[Any]:
    """Every process's object, in rank order (on every process)."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's object on every process."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

