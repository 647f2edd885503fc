"""Class histograms of the label masks, per cell: class frequencies, balanced tile weights, class weights.

Rare classes need two numbers from the training labels: how many pixels each class covers (for
class weights and the start-up report) and where they are (so that ``sampling: balanced`` can
draw the tile places that hold them more often). Both come from the *cell histograms* of each scene:
for each cell of :data:`HISTOGRAM_CELL` x :data:`HISTOGRAM_CELL` pixels, the pixel count of every class
``0..num_classes-1`` (other values, such as the ignore index, are not counted). Masks are single
band and cheap to decode, so the histograms are built by reading the mask once, in strips of whole
blocks; they are cached per scene in ``<cache>/.geobp_cache/labels.<stem>.<key>.npz``, keyed by the
mask's path, size, modification time and the class count, and only built when something asks for
it (``data.sampling: balanced`` or ``model.class_weights: auto``). Processes of a node split the
scenes and read each other's files (:mod:`geobp.data.ranks`).

Counts over a window that does not follow the cell grid are area-weighted (a cell cut in half
counts half of its pixels): exact for windows on the grid or at the scene's edges (whole scenes,
so the class frequencies of a scene split are exact), approximate at the inner edges of a
``split: blocks`` region.

The pixels of a mask are counted by their label whether or not the image is nodata there (the
image is not read).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rasterio.windows import Window

from geobp.atomic import atomic_path
from geobp.data.preprocessing import CACHE_DIR
from geobp.data.ranks import computed_once, local_rank, local_world_size
from geobp.raster import RasterInfo, open_raster, read_window
from geobp.sources.locations import file_stamp, file_stem

if TYPE_CHECKING:
    from geobp.data.samplers import SceneCells

#: Pixels per side of a histogram cell.
HISTOGRAM_CELL = 32
#: Under ``balanced`` sampling, a tile place's rarity (frequency of the most common class over
#: that of the rarest class it holds) is capped here, so that a class of a few pixels does not
#: take over the epoch.
BALANCE_CAP = 100.0
HISTOGRAMS_VERSION = 1
#: Rows decoded at a time when building the cell histograms (rounded to whole blocks and cells).
STRIP_ROWS = 1024


def cell_histograms(path: str | Path, num_classes: int, factor: int = HISTOGRAM_CELL) -> np.ndarray:
    """Pixel counts of classes ``0..num_classes-1`` per ``factor`` x ``factor`` cell of a mask.

    Args:
        path: single-band mask GeoTIFF.
        num_classes: classes counted; other values are left out.
        factor: cell size in pixels.

    Returns:
        int64 [num_classes, ceil(H / factor), ceil(W / factor)].

    Raises:
        RasterReadError: a block of the mask cannot be decoded (named with its file and window).
    """
    with open_raster(path) as src:
        h, w = src.height, src.width
        block_h = src.block_shapes[0][0]
        step = max(factor, (STRIP_ROWS // np.lcm(block_h, factor)) * int(np.lcm(block_h, factor)))
        rows, cols = -(-h // factor), -(-w // factor)
        out = np.zeros((num_classes, rows, cols), np.int64)
        col_cell = np.arange(w) // factor
        for r0 in range(0, h, step):
            strip = read_window(src, Window(0, r0, w, min(step, h - r0)), 1)
            cell_rows = (np.arange(strip.shape[0]) + r0) // factor
            keep = (strip >= 0) & (strip < num_classes)
            cell = (cell_rows[:, None] * cols + col_cell[None, :])[keep]
            idx = strip[keep].astype(np.int64) * (rows * cols) + cell
            out += np.bincount(idx, minlength=num_classes * rows * cols).reshape(num_classes, rows, cols)
    return out


def histogram_cache_file(path: str | Path, num_classes: int, cache_root: str | Path, factor: int = HISTOGRAM_CELL) -> Path:
    """Where the cell histograms of ``path`` are cached (keyed by its
    :func:`~geobp.sources.locations.file_stamp`, classes and cell size)."""
    key = hashlib.sha1(f"{HISTOGRAMS_VERSION}|{file_stamp(path)}|{num_classes}|{factor}".encode()).hexdigest()[:16]
    return Path(cache_root) / CACHE_DIR / f"labels.{file_stem(path)}.{key}.npz"


def load_cell_histograms(
    masks: Sequence[RasterInfo], num_classes: int, cache_root: str | Path, progress: bool = False
) -> list[np.ndarray]:
    """:func:`cell_histograms` of every mask, cached; with several processes on a node (``LOCAL_RANK``),
    process r builds the histograms of masks r, r + n, ... and reads the others' from the cache.

    Raises:
        RasterReadError: a mask cannot be decoded.
    """
    rank, size = local_rank(), local_world_size()
    mine = [i for i in range(len(masks)) if i % size == rank]
    order = mine + [i for i in range(len(masks)) if i % size != rank]
    if progress and len(order) > 1:
        from rich.progress import track

        order = list(track(order, description="Class histograms of the masks", transient=True))
    maps: dict[int, np.ndarray] = {}
    for i in order:
        path = masks[i].path
        cache_file = histogram_cache_file(path, num_classes, cache_root)

        def load(f: Path = cache_file) -> np.ndarray | None:
            try:
                with np.load(f) as z:
                    return z["counts"]
            except (OSError, ValueError, KeyError):
                return None  # missing or broken: rebuilt

        def compute(p: str = path, f: Path = cache_file) -> np.ndarray:
            counts = cell_histograms(p, num_classes)
            try:
                with atomic_path(f, suffix=".npz") as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, counts=counts)
            except OSError:
                pass  # a read-only cache folder: rebuilt next time
            return counts

        maps[i] = computed_once(cache_file, load, compute, owner=i in mine)
    return [maps[i] for i in range(len(masks))]


def _axis_weights(lo: int, hi: int, length: int, factor: int) -> tuple[int, np.ndarray]:
    """First cell and per-cell share of each cell's pixels inside ``[lo, hi)`` along one axis."""
    first, last = lo // factor, -(-hi // factor)
    starts = np.arange(first, last) * factor
    ends = np.minimum(starts + factor, length)
    inside = np.minimum(ends, hi) - np.maximum(starts, lo)
    return first, np.clip(inside, 0, None) / np.maximum(ends - starts, 1)


