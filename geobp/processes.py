"""How geobp starts worker processes: from a fork server by default, never forked from a busy process.

A process forked while another of its threads holds a lock (GDAL's block cache or ``/vsicurl/``
cache, a progress bar's refresh thread, torch's thread pool, a logging handler) starts with that
lock held and nobody to release it: the child waits forever at its first use. geobp's processes
run such threads by the time they start DataLoader workers or reader processes, so they start
them from a fork server (one clean, single-threaded process started once, which forks each
worker; the default start method from Python 3.14 on) or, where there is none, by spawning.

A worker forked by the fork server has the server's environment, that of the moment the server
started: variables this process set since (``AWS_*``, ``GDAL_*`` set from Python, as tests and
notebooks do) would be missing. Each pool therefore hands its workers this process's environment
as it is when the pool starts (:func:`environment_initializer`).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, get_args

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


def set_environment(env: dict[str, str], *_: Any) -> None:
    """Make this process's environment exactly ``env`` (in a worker, before it reads anything)."""
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)


def environment_initializer() -> Callable[..., None]:
    """A picklable worker initializer (a DataLoader's ``worker_init_fn``, a pool's ``initializer``)
    that gives the worker this process's environment as it is now."""
    return partial(set_environment, dict(os.environ))
