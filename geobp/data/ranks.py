"""Start-up work shared by the processes of a node: one computes a cache file, the others wait for it.

LightningCLI builds the data module in every process, before Lightning sets up DDP, so the
processes cannot all-reduce yet; they share through the cache on disk instead. The process's
place on its node comes from the launcher's environment (``LOCAL_RANK`` from Lightning and
torchrun, ``SLURM_LOCALID`` under srun).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: Seconds a process waits for another's cache file before computing it itself.
WAIT_SECONDS = 3600.0


def local_rank() -> int:
    """This process's rank on its node (0 when not launched as one of several)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def local_world_size() -> int:
    """Processes on this node (1 when not launched as one of several)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return max(1, int(value))
    return 1


def _writable(folder: Path) -> bool:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def computed_once(cache_file: Path, load: Callable[[], T | None], compute: Callable[[], T], owner: bool,
                  wait_seconds: float = WAIT_SECONDS, poll: float = 0.5) -> T:
    """``load()`` when the cache exists; else ``compute()`` (which writes ``cache_file``) in the
    owner process, while the others poll for the file and load it.

    A process that is not the owner computes itself when the cache folder cannot be written (the
    owner could not share), or after ``wait_seconds`` (with a warning).
    """
    found = load() if cache_file.exists() else None
    if found is not None:
        return found
    if owner or not _writable(cache_file.parent):
        return compute()
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if cache_file.exists():
            found = load()
            if found is not None:
                return found
        time.sleep(poll)
    warnings.warn(f"{cache_file}: waited {wait_seconds:.0f} s for another process to write it; computing it here",
                  RuntimeWarning, stacklevel=2)
    return compute()
