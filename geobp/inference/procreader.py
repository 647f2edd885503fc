"""Input side of inference in worker processes: :class:`ProcessReader`, the process twin of
:class:`~geobp.inference.reader.PrefetchReader`.

Reader threads share the GIL for the numpy parts of a read (normalising, padding, copying into
the batch), so they cannot use all the cores of a node. Here each worker process has its own
rasterio handle and runs :func:`~geobp.inference.reader.fill_batch` (the same code as the
threads) into a slot of a ring in shared memory; the parent copies each finished batch out of its
slot into a fresh tensor, frees the slot, and yields the batches in order, at most ``prefetch``
ahead, as the same :class:`~geobp.inference.reader.TileBatch` the threads give.

Choices, and why:

- Start method: ``forkserver`` (``spawn`` where there is none), never ``fork``: the parent runs
  torch, GDAL and writer threads, and a child forked beside them can inherit a held lock and
  hang. The fork server imports this module once (a preload), so that each later worker is a
  fork of it instead of paying an interpreter start and the imports of torch and geobp.
- The ring is one torch shared tensor. With torch's ``file_descriptor`` sharing strategy (the
  default on Linux) its segment is unlinked from ``/dev/shm`` as soon as it is mapped and lives
  on only as open descriptors, so nothing is left behind however the processes end (even
  ``kill -9``). It reaches the workers as a descriptor passed when they start.
- The parent copies a batch out of its slot (into pinned memory for CUDA, from torch's caching
  host allocator) instead of handing out a view of the slot. The copy costs a memcpy per batch,
  but the yielded tensors then own their memory exactly as the threads' do: a consumer may keep
  them (the writer holds ``valid``), and an asynchronous host-to-device copy from them cannot
  race with a worker refilling the slot, because the caching host allocator only reuses pinned
  blocks once the copies that read them are done. Pinning the slots themselves
  (``cudaHostRegister``) would save the memcpy but needs that bookkeeping here, with CUDA events.
- Each worker has its own GDAL block cache, and a block decoded by one worker is decoded again by
  any other that needs it. A tile row shares its blocks with the next tile row, so each batch goes
  to the worker of the stripe of columns it lies in (``W`` equal stripes for ``W`` workers), whose
  cache still holds the blocks of that stripe from the tile row before; the cache is sized for the
  stripe (:func:`geobp.inference.blockcache.block_cache_bytes`). A worker two reads behind the
  others gives its batch to the least busy one, so that none idles while the batches come in order.
- Errors: a worker sends its exception back (it is raised in the parent when its batch's turn
  comes, so earlier batches still arrive, as with threads), a worker that dies is reported at
  once, and workers ignore SIGINT: on Ctrl-C the parent stops them in :meth:`ProcessReader.close`.
  A worker whose parent is gone exits on its own (its pipe from the parent closes).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.env
import torch
import torch.multiprocessing  # noqa: F401 - registers the reductions that pass shared tensors to children

from geobp.data.preprocessing import Preprocessing
from geobp.errors import GeobpError, ReaderError, SharedMemoryError, format_error
from geobp.inference.blockcache import block_cache_bytes
from geobp.inference.reader import TileBatch, fill_batch, pick_worker, stripe_of
from geobp.processes import set_environment, start_context
from geobp.raster import open_reader
from geobp.tiling import Tile, TileGrid

#: Seconds a worker waits for work before checking that its parent is still alive.
PARENT_POLL_S = 1.0
#: Seconds :meth:`ProcessReader.close` lets the workers finish a read before terminating them.
JOIN_S = 5.0
#: Where shared memory lives (a tmpfs; 64 MiB in a Docker container by default).
SHM_DIR = "/dev/shm"


def shared_memory_free() -> int | None:
    """Bytes free in :data:`SHM_DIR`, or None where there is no such folder (not Linux)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class SlotLayout:
    """Where one batch lies in the shared ring: ``image`` then ``valid``, slots 64-byte aligned.

    Attributes:
        batch: most tiles in one batch.
        bands: input channels.
        tile: model input size.
        tile_h, tile_w: the grid's tile height and width (smaller than ``tile`` for small rasters).
        raw: the numpy dtype of raw tiles (normalised on the model's device; no ``valid``), or
            None for normalised float32 tiles and their ``valid``.
    """

    batch: int
    bands: int
    tile: int
    tile_h: int
    tile_w: int
    raw: str | None = None

    @property
    def image_bytes(self) -> int:
        """Bytes of a full batch's image."""
        itemsize = 4 if self.raw is None else np.dtype(self.raw).itemsize
        return self.batch * self.bands * self.tile * self.tile * itemsize

    @property
    def stride(self) -> int:
        """Bytes from one slot to the next."""
        size = self.image_bytes + (self.batch * self.tile_h * self.tile_w if self.raw is None else 0)
        return -(-size // 64) * 64

    def views(self, ring: np.ndarray, slot: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(image [n, C, tile, tile] float32 or raw, valid [n, tile_h, tile_w] bool or None) of
        ``slot`` in ``ring`` (uint8)."""
        base = slot * self.stride
        dtype = np.float32 if self.raw is None else np.dtype(self.raw)
        image = np.ndarray((n, self.bands, self.tile, self.tile), dtype, buffer=ring, offset=base)
        if self.raw is not None:
            return image, None
        valid = np.ndarray((n, self.tile_h, self.tile_w), np.bool_, buffer=ring, offset=base + self.image_bytes)
        return image, valid


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a RuntimeError with its type and message."""
    if not isinstance(err, GeobpError):  # a bug rather than a bad input: keep where it happened
        err.add_note("in a geobp reader process:\n" + "".join(traceback.format_exception(err)).rstrip())
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any exception that cannot cross the pipe
        return RuntimeError(f"{type(err).__name__}: {err}")


def _serve(
    conn: Connection, path: str, open_options: dict[str, str], env: dict[str, Any], grid: TileGrid,
    pre: Preprocessing, ring: torch.Tensor, layout: SlotLayout, environ: dict[str, str],
) -> None:
    """A worker process: read the batches the parent sends into their slots until told to stop."""
    set_environment(environ)  # the parent's variables now, not the fork server's
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    # the parent's death closes its end of the pipe (EOF below); a changed parent pid (reparented
    # when the parent or the fork server is gone) is checked too, while waiting
    ppid = os.getppid()
    buf = ring.numpy()
    src = None
    try:
        with rasterio.Env(**env):
            while True:
                if not conn.poll(PARENT_POLL_S):
                    if os.getppid() != ppid:
                        return
                    continue
                msg = conn.recv()
                if msg is None:
                    return
                n, slot, tiles = msg
                try:
                    if src is None:
                        src = open_reader(path, **open_options)
                    fill_batch(src, grid, tiles, pre, *layout.views(buf, slot, len(tiles)))
                except Exception as err:  # noqa: BLE001 - raised in the parent
                    conn.send((n, _portable(err)))
                else:
                    conn.send((n, None))
    except (EOFError, OSError):  # the parent closed the pipe: it is stopping
        return
    finally:
        if src is not None:
            src.close()


class ProcessReader:
    """Reads and preprocesses batches in ``num_workers`` processes, yielding them in order.

    The same contract as :class:`~geobp.inference.reader.PrefetchReader` (arguments, in-order
    :class:`~geobp.inference.reader.TileBatch`, errors), with at most ``prefetch`` batches
    (``2 * num_workers`` by default) read ahead into as many shared-memory slots. The workers
    start when the reader is made; use it as a context manager (or call :meth:`close`) so that
    they stop. The GDAL configuration of the active ``rasterio.Env`` (e.g. ``GDAL_CACHEMAX``)
    is applied in every worker; given the input's rasterio ``profile``, each worker's
    ``GDAL_CACHEMAX`` is sized for its stripe of columns (:func:`block_cache_bytes`).
    With ``raw`` (the torch dtype of the input's pixels) the slots and batches hold the raw
    tiles, for the model's device to normalise: half the bytes of float32 for uint16 inputs,
    and no normalising in the workers.
    """

    def __init__(
        self,
        path: str | Path,
        grid: TileGrid,
        batches: list[list[Tile]],
        preprocessing: Preprocessing,
        num_workers: int = 2,
        prefetch: int | None = None,
        pin_memory: bool = False,
        decode_threads: int = 1,
        profile: dict[str, Any] | None = None,
        raw: torch.dtype | None = None,
    ) -> None:
        self.path = str(path)
        self.grid = grid
        self.batches = batches
        self.pre = preprocessing
        # no more workers than batches: each costs a process and a file handle
        self.num_workers = max(1, min(num_workers, len(batches)))
        self.prefetch = max(1, prefetch or 2 * self.num_workers)
        self.pin_memory = pin_memory
        raw_np = None if raw is None else str(torch.empty(0, dtype=raw).numpy().dtype)
        self.layout = SlotLayout(max(map(len, batches), default=1), len(preprocessing.bands), grid.tile,
                                 grid.tile_h, grid.tile_w, raw_np)
        need, free = self.layout.stride * self.prefetch, shared_memory_free()
        if free is not None and need > free:  # a worker writing past the end of a full tmpfs dies of SIGBUS
            raise SharedMemoryError(format_error(
                SHM_DIR, f"too little shared memory for the reader processes (expected {need / 2**20:.0f} MiB free, "
                         f"found {free / 2**20:.0f} MiB)",
                "use --reader threads, a smaller --batch_size or fewer --readers, or give the container more "
                "(e.g. `docker run --shm-size=4g`)"))
        self._ring: torch.Tensor | None = torch.empty(self.layout.stride * self.prefetch, dtype=torch.uint8).share_memory_()
        self._buf: np.ndarray | None = self._ring.numpy()
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._outstanding: dict[int, tuple[int, int]] = {}  # batch index -> (worker, slot), being read
        self._closed = False
        # each batch's worker of choice: the one whose stripe of columns holds the batch's middle
        self._homes = [stripe_of(grid, tiles, self.num_workers) for tiles in batches]
        open_options = {"NUM_THREADS": str(decode_threads)} if decode_threads > 1 else {}
        env = dict(rasterio.env.getenv()) if rasterio.env.hasenv() else {}
        if profile is not None:  # each worker's cache holds the blocks of its stripe of columns
            env["GDAL_CACHEMAX"] = block_cache_bytes(profile, grid.tile_h, columns=1 / self.num_workers,
                                                     readers=self.num_workers)
        ctx = start_context(preload=(__name__,))
        try:
            for w in range(self.num_workers):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_serve, name=f"geobp-read-{w}", daemon=True,
                                   args=(theirs, self.path, open_options, env, grid, preprocessing, self._ring, self.layout,
                                         dict(os.environ)))
                proc.start()
                theirs.close()
                self._conns.append(mine)
                self._procs.append(proc)
        except BaseException:
            self.close()
            raise

    def _receive(self, done: dict[int, tuple[int, BaseException | None]], load: list[int]) -> None:
        """Wait for at least one result (into ``done``: batch index -> (slot, error or None)).

        Raises:
            ReaderError: a worker process died.
        """
        ready = wait([*self._conns, *(p.sentinel for p in self._procs)])
        for conn, proc in zip(self._conns, self._procs):
            dead = proc.sentinel in ready
            if conn in ready or dead:
                while conn.poll():
                    try:
                        n, err = conn.recv()
                    except (EOFError, OSError):  # its process ended: reported through its sentinel
                        break
                    worker, slot = self._outstanding.pop(n)
                    load[worker] -= 1
                    done[n] = (slot, err)
            if dead:
                raise self._died(proc)

    def _died(self, proc: Any) -> ReaderError:
        """The error for a worker process that ended while it had work (``proc`` has ended)."""
        proc.join(JOIN_S)
        code = proc.exitcode
        why = ("it was killed (a signal: often for memory): lower --batch_size or --readers, or use --reader threads"
               if code is not None and code < 0 else
               "see its error above (a script that runs inference needs an `if __name__ == \"__main__\":` "
               "guard, as the worker processes import it), or use --reader threads")
        return ReaderError(format_error(
            self.path, f"reader process {proc.name} stopped unexpectedly (exit code {code})", why))

    def _drain(self) -> None:
        """Wait for the reads of an abandoned iteration, so that their slots are free again."""
        load = [0] * len(self._procs)
        done: dict[int, tuple[int, BaseException | None]] = {}
        while self._outstanding:
            self._receive(done, load)

    def __iter__(self) -> Iterator[TileBatch]:
        if self._closed or self._buf is None:
            raise RuntimeError("the reader is closed")
        self._drain()
        free = list(range(self.prefetch - 1, -1, -1))
        load = [0] * len(self._procs)
        done: dict[int, tuple[int, BaseException | None]] = {}
        sent = 0

        def send() -> None:  # a read for every free slot
            nonlocal sent
            while free and sent < len(self.batches):
                w = pick_worker(self._homes[sent], load)
                slot = free.pop()
                self._outstanding[sent] = (w, slot)
                load[w] += 1
                try:
                    self._conns[w].send((sent, slot, self.batches[sent]))
                except OSError as e:  # a broken pipe: the worker died between two batches
                    del self._outstanding[sent]
                    raise self._died(self._procs[w]) from e
                sent += 1

        send()
        for n, tiles in enumerate(self.batches):
            while n not in done:
                self._receive(done, load)
            slot, err = done.pop(n)
            if err is not None:
                free.append(slot)
                raise err
            batch = self._copy_out(tiles, slot)
            free.append(slot)
            send()  # before the consumer gets the batch: the workers read on while it computes
            yield batch

    def _copy_out(self, tiles: list[Tile], slot: int) -> TileBatch:
        assert self._buf is not None
        image_v, valid_v = self.layout.views(self._buf, slot, len(tiles))
        image = torch.from_numpy(np.empty(0, image_v.dtype)).new_empty(image_v.shape, pin_memory=self.pin_memory)
        # numpy's copy: one thread, where torch's copy_ would wake its intra-op pool, whose
        # spinning threads take the cores from the workers
        np.copyto(image.numpy(), image_v)
        if valid_v is None:  # raw tiles: normalised on the device (TileBatch.on_device)
            return TileBatch(tiles, image, None)
        valid = torch.empty(valid_v.shape, dtype=torch.bool, pin_memory=self.pin_memory)
        np.copyto(valid.numpy(), valid_v)
        return TileBatch(tiles, image, valid)

    def close(self) -> None:
        """Stop the workers (letting reads in progress finish for up to :data:`JOIN_S` seconds,
        then terminating them) and release the shared memory. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, ValueError):  # the worker is gone already
                pass
        deadline = time.monotonic() + JOIN_S
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(JOIN_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
            proc.close()
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()
        self._outstanding.clear()
        self._buf = None
        self._ring = None

    def __enter__(self) -> ProcessReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
