"""Section "sources": several sensors on one grid (:mod:`geobp.sources.stack`) against the same bands pre-stacked.

One synthetic scene, made once into the cache folder:

- ``s2``: Sentinel-2-like, one file per band: B02, B03, B04, B08 at 10 m (the reference grid,
  ``sources_size`` px a side, EPSG:32633), B11 and B12 at 20 m; uint16, nodata 0;
- ``s1``: Sentinel-1-like VV and VH, one file each, float32 dB with NaN nodata, in EPSG:4326 at
  about 15 m: warped on every read;
- ``dem``: two tiles of one DEM in EPSG:3035 at 30 m, float32, nodata -9999, the seam through the
  scene: mosaicked and warped on every read;
- ``stacked``: the same 9 bands already on the reference grid in one float32 file (each band
  warped once with ``rasterio.warp.reproject``), what a user would otherwise prepare by hand;
- ``labels``: 5 classes on the reference grid (uint8), for sections ``imagery`` and ``remote``.

Each file's bands carry their names as descriptions (``B04``, ``VV``, ``elevation``).

Every file is tiled ``block_size`` px and DEFLATE-compressed. The timed loops read the same random
``tile_size`` px block-aligned windows: :meth:`SceneStack.read` (float32 bands and the valid mask),
against the bare windowed read of the stacked file (the limit: one decode, no warp, no mask).
Both run in this process, with a GDAL block cache smaller than either side's decoded files, then
with one that holds most of the sources' (not the stacked file's).

Standalone: ``python -m benchmarks.sources [--quick] [--json PATH]``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Config, SectionResult, fmt, median, run_standalone, spread, table, target

UTM = "EPSG:32633"
X0, Y0 = 500000.0, 5000000.0
#: GDAL block caches of the timed loops (MiB): the first holds neither side's decoded files, the
#: second most of the sources' (not the stacked file's).
CACHES_MB = (16, 64)
#: Reference pixels a side (quick: 512).
SIZE, QUICK_SIZE = 2048, 512


def _write(path: Path, data: np.ndarray, crs: str, transform: Any, nodata: float | None, block: int,
           descriptions: tuple[str, ...] | None = None) -> str:
    import rasterio

    data = data[None] if data.ndim == 2 else data
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=str(data.dtype),
                   crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=block, blockysize=block,
                   compress="deflate", predictor=2 if data.dtype.kind in "iu" else 3)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:  # band names: data.images reads a file's bands by their descriptions
            dst.descriptions = descriptions
    return str(path)


def _field(h: int, w: int, rng: np.random.Generator, scale: float, offset: float) -> np.ndarray:
    """Smooth gradients plus noise: compresses like imagery."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return offset + scale * (np.sin(xx / 37.0) * np.cos(yy / 53.0) + 0.1 * rng.standard_normal((h, w), dtype=np.float32))


