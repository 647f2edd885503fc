"""GDAL's block cache while predicting, and which reader decodes which batch.

A tile row shares block rows with the next one; a block is decoded once only if the handle that
reads the next tile row's batch still has it: the cache is sized from the raster's width and
blocks, and each batch goes to the reader (thread or process) of its stripe of columns.
"""

from __future__ import annotations

import threading

import numpy as np
import rasterio
import torch

from geobp.data.preprocessing import Preprocessing
from geobp.inference import predict as predict_mod
from geobp.inference.blockcache import MAX_CACHE_BYTES, MIN_CACHE_BYTES, block_cache_bytes, block_rows_spanned
from geobp.inference.reader import PrefetchReader, pick_worker, stripe_of
from geobp.tiling import TileGrid
from tests.conftest import write_tif

MiB = 2**20
BIG = 1 << 40  # plenty of memory available


def profile(width: int, block: int | None = 512, count: int = 6, dtype: str = "uint16") -> dict:
    """A rasterio profile: tiled ``block`` x ``block``, or stripped one row per strip when None."""
    if block is None:
        return {"width": width, "count": count, "dtype": dtype, "blockxsize": width, "blockysize": 1}
    return {"width": width, "count": count, "dtype": dtype, "blockxsize": block, "blockysize": block}


def test_block_rows_one_tile_row_spans():
    assert block_rows_spanned(256, 512) == 2  # inside one block row, or across two
    assert block_rows_spanned(512, 512) == 2
    assert block_rows_spanned(513, 512) == 2  # rows r..r+512: two block rows wherever r is
    assert block_rows_spanned(514, 512) == 3
    assert block_rows_spanned(256, 256) == 2
    assert block_rows_spanned(256, 1) == 256  # one row per strip
    assert block_rows_spanned(1, 512) == 1


def test_cache_holds_the_block_rows_a_tile_row_spans():
    block = 512 * 512 * 6 * 2  # one 512 px block of 6 bands uint16
    # 16,384 px wide: 32 blocks across, two block rows per tile row, a quarter more
    assert block_cache_bytes(profile(16384), 256, available=BIG) == int(1.25 * 2 * 32 * block)
    # a narrow raster gets the floor; a tiny memory the floor too, never less
    assert block_cache_bytes(profile(600), 256, available=BIG) == MIN_CACHE_BYTES
    assert block_cache_bytes(profile(16384), 256, available=10 * MiB) == MIN_CACHE_BYTES
    # stripped: the 256 one-row strips of a tile row
    assert block_cache_bytes(profile(16384, None), 256, available=BIG) == int(1.25 * 256 * 16384 * 6 * 2)


def test_cache_of_a_process_with_a_stripe_of_columns_and_the_memory_bound():
    block = 512 * 512 * 6 * 2
    # 4 processes: 8 of the 32 blocks across each, plus a block on each side
    assert block_cache_bytes(profile(16384), 256, columns=1 / 4, readers=4, available=BIG) == int(1.25 * 2 * 10 * block)
    # the caches of all processes together stay within a quarter of the available memory
    avail = 800 * MiB
    got = block_cache_bytes(profile(65536), 256, columns=1 / 4, readers=4, available=avail)
    assert got == int(0.25 * avail / 4)
    assert block_cache_bytes(profile(10**6), 512, available=BIG) == MAX_CACHE_BYTES