def window_class_counts(counts: np.ndarray, window: Window, height: int, width: int, factor: int = HISTOGRAM_CELL) -> np.ndarray:
    """Pixels per class inside ``window`` of a scene from its cell histograms (area-weighted at cut cells).

    Args:
        counts: the scene's cell histograms [K, rows, cols].
        window: pixel window inside the scene.
        height, width: the scene's size in pixels.

    Returns:
        float64 [K].
    """
    r0, c0 = max(int(window.row_off), 0), max(int(window.col_off), 0)
    r1, c1 = min(int(window.row_off + window.height), height), min(int(window.col_off + window.width), width)
    if r1 <= r0 or c1 <= c0:
        return np.zeros(counts.shape[0])
    i0, wr = _axis_weights(r0, r1, height, factor)
    j0, wc = _axis_weights(c0, c1, width, factor)
    block = counts[:, i0 : i0 + len(wr), j0 : j0 + len(wc)].astype(np.float64)
    return np.einsum("kij,i,j->k", block, wr, wc)


def balance_factors(cell_counts: np.ndarray, power: float, cap: float = BALANCE_CAP) -> np.ndarray:
    """Weight multipliers of tile places that favour the rare classes they hold.

    A place's rarity is the training frequency of the most common class divided by that of the
    rarest class it holds (at least one pixel), capped at ``cap``; its multiplier is
    ``rarity ** power``. ``power`` 0 keeps uniform sampling; 1 draws a place holding a class k
    times rarer k times as often. A place with no labelled pixel keeps multiplier 1.

    Args:
        cell_counts: [N, K] pixels per class under each place's tiles.
        power: ``data.balance_power``, in [0, 1].
        cap: the largest rarity.

    Returns:
        float64 [N].
    """
    totals = cell_counts.sum(axis=0)
    if not totals.any():
        return np.ones(len(cell_counts))
    rarity = np.where(totals > 0, totals.max() / np.maximum(totals, 1e-12), 1.0)
    present = cell_counts >= 1.0
    rarest = np.where(present, rarity[None, :], 1.0).max(axis=1)
    return np.minimum(rarest, cap) ** power


def place_class_counts(
    histograms: Sequence[np.ndarray], cells: Sequence[SceneCells], windows: Sequence[Sequence[Window]], num_classes: int
) -> np.ndarray:
    """[N, K] pixels per class under the tiles of every origin cell, scene after scene.

    Args:
        histograms: per scene, its cell histograms (:func:`load_cell_histograms`).
        cells: the training origin cells per scene (:func:`geobp.data.places.train_places`).
        windows: per scene, the window each of its cells' tiles cover.
        num_classes: K.
    """
    counts = [window_class_counts(histograms[sc.scene], w, sc.height, sc.width) for sc, ws in zip(cells, windows) for w in ws]
    return np.array(counts).reshape(len(counts), num_classes)


def balanced_weights(cells: Sequence[SceneCells], counts: np.ndarray, power: float) -> np.ndarray:
    """The origin cells' weights under ``sampling: balanced``, flat: their uniform weights times
    :func:`balance_factors` of their class counts."""
    uniform = np.array([w for sc in cells for w in sc.weights])
    return uniform * balance_factors(counts, power)


def expected_shares(cell_counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Expected share of each class among the labelled pixels drawn when place i is picked with
    probability proportional to ``weights[i]`` (each place contributing its classes' mix).

    Returns:
        float64 [K] summing to 1 (zeros when nothing is labelled).
    """
    pixels = cell_counts.sum(axis=1, keepdims=True)
    mix = np.divide(cell_counts, pixels, out=np.zeros_like(cell_counts, dtype=np.float64), where=pixels > 0)
    p = weights / weights.sum() if weights.sum() > 0 else weights
    shown = (p[:, None] * mix).sum(axis=0)
    return shown / shown.sum() if shown.sum() > 0 else shown


def class_counts(masks: Sequence[str | Path], num_classes: int) -> list[int]:
    """Pixels of each class ``0..num_classes-1`` over whole masks (read once, not cached).

    Raises:
        RasterReadError: a mask cannot be decoded.
    """
    total = np.zeros(num_classes, np.int64)
    for path in masks:
        total += cell_histograms(path, num_classes).sum(axis=(1, 2))
    return total.tolist()