def ensure_sources(cache_dir: str | Path, size: int, block: int) -> dict[str, Any]:
    """The scene's files (made once; a ``done.json`` marker completes the folder). Returns the manifest."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.warp import reproject

    from geobp.raster import project_bounds

    root = Path(cache_dir) / f"sources2_{size}_blk{block}"  # 2: band descriptions and labels
    marker = root / "done.json"
    if marker.exists():
        return json.loads(marker.read_text())
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files: dict[str, list[list[str]]] = {"s2": [], "s1": [], "dem": []}
    for name, res in (("B02", 10), ("B03", 10), ("B04", 10), ("B08", 10), ("B11", 20), ("B12", 20)):
        n = size * 10 // res
        data = np.clip(_field(n, n, rng, 1500, 2500), 1, 65535).astype(np.uint16)
        data[: n // 32, : n // 8] = 0  # a nodata corner, as at a swath edge
        files["s2"].append([name, _write(root / f"s2_{name}.tif", data, UTM, from_origin(X0, Y0, res, res), 0, block,
                                                 (name,))])
    bounds = (X0, Y0 - size * 10, X0 + size * 10, Y0)
    l, b, r, t = project_bounds(UTM, "EPSG:4326", *bounds)
    res = 0.00015
    l, b, r, t = l - 10 * res, b - 10 * res, r + 10 * res, t + 10 * res
    w, h = math.ceil((r - l) / res), math.ceil((t - b) / res)
    for name, offset in (("VV", -12.0), ("VH", -19.0)):
        data = _field(h, w, rng, 4, offset)
        data[h // 2 : h // 2 + 20, w // 3 : w // 3 + 20] = np.nan
        files["s1"].append([name, _write(root / f"s1_{name}.tif", data, "EPSG:4326", from_origin(l, t, res, res),
                                         math.nan, block, (name,))])
    l, b, r, t = project_bounds(UTM, "EPSG:3035", *bounds)
    l, t = math.floor(l / 30) * 30 - 300, math.ceil(t / 30) * 30 + 300
    w, h = math.ceil((r + 300 - l) / 30), math.ceil((t - (b - 300)) / 30)
    dem = _field(h, w, rng, 200, 600)
    seam = w // 2
    for i, (c0, c1) in enumerate(((0, seam), (seam, w))):
        files["dem"].append(["elevation", _write(root / f"dem_{i}.tif", np.ascontiguousarray(dem[:, c0:c1]), "EPSG:3035",
                                                 from_origin(l + 30 * c0, t, 30, 30), -9999.0, block,
                                                 ("elevation",))])
    merged = _write(root / "dem_merged.tif", dem, "EPSG:3035", from_origin(l, t, 30, 30), -9999.0, block)
    # the same bands warped once onto the reference grid, in one file
    grid = dict(dst_transform=from_origin(X0, Y0, 10, 10), dst_crs=UTM)
    stacked = np.empty((9, size, size), np.float32)
    paths = [p for _, p in files["s2"]] + [p for _, p in files["s1"]] + [merged]
    for i, path in enumerate(paths):
        with rasterio.open(path) as src:
            band = np.full((size, size), src.nodata, np.dtype(src.dtypes[0]))
            reproject(rasterio.band(src, 1), band, src_nodata=src.nodata, dst_nodata=src.nodata,
                      resampling=Resampling.bilinear, **grid)
            stacked[i] = band
    names = tuple(n for n, _ in files["s2"] + files["s1"]) + ("elevation",)
    # labels on the reference grid (5 classes in bands of the same smooth field), for the data module
    classes = np.digitize(_field(size, size, rng, 1, 0), [-0.6, -0.2, 0.2, 0.6]).astype(np.uint8)
    manifest = {"root": str(root), "size": size, "block": block, "files": files,
                "stacked": _write(root / "stacked.tif", stacked, UTM, grid["dst_transform"], math.nan, block, names),
                "labels": _write(root / "labels.tif", classes, UTM, grid["dst_transform"], None, block)}
    marker.write_text(json.dumps(manifest))
    return manifest


def _stack(manifest: dict[str, Any], tile: int = 256) -> Any:
    from geobp.sources.bandref import BandRef
    from geobp.sources.stack import build_stack, warp_block_for

    files = manifest["files"]
    refs = {s: [BandRef(n, p, source=s) for n, p in files[s]] for s in files}
    return build_stack(refs["s2"], {"s1": refs["s1"], "dem": refs["dem"]}, warp_block=warp_block_for(tile))


def _windows(size: int, tile: int, n: int, seed: int) -> list[Any]:
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    cells = size // tile
    return [Window(int(c) * tile, int(r) * tile, tile, tile) for r, c in rng.integers(0, cells, (n, 2))]


def _rate(read: Any, windows: list[Any], warm: int) -> tuple[float, float]:
    """(tiles/s over ``windows[warm:]``, CPU ms per tile) of ``read(window)``."""
    for w in windows[:warm]:
        read(w)
    t0, c0 = time.perf_counter(), time.process_time()
    for w in windows[warm:]:
        read(w)
    n = max(len(windows) - warm, 1)
    return n / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / n


def run(cfg: Config) -> dict[str, Any]:
    import rasterio

    from geobp.sources.stack import close_datasets

    size = QUICK_SIZE if cfg.quick else SIZE
    start = time.perf_counter()
    manifest = ensure_sources(cfg.cache_dir, size, cfg.block_size)
    gen_seconds = time.perf_counter() - start
    tile = cfg.tile_size
    n, warm = min(cfg.tiles, 256), min(cfg.warmup_tiles, 32)
    names = [f"{kind}_{mb}" for mb in CACHES_MB for kind in ("stack", "stacked")]
    rates: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    stack = _stack(manifest, tile)
    for rep in range(cfg.repeats):
        windows = _windows(size, tile, warm + n, seed=rep)
        for name in names if rep % 2 == 0 else list(reversed(names)):
            kind, mb = name.rsplit("_", 1)
            # bytes: rasterio.Env passes an integer GDAL_CACHEMAX to GDALSetCacheMax (no MB shorthand)
            with rasterio.Env(GDAL_CACHEMAX=int(mb) * 2**20):
                if kind == "stack":
                    close_datasets()  # a cold start: no file open, nothing cached
                    rate, ms = _rate(stack.read, windows, warm)
                    close_datasets()
                else:
                    with rasterio.open(manifest["stacked"]) as src:
                        rate, ms = _rate(lambda w, src=src: src.read(window=w), windows, warm)
            rates[name].append(rate)
            cpu[name].append(ms)
            print(f"sources: repeat {rep} {name}: {rate:.1f} tiles/s, {ms:.2f} CPU ms/tile", flush=True)
    med = {k: median(v) for k, v in rates.items()}
    cpu_med = {k: median(v) for k, v in cpu.items()}
    ratios = {mb: med[f"stack_{mb}"] / med[f"stacked_{mb}"] for mb in CACHES_MB}
    cpu_ratios = {mb: cpu_med[f"stacked_{mb}"] / cpu_med[f"stack_{mb}"] for mb in CACHES_MB}
    headers = ["reader", "GDAL cache", "tiles/s (median)", "min-max", "tiles timed x n", "this / stacked (tiles/s)",
               "CPU ms per tile"]
    rows = []
    for mb in CACHES_MB:
        for kind, label in (("stack", "geobp `SceneStack.read` (6 + 2 + 1 bands, 4 grids)"),
                            ("stacked", "bare windowed read of the pre-stacked file (the limit)")):
            key = f"{kind}_{mb}"
            rows.append([label, f"{mb} MiB", med[key], spread(rates[key]), f"{n} x {cfg.repeats}",
                         med[key] / med[f"stacked_{mb}"], fmt(cpu_med[key])])
    small = CACHES_MB[0]
    sources_mb = _decoded_mb([p for files in manifest["files"].values() for _, p in files])
    stacked_mb = _decoded_mb([manifest["stacked"]])
    res = SectionResult(
        section="sources",
        title="Several sources on one grid",
        setup=[
            f"One scene: Sentinel-2-like B02, B03, B04, B08 at 10 m ({size} x {size} px, EPSG:32633, the reference grid) "
            "and B11, B12 at 20 m, one uint16 file per band (nodata 0); Sentinel-1-like VV and VH in EPSG:4326 at "
            "0.00015 deg, float32 dB with NaN nodata, one file each; a DEM in EPSG:3035 at 30 m as two float32 tiles "
            f"(nodata -9999) whose seam crosses the scene. Every file tiled {cfg.block_size} px, DEFLATE.",
            "geobp: `build_stack(s2, {s1, dem})` then `SceneStack.read(window)`: the 10 m bands by windowed reads; "
            "B11 + B12, VV + VH and the DEM mosaic each through one `WarpedVRT` onto the reference grid (bilinear, "
            f"{stack.warp_block} px blocks: `warp_block_for({tile})`); float32 output and the valid mask.",
            "stacked: the same 9 bands warped once onto the reference grid (`rasterio.warp.reproject`) into one "
            "float32 file (pixel-interleaved), what one would otherwise prepare by hand; the bare "
            "`src.read(window=...)` loop over it is the limit (no warp, no mask).",
            f"{n} random {tile} px block-aligned windows per repeat after {warm} warm-up reads, the same windows for "
            "every reader; one process; every reader starts with its files closed. Two GDAL block caches: "
            f"{small} MiB holds neither side's decoded files (geobp's {size} px sources decode to about "
            f"{sources_mb:.0f} MiB, the stacked file to {stacked_mb:.0f} MiB), as when "
            f"tiles come from many scenes; {CACHES_MB[-1]} MiB holds most of geobp's sources but not the stacked "
            "file. Repeats alternate the order.",
        ],
        tables=[table("Random windows of one scene, 9 bands from 3 sources", headers, rows)],
        targets=[target(f"sources: SceneStack / pre-stacked file, tiles/s, {mb} MiB cache", ratios[mb], ">=", 0.7,
                        f"{fmt(ratios[mb])}x") for mb in CACHES_MB],
        notes=[
            f"By CPU time per tile, SceneStack reads at {fmt(cpu_ratios[small])}x ({small} MiB) and "
            f"{fmt(cpu_ratios[CACHES_MB[-1]])}x ({CACHES_MB[-1]} MiB) of the stacked file's rate.",
            f"Preparing the files (made on first use, then cached) took {gen_seconds:.0f} s this run.",
        ],
        metrics={"tiles_per_s": med, "cpu_ms_per_tile": cpu_med, "repeats": rates, "ratio": ratios,
                 "cpu_ratio": cpu_ratios},
    )
    return res.to_dict()


def _decoded_mb(paths: list[str]) -> float:
    """Decoded size (MiB) of the files' pixels, all bands."""
    import rasterio

    total = 0
    for path in paths:
        with rasterio.open(path) as src:
            total += src.width * src.height * src.count * np.dtype(src.dtypes[0]).itemsize
    return total / 2**20


def main(argv: list[str] | None = None) -> int:
    """Run the section alone and print (or write) its result."""
    return run_standalone("python -m benchmarks.sources", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