def test_stripes_of_columns_and_the_choice_of_worker():
    grid = TileGrid.build(1000, 1000, 100, 0)  # 10 x 10 tiles
    assert [stripe_of(grid, [(0, j)], 2) for j in range(10)] == [0] * 5 + [1] * 5
    assert [stripe_of(grid, [(3, j)], 4) for j in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # by tile middles
    assert stripe_of(grid, [(0, 0), (0, 1), (0, 2), (0, 3)], 2) == 0
    assert stripe_of(grid, [(0, 6), (0, 7), (0, 8), (0, 9)], 2) == 1
    assert stripe_of(grid, [(0, j) for j in range(10)], 1) == 0
    # home while it is at most one read behind the least busy worker, else the least busy
    assert pick_worker(1, [0, 0]) == 1
    assert pick_worker(1, [0, 1]) == 1
    assert pick_worker(1, [0, 2]) == 0
    assert pick_worker(0, [3, 1, 1]) == 1


def test_reader_threads_read_their_stripe_and_give_the_same_batches(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(1, 1000, (3, 64, 256)).astype("uint16")
    src = write_tif(tmp_path / "wide.tif", img, nodata=0)
    pre = Preprocessing(bands=[1, 2, 3], nodata=0, mean=[500.0] * 3, std=[300.0] * 3)
    grid = TileGrid.build(64, 256, 32, 0)  # 2 tile rows of 8 tiles
    batches = grid.batches(2)  # 4 batches per tile row: columns 0-1 and 2-3 in the left half
    with PrefetchReader(src, grid, batches, pre, num_workers=1) as one:
        want = list(one)
    readers: dict[tuple, str] = {}
    original = PrefetchReader.read

    def spy(self, tiles):
        readers[tuple(tiles)] = threading.current_thread().name
        return original(self, tiles)

    reader = PrefetchReader(src, grid, batches, pre, num_workers=2, prefetch=2)
    reader.read = spy.__get__(reader)  # type: ignore[method-assign]
    with reader:
        got = list(reader)
    assert [b.tiles for b in got] == [b.tiles for b in want]
    for a, b in zip(got, want):
        assert np.array_equal(a.image.numpy(), b.image.numpy()) and np.array_equal(a.valid.numpy(), b.valid.numpy())
    # with two reads in flight, no worker falls two behind: every batch is read by its stripe's thread
    for tiles, name in readers.items():
        assert name.startswith(f"geobp-read-{stripe_of(grid, list(tiles), 2)}"), (tiles, name)


def test_predict_sets_the_cache_from_the_raster(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    src = write_tif(tmp_path / "a.tif", rng.integers(1, 1000, (3, 48, 64)).astype("uint16"), nodata=0)
    pre = Preprocessing(bands=[1, 2, 3], nodata=0, mean=[500.0] * 3, std=[300.0] * 3)
    seen: list[int] = []
    original = PrefetchReader.__iter__

    def spy(self):
        seen.append(int(rasterio.env.getenv()["GDAL_CACHEMAX"]))
        return original(self)

    monkeypatch.setattr(PrefetchReader, "__iter__", spy)
    monkeypatch.setattr(predict_mod, "block_cache_bytes", lambda profile, tile_h, **kw: 123 * MiB + tile_h)
    predict_mod.predict_raster(torch.nn.Conv2d(3, 2, 1), src, tmp_path / "out.tif", pre, tile_size=32, overlap=8,
                               progress=False, reader="threads")
    assert seen == [123 * MiB + 32]
    assert not rasterio.env.hasenv() or "GDAL_CACHEMAX" not in rasterio.env.getenv()  # set for the prediction only


def test_reader_processes_size_their_caches_for_their_stripes(tmp_path, monkeypatch):
    import geobp.inference.procreader as procreader

    rng = np.random.default_rng(2)
    src = write_tif(tmp_path / "a.tif", rng.integers(1, 1000, (3, 32, 128)).astype("uint16"), nodata=0)
    pre = Preprocessing(bands=[1, 2, 3], nodata=0, mean=[500.0] * 3, std=[300.0] * 3)
    grid = TileGrid.build(32, 128, 32, 0)
    calls = []

    def sized(profile, tile_h, **kw):
        calls.append((profile["width"], tile_h, kw))
        return 40 * MiB

    monkeypatch.setattr(procreader, "block_cache_bytes", sized)
    with rasterio.open(src) as ds:
        profile = ds.profile
    with procreader.ProcessReader(src, grid, grid.batches(1), pre, num_workers=8, profile=profile) as reader:
        assert len(list(reader)) == 4
    # no more workers than batches (4), each with a quarter of the columns
    assert calls == [(128, 32, {"columns": 1 / 4, "readers": 4})]
