"""Worker processes start from a fork server: none inherits a lock another thread held."""

from __future__ import annotations

import os
import threading

import pytest
import torch

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


class _EnvProbe(torch.utils.data.Dataset):
    """Each item: the value of GEOBP_PROBE in the process that reads it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {"probe": torch.tensor(int(os.environ.get("GEOBP_PROBE", "0")))}


def _probe_env() -> str | None:
    return os.environ.get("GEOBP_PROBE")


def test_workers_get_the_environment_set_after_the_fork_server_started(monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    from geobp.data.loader import tile_loader
    from geobp.data.options import LoaderOptions
    from geobp.processes import environment_initializer

    monkeypatch.delenv("GEOBP_PROBE", raising=False)
    ctx = start_context(preload=(__name__,))
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # the fork server runs from here on
        assert pool.submit(_probe_env).result(timeout=120) is None
    monkeypatch.setenv("GEOBP_PROBE", "7")  # as a test or a notebook sets AWS_* before reading
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # the server's environment is the old one
        assert pool.submit(_probe_env).result(timeout=120) is None
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=environment_initializer()) as pool:
        assert pool.submit(_probe_env).result(timeout=120) == "7"
    loader = tile_loader(_EnvProbe(), [0, 1, 2, 3], LoaderOptions(batch_size=2, num_workers=2),  # type: ignore[arg-type]
                         pin_memory=False, drop_last=False)
    assert [b["probe"].tolist() for b in loader] == [[7, 7], [7, 7]]
