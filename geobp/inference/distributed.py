"""Inference on several processes (GPUs, nodes): who predicts what, and how results come together.

The processes are started and connected by Lightning Fabric (``geobp infer --devices N
--num-nodes M``: DDP under ``srun``, ``torchrun`` or its own launcher); this module only needs
their rank, their number, and a way to exchange small Python objects (:class:`Ranks`).

Work is split as follows (:func:`plan`):

- at least as many rasters as processes: whole rasters, the largest first, each to the
  process with the fewest pixels so far (:func:`assign_whole`);
- fewer rasters than processes: each raster in turn is cut into shares of tile rows, one per
  process (:mod:`geobp.inference.parts`), and rank 0 writes the outputs from the parts.

Either way the files are the ones a single process writes, byte for byte (on the same kind of
device: a GPU does not compute the same floats as a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from geobp.raster import open_raster


@dataclass(frozen=True)
class Ranks:
    """This process's place among the inference processes.

    Attributes:
        rank: global rank (0 writes assembled outputs and prints the summary).
        world: number of processes.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The ranks of the initialized default process group, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def raster_pixels(path: str | Path) -> int:
    """Pixels of a raster, for balancing; 0 when it cannot be opened (its failure is reported later)."""
    try:
        with open_raster(path) as ds:  # geobp's opener: URLs with the remote-read options
            return ds.width * ds.height
    except Exception:  # noqa: BLE001 - unreadable inputs are reported by the process that predicts them
        return 0


def assign_whole(sizes: list[int], world: int) -> list[int]:
    """Rank for each raster: largest first, each to the least-loaded rank (lowest rank on ties).

    Deterministic, so every process computes the same plan without talking to the others.
    """
    load = [0] * world
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += max(sizes[index], 1)
    return owner


def plan(rasters: list[str | Path], world: int) -> list[int] | None:
    """Owner rank of each raster, or None when there are fewer rasters than processes (split each)."""
    if len(rasters) < world:
        return None
    return assign_whole([raster_pixels(p) for p in rasters], world)


def release_cuda_memory(err: BaseException) -> None:
    """Free cached CUDA memory after an out-of-memory error, so the next raster can run."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
