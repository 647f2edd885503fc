"""How many readers read the input and decode it: the reader policy of inference (threads or processes).

Reading is bound by decoding the input's compressed blocks, not by normalising them. Each reader
thread has its own file handle, and GDAL's block cache is per handle, so a thread decodes again
the blocks its batches share with another thread's: a few threads, each decoding with several
GDAL threads, read more tiles per second than many single-threaded ones. On the CPU every
reader thread also takes a core from the model. Reader processes
(:class:`~geobp.inference.procreader.ProcessReader`) do not share the GIL, so on a GPU, where
the model needs one core, there is one per core left, each decoding on its own core.
BENCHMARKS.md ("reading alone" in the inference section, and section 3b) holds the measurements
behind these defaults and the commands that made them.
"""

from __future__ import annotations

import torch

from geobp.cores import usable_cores


def default_workers(device: str | torch.device) -> int:
    """Reader threads when none are given: a quarter of the usable cores (1 to 8) on the CPU,
    where the model needs the others; on a GPU a quarter of the usable cores but two (2 to 8),
    each decoding with several GDAL threads (:func:`decode_threads`)."""
    cores = usable_cores()
    if torch.device(device).type == "cuda":
        return max(2, min(8, (cores - 2) // 4))
    return max(1, min(8, cores // 4))


def decode_threads(device: str | torch.device, readers: int) -> int:
    """GDAL decoding threads per reader thread (``GDAL_NUM_THREADS``): on a GPU the cores left
    after the model's thread and the writer, shared by the readers; 1 on the CPU (the model
    needs the cores)."""
    if torch.device(device).type != "cuda":
        return 1
    return max(1, (usable_cores() - 2) // max(1, readers))


def default_processes(device: str | torch.device) -> int:
    """Reader processes when none are given: on the CPU a quarter of the usable cores (1 to 8), as
    for threads, since the model needs the others; on a GPU every usable core but two (the
    model's thread and the writer's), at least 1 and at most 32, each decoding on one core."""
    cores = usable_cores()
    if torch.device(device).type == "cuda":
        return max(1, min(32, cores - 2))
    return max(1, min(8, cores // 4))
