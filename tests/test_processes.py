"""Worker processes start from a fork server: none inherits a lock another thread held."""

from __future__ import annotations

import threading

import pytest

from geobp.errors import ConfigError
from geobp.processes import start_context

_HELD = threading.Lock()


def _probe(queue) -> None:
    """Put whether this process can take ``_HELD`` within two seconds."""
    got = _HELD.acquire(timeout=2)
    if got:
        _HELD.release()
    queue.put(got)


@pytest.mark.parametrize("method, free", [("forkserver", True), ("spawn", True), ("fork", False)])
def test_a_lock_held_by_another_thread_is_inherited_only_by_a_forked_worker(method, free):
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:  # another thread of this process holds the lock while the worker starts
        with _HELD:
            holding.set()
            done.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert holding.wait(10)
        ctx = start_context(method, preload=(__name__,))
        queue = ctx.Queue()
        proc = ctx.Process(target=_probe, args=(queue,), daemon=True)
        proc.start()
        # fork: the child's copy of the lock is held by a thread the child does not have
        assert queue.get(timeout=60) is free
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        done.set()
        holder.join(10)


def test_an_unknown_start_method_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown worker start method 'threads'.*forkserver"):
        start_context("threads")  # type: ignore[arg-type]
