"""Band statistics from a fixed budget of file blocks: start-up time that does not grow with the data.

Normalisation needs each band's mean and spread (or percentiles) over the training scenes, not
every pixel of them: a sample of pixels drawn across scenes and within them estimates them, at
a cost set by the budget rather than by the data's size. :func:`sample_band_stats` reads whole internal blocks
(a block decodes once; a window straddling blocks would decode several), drawn uniformly without
replacement from all blocks of the training scenes, up to ``budget`` pixels. A dataset with
fewer pixels than the budget is read whole, so its statistics are exact. The draw depends only on
the seed and the scenes, so every process (and a later run) draws the same blocks; the result is
cached in one file keyed by the scenes (paths, sizes, modification times), nodata, budget and seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from geobp.atomic import atomic_path
from geobp.cores import usable_cores
from geobp.data.preprocessing import CACHE_DIR, PERCENTILE_SAMPLES, SceneStats, valid_pixels
from geobp.data.ranks import computed_once, local_rank
from geobp.raster import RasterInfo, open_raster, read_window
from geobp.sources.locations import file_stamp

#: Pixels read for band statistics when the training scenes hold more (2**25: 33.6 million).
STATS_BUDGET = 2**25
BANDSTATS_VERSION = 1


@dataclass
class BandStats(SceneStats):
    """Statistics of a block sample of the training scenes, and how the sample was drawn.

    ``validity`` is empty (validity maps come from :mod:`geobp.data.validity`).
    """

    blocks: int = 0  # blocks read
    total_blocks: int = 0  # blocks in the training scenes
    pixels: int = 0  # pixels read (valid or not)
    budget: int = 0
    seed: int = 0

    @property
    def exact(self) -> bool:
        """True when every block was read."""
        return self.blocks == self.total_blocks

    def describe(self) -> dict[str, int | bool]:
        """How the statistics were sampled (stored with them in the checkpoint)."""
        return {"blocks": self.blocks, "total_blocks": self.total_blocks, "pixels": self.pixels,
                "budget": self.budget, "seed": self.seed, "exact": self.exact}


def block_windows(info: RasterInfo) -> list[Window]:
    """The internal blocks of a raster, row by row (edge blocks clipped to the raster)."""
    bh, bw = info.block_height, info.block_width
    return [Window(c, r, min(bw, info.width - c), min(bh, info.height - r))
            for r in range(0, info.height, bh) for c in range(0, info.width, bw)]


def draw_blocks(infos: Sequence[RasterInfo], budget: int, seed: int) -> tuple[dict[int, list[Window]], int]:
    """Blocks to read: all of them when they hold at most ``budget`` pixels, else a uniform draw
    without replacement of as many blocks as the budget holds (at least one).

    Returns:
        (scene index -> its drawn blocks in file order, number of blocks in all scenes).
    """
    counts = [math.ceil(i.height / i.block_height) * math.ceil(i.width / i.block_width) for i in infos]
    total = int(sum(counts))
    pixels = sum(i.height * i.width for i in infos)
    if pixels <= budget:
        return {s: block_windows(info) for s, info in enumerate(infos)}, total
    mean_block = pixels / total
    k = max(1, min(total, int(budget // mean_block)))
    picks = np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))
    starts = np.cumsum([0, *counts])
    chosen: dict[int, list[Window]] = {}
    for s in np.unique(np.searchsorted(starts, picks, side="right") - 1):
        local = picks[(picks >= starts[s]) & (picks < starts[s + 1])] - starts[s]
        windows = block_windows(infos[s])
        chosen[int(s)] = [windows[int(j)] for j in local]
    return chosen, total


def _read_scene(path: str, windows: list[Window], nodata: float | None, keep_p: float, seed: int) -> SceneStats:
    with open_raster(path) as src:
        nodata = src.nodata if nodata is None else nodata
        c = src.count
        count, total, total_sq = np.zeros(c, np.int64), np.zeros(c, np.float64), np.zeros(c, np.float64)
        rng = np.random.default_rng(seed)
        samples = []
        for w in windows:
            data = read_window(src, w)
            pix = data[:, valid_pixels(data, nodata)].astype(np.float64)
            count += pix.shape[1]
            total += pix.sum(axis=1)
            total_sq += np.square(pix).sum(axis=1)
            if pix.shape[1]:
                samples.append(pix[:, rng.random(pix.shape[1]) < keep_p].astype(np.float32))
    sample = np.concatenate(samples, axis=1) if samples else np.zeros((c, 0), np.float32)
    return SceneStats(count, total, total_sq, sample, np.zeros((0, 0), np.float32))


def sample_band_stats(
    infos: Sequence[RasterInfo], nodata: float | None, budget: int = STATS_BUDGET, seed: int = 0,
    workers: int | None = None, progress: bool = False,
) -> BandStats:
    """Per-band count, sum, sum of squares and a percentile sample over a block sample of ``infos``.

    Args:
        infos: headers of the training scenes' images (all with the same band count).
        nodata: nodata value; each file's own tag when None.
        budget: pixels to read at most (whole blocks; the whole data when it is smaller).
        seed: the draw's seed.
        workers: threads reading scenes (rasterio releases the GIL while GDAL decodes); default
            the usable cores, at most 8.
        progress: show a progress bar over the scenes read.

    Raises:
        RasterReadError: a drawn block cannot be read (named with its file and window).
    """
    chosen, total_blocks = draw_blocks(infos, budget, seed)
    pixels = sum(int(w.width * w.height) for ws in chosen.values() for w in ws)
    keep_p = min(1.0, PERCENTILE_SAMPLES / max(pixels, 1))
    jobs = sorted(chosen.items())
    n = workers or max(1, min(8, usable_cores()))

    def one(job: tuple[int, list[Window]]) -> SceneStats:
        s, windows = job
        return _read_scene(infos[s].path, windows, nodata, keep_p, seed + s)

    from rich.progress import track

    with ThreadPoolExecutor(max_workers=n) as pool:
        done = pool.map(one, jobs) if n > 1 and len(jobs) > 1 else map(one, jobs)
        parts = list(track(done, total=len(jobs), description="Band statistics", transient=True,
                           disable=not progress or len(jobs) < 2))
    c = infos[0].count
    return BandStats(
        count=np.sum([p.count for p in parts], axis=0) if parts else np.zeros(c, np.int64),
        total=np.sum([p.total for p in parts], axis=0) if parts else np.zeros(c),
        total_sq=np.sum([p.total_sq for p in parts], axis=0) if parts else np.zeros(c),
        sample=np.concatenate([p.sample for p in parts], axis=1) if parts else np.zeros((c, 0), np.float32),
        validity=np.zeros((0, 0), np.float32),
        blocks=sum(len(w) for w in chosen.values()), total_blocks=total_blocks, pixels=pixels, budget=budget, seed=seed,
    )


def _key(infos: Sequence[RasterInfo], nodata: float | None, budget: int, seed: int) -> str:
    h = hashlib.sha1(f"{BANDSTATS_VERSION}|{nodata}|{budget}|{seed}".encode())
    for info in infos:
        h.update(f"|{file_stamp(info.path)}".encode())
    return h.hexdigest()[:20]


def load_band_stats(
    infos: Sequence[RasterInfo], nodata: float | None, cache_root: str | Path, budget: int = STATS_BUDGET, seed: int = 0,
    progress: bool = False,
) -> BandStats:
    """:func:`sample_band_stats`, cached in ``cache_root/.geobp_cache/bandstats.<key>.npz``.

    The file is written under a temporary name and renamed, so a process never reads half of
    one. Under several processes per node, local rank 0 computes it and the others wait for the
    file. A folder that cannot be written is skipped (each process computes; again next time).
    """
    cache_file = Path(cache_root) / CACHE_DIR / f"bandstats.{_key(infos, nodata, budget, seed)}.npz"

    def load() -> BandStats | None:
        try:
            with np.load(cache_file) as z:
                fields = {k: z[k] for k in ("count", "total", "total_sq", "sample", "validity")}
                meta = {k: int(z[k]) for k in ("blocks", "total_blocks", "pixels", "budget", "seed")}
            return BandStats(**fields, **meta)
        except (OSError, ValueError, KeyError):
            return None  # missing or broken: recomputed

    def compute() -> BandStats:
        stats = sample_band_stats(infos, nodata, budget, seed, progress=progress)
        try:
            with atomic_path(cache_file, suffix=".npz") as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **asdict(stats))
        except OSError:
            pass
        return stats

    # one process of a node computes, the others read its file (see geobp.data.ranks)
    return computed_once(cache_file, load, compute, owner=local_rank() == 0)
