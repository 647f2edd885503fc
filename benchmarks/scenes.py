"""Benchmark input rasters, generated once into the cache folder and reused by later runs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np


def ensure_scenes(cache_dir: str | Path, scenes: int, size: int, bands: int, classes: int, block: int) -> Path:
    """Synthetic scenes (``geobp.data.synth``): uint16, DEFLATE with predictor 2, ``block`` px tiles.

    The folder is named after the parameters and completed by a ``done.json`` marker, so an
    interrupted generation is redone and changed parameters get their own folder.

    Returns:
        The dataset root (``images/`` and ``masks/``).
    """
    from geobp.data.synth import write_scenes

    root = Path(cache_dir) / f"scenes_{scenes}x{size}_b{bands}_c{classes}_blk{block}"
    marker = root / "done.json"
    if marker.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    start = time.perf_counter()
    write_scenes(root, scenes=scenes, size=size, bands=bands, classes=classes, block_size=block, seed=0)
    marker.write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1)}))
    return root


def ensure_plain_raster(cache_dir: str | Path, size: int, bands: int = 1, block: int = 512, height: int | None = None) -> Path:
    """A ``size`` x ``size`` (or ``height``) uint16 GeoTIFF (DEFLATE, predictor 2) written strip by strip.

    Smooth gradients plus noise: compressible like imagery, cheap to make, and written in
    block rows so that making a 20000 x 20000 raster needs little memory.
    """
    import rasterio
    from rasterio.transform import from_origin

    height = height or size
    shape = f"{size}" if height == size else f"{size}x{height}"
    path = Path(cache_dir) / f"plain_{shape}_b{bands}_blk{block}.tif"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    profile = dict(
        driver="GTiff", width=size, height=height, count=bands, dtype="uint16", crs="EPSG:32633",
        transform=from_origin(400000.0, 5500000.0, 10.0, 10.0), nodata=0, tiled=True,
        blockxsize=block, blockysize=block, compress="deflate", predictor=2,
    )
    rng = np.random.default_rng(0)
    cols = np.arange(size, dtype=np.float32)
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, height, block):
            rows = min(block, height - row)
            r = np.arange(row, row + rows, dtype=np.float32)[:, None]
            base = 1000 + 500 * np.sin(r / 700.0) + 400 * np.cos(cols[None, :] / 900.0)
            for b in range(bands):
                noise = rng.integers(0, 32, size=(rows, size), dtype=np.uint16)
                dst.write((base + 100 * b).astype(np.uint16) + noise, b + 1,
                          window=rasterio.windows.Window(0, row, size, rows))
    tmp.replace(path)
    return path
