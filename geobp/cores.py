"""The CPU cores this process may use: what every thread and process pool of geobp is sized from."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (SLURM's ``--cpus-per-task``, ``taskset``), or all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 2
