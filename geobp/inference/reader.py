"""Input side of inference: a prefetching tile reader over a :class:`~geobp.tiling.TileGrid`.

Tiles of one batch that lie side by side in the same tile row are read as one window and
preprocessed once, so overlapping columns are neither read nor normalised twice within a batch.
Batches are read and preprocessed in background threads (each with its own rasterio handle:
handles are not thread-safe) while the model works on earlier batches; they come out in order.
:func:`fill_batch` is the read itself, shared with the process reader
(:class:`~geobp.inference.procreader.ProcessReader`, the same batches from worker processes).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from geobp.data.preprocessing import Preprocessing
from geobp.raster import open_reader, read_window
from geobp.tiling import Tile, TileGrid


def fill_batch(
    src: rasterio.DatasetReader, grid: TileGrid, tiles: list[Tile], pre: Preprocessing, image: np.ndarray,
    valid: np.ndarray | None,
) -> None:
    """Read and preprocess the tiles of one batch into ``image`` and ``valid`` (what every reader runs).

    Tiles that lie side by side in the same tile row are read as one window and normalised once.
    With ``valid`` None, ``image`` (in the input's dtype, :func:`raw_dtype`) gets the raw pixels
    instead, to be normalised on the model's device (:meth:`TileBatch.on_device`).

    Args:
        src: open handle of the input.
        grid: the tile grid.
        tiles: (row, column) of each tile, in grid order within a tile row.
        pre: the preprocessing (bands, nodata, normalisation).
        image: float32 [>= len(tiles), C, tile, tile], written: normalised tiles, padded by
            reflection where the raster is smaller than a tile; raw tiles when ``valid`` is None.
        valid: bool [>= len(tiles), tile_h, tile_w], written: False at nodata pixels; or None.

    Raises:
        RasterReadError: a block failed to decode (the message names the file and window).
    """
    g = grid
    th, tw, t = g.tile_h, g.tile_w, g.tile
    pad = ((0, 0), (0, t - th), (0, t - tw))
    k = 0
    while k < len(tiles):
        # a run: consecutive tiles of the same tile row, read as one window
        end = k + 1
        while end < len(tiles) and tiles[end][0] == tiles[k][0]:
            end += 1
        i = tiles[k][0]
        c0 = g.col_offsets[tiles[k][1]]
        c1 = g.col_offsets[tiles[end - 1][1]] + tw
        raw = read_window(src, Window(c0, g.row_offsets[i], c1 - c0, th), indexes=pre.bands)
        x, v = pre(raw) if valid is not None else (raw, None)
        for n in range(k, end):
            c = g.col_offsets[tiles[n][1]] - c0
            if th < t or tw < t:
                image[n] = np.pad(x[:, :, c : c + tw], pad, mode="reflect")
            else:
                image[n] = x[:, :, c : c + tw]
            if valid is not None and v is not None:
                valid[n] = v[:, c : c + tw]
        k = end


def raw_dtype(dtype: str) -> torch.dtype:
    """The torch dtype that carries raw pixels of numpy ``dtype`` (e.g. uint16) to the device.

    Raises:
        TypeError: torch has no such dtype: normalise in the reader instead.
    """
    return torch.from_numpy(np.empty(0, np.dtype(dtype))).dtype


@dataclass
class TileBatch:
    """One batch of model input and the validity of its pixels.

    Attributes:
        tiles: (row index, column index) of each tile.
        image: float32 [B, C, tile, tile] normalised input, padded by reflection where the
            raster is smaller than a tile.
        valid: bool [B, tile_h, tile_w], False at the input's nodata pixels.

    Both tensors are in pinned memory when the reader was asked to pin (for CUDA), so that
    copies to the device do not wait for the GPU. A reader asked for raw tiles gives ``image`` in
    the input's dtype, not normalised, and ``valid`` None: :meth:`on_device` finishes them.
    """

    tiles: list[Tile]
    image: torch.Tensor
    valid: torch.Tensor | None

    def on_device(self, device: torch.device, pre: Preprocessing, tile_h: int, tile_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float32 image on ``device``, valid [B, tile_h, tile_w]); raw tiles are
        normalised on the device (:meth:`Preprocessing.normalize_tensor`: the same float32 values;
        the padding of tiles larger than the raster is cut from their validity)."""
        image = self.image.to(device, non_blocking=True)
        if self.valid is not None:
            return image, self.valid
        image, valid = pre.normalize_tensor(image)
        return image, valid[:, :tile_h, :tile_w]


def stripe_of(grid: TileGrid, tiles: list[Tile], workers: int) -> int:
    """The worker whose stripe of columns (``workers`` equal stripes of the raster) holds the middle of ``tiles``."""
    if not tiles or workers <= 1:
        return 0
    middle = sum(grid.col_offsets[j] for _, j in tiles) / len(tiles) + grid.tile_w / 2
    return min(workers - 1, int(middle * workers / max(1, grid.width)))


def pick_worker(home: int, load: list[int]) -> int:
    """The worker for the next batch: its ``home`` (the stripe of columns it reads, whose decoded
    blocks its file handle keeps for the next tile row), unless it has two reads more waiting than
    the least busy worker, which then takes the batch (decoding those blocks again) so that no
    worker idles. ``load``: reads waiting per worker."""
    least = min(range(len(load)), key=load.__getitem__)
    return home if load[home] < load[least] + 2 else least


class PrefetchReader:
    """Reads and preprocesses batches in ``num_workers`` background threads, yielding them in order.

    With ``raw`` (the torch dtype of the input's pixels, :func:`raw_dtype`) the batches hold the
    raw tiles, for the model's device to normalise.

    At most ``prefetch`` batches (``num_workers + 2`` by default) are read ahead; each thread's
    handle decodes the blocks of a read with ``decode_threads`` GDAL threads. Each thread reads
    the batches of its own stripe of columns (:func:`pick_worker`), so that the blocks a tile row
    shares with the next are found in the same handle's cache. Use as a context manager (or call
    :meth:`close`) so that the threads stop and the file handles are closed.
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
        raw: torch.dtype | None = None,
    ) -> None:
        self.path = str(path)
        self.raw = raw
        # GDAL threads decoding the blocks of one read, per handle (the GeoTIFF open option
        # NUM_THREADS: it applies to these handles only, not to the outputs being written)
        self.open_options = {"NUM_THREADS": str(decode_threads)} if decode_threads > 1 else {}
        self.grid = grid
        self.batches = batches
        self.pre = preprocessing
        self.num_workers = max(1, num_workers)
        self.prefetch = prefetch or self.num_workers + 2
        self.pin_memory = pin_memory
        self._local = threading.local()
        self._handles: list[rasterio.DatasetReader] = []
        self._lock = threading.Lock()
        # one thread (and handle) per stripe of columns: a handle keeps the blocks it decoded, and
        # the next tile row's batch in the same stripe needs them again (see pick_worker)
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"geobp-read-{w}") for w in range(self.num_workers)]
        self._homes = [stripe_of(grid, tiles, self.num_workers) for tiles in batches]

    def _handle(self) -> rasterio.DatasetReader:
        src = getattr(self._local, "src", None)
        if src is None:
            src = open_reader(self.path, **self.open_options)
            self._local.src = src
            with self._lock:
                self._handles.append(src)
        return src

    def read(self, tiles: list[Tile]) -> TileBatch:
        """Read and preprocess one batch (runs in a worker thread, or anywhere for tests)."""
        g = self.grid
        # allocated pinned (for CUDA) up front and filled through numpy views: no extra copy
        image_t = torch.empty((len(tiles), len(self.pre.bands), g.tile, g.tile), dtype=self.raw or torch.float32,
                              pin_memory=self.pin_memory)
        if self.raw is not None:  # raw pixels: normalised on the device (TileBatch.on_device)
            fill_batch(self._handle(), g, tiles, self.pre, image_t.numpy(), None)
            return TileBatch(tiles, image_t, None)
        valid_t = torch.empty((len(tiles), g.tile_h, g.tile_w), dtype=torch.bool, pin_memory=self.pin_memory)
        fill_batch(self._handle(), g, tiles, self.pre, image_t.numpy(), valid_t.numpy())
        return TileBatch(tiles, image_t, valid_t)

    def __iter__(self) -> Iterator[TileBatch]:
        queue: deque[tuple[int, Future[TileBatch]]] = deque()  # (worker, its read), in batch order
        load = [0] * len(self._pools)

        def submit(n: int) -> None:
            w = pick_worker(self._homes[n], load)
            load[w] += 1
            queue.append((w, self._pools[w].submit(self.read, self.batches[n])))

        sent = 0
        try:
            while sent < min(self.prefetch, len(self.batches)):
                submit(sent)
                sent += 1
            while queue:
                w, fut = queue.popleft()
                batch = fut.result()
                load[w] -= 1
                if sent < len(self.batches):
                    submit(sent)
                    sent += 1
                yield batch
        finally:
            for _, fut in queue:
                fut.cancel()

    def close(self) -> None:
        """Stop the threads (waiting for reads in progress) and close every handle."""
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for src in self._handles:
                src.close()
            self._handles.clear()

    def __enter__(self) -> PrefetchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
