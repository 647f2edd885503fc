"""GPU benchmark, inference pipeline: ``geobp infer`` over a large DEFLATE GeoTIFF written here, and
the node's decode limit for that file (the usable cores times one core's rate of a plain rasterio
read loop over its tiles). Needs rasterio and everything ``geobp infer`` imports.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_train import CLASSES, IN_CHANNELS
from geobp.cores import usable_cores


def write_raster(path: Path, size: int, block: int = 512, bands: int = IN_CHANNELS) -> float:
    """Write a ``size`` x ``size`` uint16 GeoTIFF of ``bands`` bands, tiled ``block``, DEFLATE, with
    smooth structure and noise like imagery (compressible, not trivially); the seconds it took."""
    import rasterio
    from rasterio.transform import from_origin

    start = time.perf_counter()
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint16", crs="EPSG:32633",
                   transform=from_origin(500000.0, 6000000.0, 10.0, 10.0), tiled=True, blockxsize=block,
                   blockysize=block, compress="deflate", num_threads="all_cpus", bigtiff="if_safer")
    rng = np.random.default_rng(0)
    x = np.arange(size, dtype=np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, block):
            h = min(block, size - row)
            y = np.arange(row, row + h, dtype=np.float32)[:, None]
            strip = np.empty((bands, h, size), dtype=np.uint16)
            for b in range(bands):
                field = 1500 + 600 * np.sin(x / (97 + 13 * b)) * np.cos(y / (151 + 7 * b)) + 300 * np.sin((x + y) / 41)
                strip[b] = (field + rng.integers(0, 64, (h, size))).astype(np.uint16)
            dst.write(strip, window=rasterio.windows.Window(0, row, size, h))
    return time.perf_counter() - start


def write_checkpoint(path: Path, encoder: str, tile: int) -> None:
    """A geobp checkpoint (as ``geobp fit`` writes: state dict and hyperparameters) of an untrained
    U-Net for the raster of :func:`write_raster`."""
    from geobp.data.preprocessing import Preprocessing
    from geobp.task import SegmentationTask

    pre = Preprocessing(bands=list(range(1, IN_CHANNELS + 1)), mean=[1500.0] * IN_CHANNELS,
                        std=[500.0] * IN_CHANNELS, dtype="uint16")
    torch.manual_seed(0)
    task = SegmentationTask(model="unet", encoder=encoder, in_channels=IN_CHANNELS, num_classes=CLASSES,
                            channels_last=True, preprocessing=pre.to_dict(), tile_size=tile)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)


def infer_seconds(ckpt: Path, src: Path, out: Path, accelerator: str, batch: int, tile: int) -> float:
    """Wall seconds of ``geobp infer`` (in this process, the command's own code) over ``src``."""
    from geobp.cli import main

    start = time.perf_counter()
    code = main(["infer", "--ckpt", str(ckpt), "--out", str(out), str(src), "--accelerator", accelerator,
                 "--precision", "bf16-mixed", "--batch_size", str(batch), "--tile_size", str(tile),
                 "--overlap", "0", "--overwrite"])
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"geobp infer failed on {src} (exit {code})")
    return seconds


def decode_rate(src: Path, tile: int, seconds: float) -> tuple[float, int]:
    """(tiles/s, tiles read) of one core reading ``src`` tile by tile (all bands) with rasterio, GDAL
    on one thread, for about ``seconds`` or the whole file."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.Env(GDAL_NUM_THREADS="1", GDAL_CACHEMAX=64), rasterio.open(src) as ds:
        windows = [Window(c, r, min(tile, ds.width - c), min(tile, ds.height - r))
                   for r in range(0, ds.height, tile) for c in range(0, ds.width, tile)]
        start, n = time.perf_counter(), 0
        for w in windows:
            ds.read(window=w)
            n += 1
            if time.perf_counter() - start > seconds:
                break
        return n / (time.perf_counter() - start), n


def measure_pipeline(work: Path, size: int, tile: int, batch: int, encoder: str, device: torch.device,
                     decode_s: float) -> dict[str, Any]:
    """Write the raster and the checkpoint under ``work``, warm ``geobp infer`` up on a small raster,
    then time it over the large one, and measure the decode limit of that file."""
    work.mkdir(parents=True, exist_ok=True)
    src, small, ckpt = work / "large.tif", work / "small.tif", work / "model.ckpt"
    write_s = write_raster(src, size)
    write_raster(small, max(tile * 2, size // 8))
    write_checkpoint(ckpt, encoder, tile)
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    infer_seconds(ckpt, small, work / "warmup", accelerator, batch, tile)  # CUDA context, cuDNN autotuning
    seconds = infer_seconds(ckpt, src, work / "out", accelerator, batch, tile)
    tiles = math.ceil(size / tile) ** 2
    rate, read = decode_rate(src, tile, decode_s)
    cores = usable_cores()
    return {
        "pipeline_images_per_s": tiles / seconds, "pipeline_seconds": seconds, "pipeline_tiles": tiles,
        "raster": f"{size} x {size} px, {IN_CHANNELS} bands uint16, DEFLATE, 512 px blocks",
        "raster_bytes": src.stat().st_size, "raster_write_s": write_s,
        "decode_one_core_images_per_s": rate, "decode_tiles_read": read, "cores": cores,
        "decode_limit_images_per_s": rate * cores,
    }
