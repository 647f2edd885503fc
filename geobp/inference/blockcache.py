"""GDAL's block cache while predicting: big enough that no block is decoded twice, bounded by the raster.

Tiles of a prediction grid overlap, and a tile row shares block rows with the next one: with
512-row blocks and 256 px tiles at a 224 px stride, every block row is read by two or three tile
rows. A block decoded for one tile row is found again by the next only if the cache still holds
it, that is if it holds every block a tile row touches (GDAL's cache evicts the least recently
used block first: a cache a little too small loses every block just before it is needed again).

A fixed cache cannot suit every raster: 32 MiB holds one block row of a 3,072 px wide 6-band
uint16 scene with 512 px blocks (19 MB), not the two a tile row can span, and a 16,384 px wide
one needs 100 MB per block row; a cache that cannot hold them decodes every block again
(BENCHMARKS.md, section 3b, holds the measurements). GDAL's own default (a share of RAM) grows
with the file instead.
Here the cache is sized from the raster's header, per reading process: the block rows one tile
row spans, for the columns the process reads, within a share of the available memory.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

#: The smallest cache set while predicting (enough for narrow rasters and any stripped file).
MIN_CACHE_BYTES = 32 * 2**20
#: The largest cache one reading process gets, whatever the raster.
MAX_CACHE_BYTES = 2 * 2**30
#: The share of the available memory that the caches of all reading processes may take together.
MEMORY_SHARE = 0.25


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def block_rows_spanned(tile_h: int, block_h: int) -> int:
    """The most block rows one tile row of ``tile_h`` pixels can touch (placed anywhere)."""
    return math.ceil((tile_h - 1) / block_h) + 1 if tile_h > 1 else 1


def block_cache_bytes(profile: dict[str, Any], tile_h: int, columns: float = 1.0, readers: int = 1,
                      available: int | None = None) -> int:
    """GDAL cache (bytes) for one reading process of a raster with rasterio ``profile``.

    Args:
        profile: the raster's profile (``width``, ``count``, ``dtype``, ``blockxsize``/``blockysize``).
        tile_h: the height of a tile row (the prediction tile).
        columns: the share of the raster's width this process reads (1 for all of it; a reader
            process with a stripe of columns of its own reads ``1 / processes`` of it, plus the
            blocks it shares with its neighbours).
        readers: the reading processes, whose caches together stay within :data:`MEMORY_SHARE`
            of ``available``.
        available: bytes of available memory (:func:`available_memory` when None).

    Returns:
        The block rows one tile row spans, over the columns read, with a quarter more for the
        blocks of the next batch, between :data:`MIN_CACHE_BYTES` and the memory bound.
    """
    width = int(profile["width"])
    bh = int(profile.get("blockysize") or 1)
    bw = int(profile.get("blockxsize") or width)
    block_bytes = bh * bw * int(profile["count"]) * np.dtype(profile["dtype"]).itemsize
    blocks_across = math.ceil(width / bw)
    # a stripe of columns: its share of the blocks, and the block on each side it may share
    mine = blocks_across if columns >= 1 else min(blocks_across, math.ceil(blocks_across * columns) + 2)
    need = int(1.25 * block_rows_spanned(tile_h, bh) * mine * block_bytes)
    avail = available if available is not None else available_memory()
    bound = MAX_CACHE_BYTES if avail is None else min(MAX_CACHE_BYTES, int(MEMORY_SHARE * avail / max(1, readers)))
    return max(MIN_CACHE_BYTES, min(need, bound))
