"""How geobp starts worker processes: from a fork server by default, never forked from a busy process.

A process forked while another of its threads holds a lock (GDAL's block cache or ``/vsicurl/``
cache, a progress bar's refresh thread, torch's thread pool, a logging handler) starts with that
lock held and nobody to release it: the child waits forever at its first use. geobp's processes
run such threads by the time they start DataLoader workers or reader processes, so they start
them from a fork server (one clean, single-threaded process started once, which forks each
worker; the default start method from Python 3.14 on) or, where there is none, by spawning.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from typing import Literal, get_args

from geobp.errors import ConfigError, format_error

StartMethod = Literal["forkserver", "spawn", "fork"]

#: modules the fork server imports once, so its workers start without importing them again
_PRELOAD: list[str] = ["__main__"]


def start_context(method: StartMethod = "forkserver", preload: tuple[str, ...] = ()) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for ``method`` (forkserver falls back to spawn where the
    platform has none), with ``preload`` added to what the fork server imports when it starts
    (no effect once it runs: its workers then import those modules when they unpickle their work).

    Raises:
        ConfigError: ``method`` is not one of forkserver, spawn, fork.
    """
    if method not in get_args(StartMethod):
        raise ConfigError(format_error(None, f"unknown worker start method {method!r}",
                                       "use one of forkserver (the default), spawn, fork"))
    available = multiprocessing.get_all_start_methods()
    if method == "forkserver" and "forkserver" not in available:
        method = "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        for name in preload:
            if name not in _PRELOAD:
                _PRELOAD.append(name)
        ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx
