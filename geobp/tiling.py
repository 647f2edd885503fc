"""Tiling as pure window math: grid tiles, block-aligned random tiles, spatial split blocks.

Nothing here opens a file. Windows are rasterio :class:`~rasterio.windows.Window` values in pixel
coordinates of one scene; every function is deterministic given its arguments (and ``rng``).
Tile sizes and overlaps are checked once, by :class:`TilingOptions`, where the configuration
enters; the functions take plain integers that passed it (``tile >= 1``, ``0 <= overlap < tile``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from geobp.errors import ConfigError, format_error


@dataclass(frozen=True)
class TilingOptions:
    """Tile size and overlap, checked once when made (the ``data.tile_size`` and ``data.overlap`` options).

    The one place where a tile size and an overlap are checked: the window math below takes
    plain integers and assumes values that passed here. Inference makes one with its own
    values (its tiles are larger by default).

    Args:
        tile_size: tile side in pixels (tiles are square), at least 1.
        overlap: pixels shared by neighbouring grid tiles, in ``[0, tile_size)``.

    Raises:
        ConfigError: ``tile_size < 1``, or ``overlap`` outside ``[0, tile_size)``.
    """

    tile_size: int = 256
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ConfigError(format_error(None, f"tile size must be positive (found {self.tile_size})", "set tile_size >= 1"))
        if self.overlap < 0 or self.overlap >= self.tile_size:
            raise ConfigError(
                format_error(
                    None,
                    f"overlap must be in [0, tile size) (tile {self.tile_size}, found overlap {self.overlap})",
                    "set overlap smaller than tile_size",
                )
            )


def grid_offsets(length: int, tile: int, stride: int, start: int = 0) -> list[int]:
    """Offsets of tiles of size ``tile`` covering ``[start, start + length)`` with step ``stride``.

    The last tile is shifted back to end exactly at the edge (clamped, never dropped); a length
    shorter than one tile gives a single offset at ``start``.
    """
    if length <= tile:
        return [start]
    offsets = list(range(0, length - tile, stride))
    offsets.append(length - tile)
    return [start + o for o in offsets]


def grid_windows(
    height: int, width: int, tile: int, overlap: int = 0, region: Window | None = None
) -> list[Window]:
    """Tiles of a regular grid that cover a raster (or a region of it) exactly.

    Every pixel of the region lies in at least one window and no window reaches outside it:
    edge tiles are shifted back inside, and a region smaller than a tile gets one window of the
    region's size (the reader pads it to the tile size).

    Args:
        height, width: raster size in pixels.
        tile: tile size in pixels.
        overlap: pixels shared by neighbouring tiles.
        region: part of the raster to cover; the whole raster when None.

    Returns:
        Windows in row-major order.
    """
    if region is None:
        region = Window(0, 0, width, height)
    r0, c0 = int(region.row_off), int(region.col_off)
    rh, rw = int(region.height), int(region.width)
    th, tw = min(tile, rh), min(tile, rw)
    stride = tile - overlap
    return [
        Window(c, r, tw, th)
        for r in grid_offsets(rh, tile, stride, r0)
        for c in grid_offsets(rw, tile, stride, c0)
    ]


def origin_ranges(lo: int, hi: int, tile: int, block: int) -> list[tuple[int, int]]:
    """Inclusive ranges of 1-D tile origins in ``[lo, hi - tile]`` that touch as few file blocks as possible.

    With ``tile <= block`` a tile is placed inside one block (one block decoded per axis); with a
    larger tile its origin sits on a block boundary. One origin flush with ``hi`` is always kept so
    that the last pixels of a raster whose size is not a multiple of the block are sampled too.
    """
    if hi - lo <= tile:
        return [(lo, lo)]
    last = hi - tile
    ranges: list[tuple[int, int]] = []
    if tile <= block:
        for k in range(lo // block, last // block + 1):
            a, b = max(k * block, lo), min((k + 1) * block - tile, last)
            if a <= b:
                ranges.append((a, b))
    else:
        first = -(-lo // block)
        ranges = [(k * block, k * block) for k in range(first, last // block + 1)]
    if not ranges or ranges[-1][1] < last:
        ranges.append((last, last))
    return ranges


@dataclass(frozen=True)
class OriginCell:
    """A rectangle of tile origins (inclusive bounds) whose tiles share the same file blocks."""

    row_lo: int
    row_hi: int
    col_lo: int
    col_hi: int

    @property
    def count(self) -> int:
        """Number of distinct origins in the cell."""
        return (self.row_hi - self.row_lo + 1) * (self.col_hi - self.col_lo + 1)


def origin_cells(region: Window, tile: int, block_height: int, block_width: int) -> list[OriginCell]:
    """Block-aligned cells of tile origins for random tiles drawn inside ``region``."""
    r0, c0 = int(region.row_off), int(region.col_off)
    rows = origin_ranges(r0, r0 + int(region.height), tile, block_height)
    cols = origin_ranges(c0, c0 + int(region.width), tile, block_width)
    return [OriginCell(a, b, c, d) for a, b in rows for c, d in cols]


def cell_window(cell: OriginCell, tile: int, region: Window) -> Window:
    """The window covered by all tiles of ``cell`` (clipped to ``region``), for nodata checks."""
    r1 = min(cell.row_hi + tile, int(region.row_off + region.height))
    c1 = min(cell.col_hi + tile, int(region.col_off + region.width))
    return Window(cell.col_lo, cell.row_lo, c1 - cell.col_lo, r1 - cell.row_lo)


def draw_origin(rng: np.random.Generator, cell: OriginCell) -> tuple[int, int]:
    """A uniformly random (row, col) origin inside ``cell``."""
    return (
        int(rng.integers(cell.row_lo, cell.row_hi + 1)),
        int(rng.integers(cell.col_lo, cell.col_hi + 1)),
    )


def split_blocks(
    height: int,
    width: int,
    block: int,
    fractions: Sequence[float],
    seed: int,
    key: str,
) -> list[list[Window]]:
    """Assign square blocks of a raster to splits at random, reproducibly.

    Used for spatial splits within scenes: neighbouring (correlated) pixels land in the same
    split because whole blocks are assigned. Every split with a positive fraction gets at least
    one block when there are enough blocks.

    Args:
        height, width: raster size in pixels.
        block: split block size in pixels (edge blocks are smaller).
        fractions: share of blocks per split, e.g. ``(0.8, 0.2)``; normalised to sum to 1.
        seed: global seed.
        key: a per-scene string (its name), so that scenes get different assignments.

    Returns:
        One list of windows per split, each in row-major order.
    """
    windows = [
        Window(c, r, min(block, width - c), min(block, height - r))
        for r in range(0, height, block)
        for c in range(0, width, block)
    ]
    fr = np.asarray(fractions, dtype=float)
    fr = fr / fr.sum()
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    order = rng.permutation(len(windows))
    counts = np.floor(fr * len(windows)).astype(int)
    # Give leftover blocks to splits with a positive share that got none, then to the first split.
    for i in np.flatnonzero((counts == 0) & (fr > 0)):
        if counts.sum() < len(windows):
            counts[i] = 1
    counts[0] += len(windows) - counts.sum()
    bounds = np.concatenate([[0], np.cumsum(counts)])
    out: list[list[Window]] = []
    for i in range(len(fr)):
        idx = sorted(order[bounds[i] : bounds[i + 1]])
        out.append([windows[j] for j in idx])
    return out


# ----- blend weights for sliding-window inference ------------------------------------------

#: Smallest blend weight: weights taper to this near tile edges but never reach zero.
BLEND_EPS = 1e-4


def blend_weights_1d(length: int, overlap: int, taper_start: bool = True, taper_end: bool = True) -> np.ndarray:
    """Smooth 1-D blend weights of a tile of ``length`` pixels, tapered over ``overlap`` pixels at each end.

    Over the ``overlap`` pixels next to a tapered end, the weight is :data:`BLEND_EPS` for the
    first quarter (the pixels a model sees with the least context), rises along a squared sine
    over the middle half and is 1 from the last quarter on. The rise is antisymmetric, so two
    tiles overlapping by exactly ``overlap`` pixels have weights summing to 1 (+eps) everywhere.
    An end without a neighbour (the raster border) is not tapered.

    Args:
        length: tile length in pixels.
        overlap: taper length in pixels (0 gives flat weights).
        taper_start, taper_end: whether to taper the first / last pixels.

    Returns:
        float32 [length] weights in [BLEND_EPS, 1], strictly positive.
    """
    w = np.ones(length, np.float64)
    if overlap > 0:
        d = np.arange(length, dtype=np.float64)
        for tapered, dist in ((taper_start, d), (taper_end, length - 1 - d)):
            if tapered:
                v = np.clip(((dist + 0.5) / overlap - 0.25) * 2.0, 0.0, 1.0)
                w *= BLEND_EPS + (1.0 - BLEND_EPS) * np.sin(0.5 * np.pi * v) ** 2
    return np.maximum(w, BLEND_EPS).astype(np.float32)


def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """2-D blend weights of a square tile tapered on all four sides: the outer product of :func:`blend_weights_1d`.

    Returns:
        float32 [tile, tile], smooth, strictly positive (at least BLEND_EPS**2, in the corners),
        symmetric, 1 in the centre.
    """
    w = blend_weights_1d(tile, overlap)
    return np.outer(w, w)


def spread_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of as few tiles as :func:`grid_offsets` uses, spread evenly over ``[0, length)``.

    Instead of keeping the stride and clamping the last tile back (which leaves one overlap of up
    to a whole tile), the slack is shared: every overlap is at least ``overlap`` and they differ
    by at most one pixel, and every tile lies inside the raster. A length shorter than one tile
    gives ``[0]``.
    """
    if length <= tile:
        return [0]
    n = -(-(length - tile) // (tile - overlap)) + 1
    return [k * (length - tile) // (n - 1) for k in range(n)]


def axis_blend_weights(length: int, tile: int, overlap: int) -> tuple[list[int], np.ndarray]:
    """Tile offsets along one raster axis and each tile's normalised 1-D blend weights.

    Tiles follow :func:`spread_offsets` (overlaps of at least ``overlap``, evenly spread). Each tile is tapered only on the sides it shares with a neighbour, so raster borders keep
    full weight, then all weights are divided by their sum over tiles: at every pixel the
    weights of the tiles covering it sum to 1. Because 2-D weights are the outer product of a
    row and a column weight and the grid is a product of row and column offsets, the 2-D
    weights ``outer(rows[i], cols[j])`` also sum to 1 at every pixel.

    Args:
        length: raster length along the axis in pixels.
        tile: tile size in pixels; a raster shorter than a tile gets one tile of ``length`` pixels.
        overlap: nominal overlap between neighbouring tiles.

    Returns:
        (offsets, float32 [len(offsets), min(tile, length)] weights).
    """
    offsets = spread_offsets(length, tile, overlap)
    span = min(tile, length)
    n = len(offsets)
    weights = np.stack(
        [blend_weights_1d(span, overlap, taper_start=k > 0, taper_end=k < n - 1) for k in range(n)]
    ).astype(np.float64)
    total = np.zeros(length, np.float64)
    for off, w in zip(offsets, weights):
        total[off : off + span] += w
    for k, off in enumerate(offsets):
        weights[k] /= total[off : off + span]
    return offsets, weights.astype(np.float32)


Tile = tuple[int, int]  # (tile row index, tile column index) in a TileGrid


@dataclass(frozen=True)
class TileGrid:
    """Sliding-window tiles over a raster, with normalised separable blend weights.

    Attributes:
        height, width: raster size.
        tile: model input size (tiles of rasters smaller than this are padded to it).
        row_offsets, col_offsets: tile origins along each axis (``spread_offsets``).
        row_weights: float32 [len(row_offsets), tile_h]; tile (i, j) has weights
            ``outer(row_weights[i], col_weights[j])``, which sum to 1 at every pixel.
        col_weights: float32 [len(col_offsets), tile_w].
    """

    height: int
    width: int
    tile: int
    row_offsets: list[int]
    col_offsets: list[int]
    row_weights: np.ndarray
    col_weights: np.ndarray

    @classmethod
    def build(cls, height: int, width: int, tile: int, overlap: int) -> TileGrid:
        """Grid of ``tile``-sized windows overlapping by at least ``overlap`` pixels.

        ``tile`` and ``overlap`` are as :class:`TilingOptions` checks them.
        """
        rows, row_w = axis_blend_weights(height, tile, overlap)
        cols, col_w = axis_blend_weights(width, tile, overlap)
        return cls(height, width, tile, rows, cols, row_w, col_w)

    @property
    def tile_h(self) -> int:
        """Rows of the raster inside one tile (less than ``tile`` for a short raster)."""
        return min(self.tile, self.height)

    @property
    def tile_w(self) -> int:
        """Columns of the raster inside one tile."""
        return min(self.tile, self.width)

    def tiles(self) -> list[Tile]:
        """All tiles in row-major order."""
        return [(i, j) for i in range(len(self.row_offsets)) for j in range(len(self.col_offsets))]

    def batches(self, batch_size: int) -> list[list[Tile]]:
        """Tiles in row-major order, cut into batches (a batch may span two tile rows)."""
        tiles = self.tiles()
        return [tiles[k : k + batch_size] for k in range(0, len(tiles), batch_size)]
