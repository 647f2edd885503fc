"""Section "vectorize": the streamed vectorizer against ``rasterio.features.shapes`` on the whole map, and its peak memory.

Two kinds of synthetic class map (6 classes, with 0.2 % single-pixel speckle, as raw model output
has) are generated strip by strip into the cache folder:

- ``spanning`` (:func:`patches`): smooth sums of sines whose largest regions grow with the map and
  span it, the worst case for a streamed vectorizer (a region open across every strip edge);
- ``bounded`` (:func:`fields`): regions of bounded size at any map size, as land cover has (fields,
  buildings, patches of forest): warped cells of 128 px, each of a class drawn on its own (a region
  is a cluster of a few cells), and small discs in 4 % of the 16 px cells. Every pixel is a function
  of its coordinates alone, so the smaller maps are the top-left corners of the larger ones, and
  the statistics are the same at every size.

Each measurement runs in a fresh process (so ``ru_maxrss`` is its own peak): the streamed vectorizer
polygonizes the spanning map (regions with attributes, no file), against ``rasterio.features.shapes``
over the whole map read at once, alone and with the polygons made shapely geometries (what a user of
it gets to a comparable product); then ``geobp.inference.vectorize.vectorize_class_map`` writes a
GeoPackage from each size of both maps, for the peak memory (the target is on the bounded map).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, Config, SectionResult, fmt, machine_info, table, target

#: Map sizes (pixels a side) of the full run and of ``--quick``; the whole-map baseline stops at WHOLE_MAX:
#: ``shapes`` on the whole map peaks near 4 GiB at 16384^2, so 32768^2 (near 16 GiB) is beyond a 24 GiB machine
#: shared with other work. The streamed vectorizer runs at every size.
SIZES, QUICK_SIZES = (4096, 8192, 16384, 32768), (512, 1024)
WHOLE_MAX = 16384


def patches(row0: int, rows: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 classes 0..5 of rows ``row0`` onwards of the synthetic map (the same whatever the strips)."""
    rng = np.random.default_rng(seed)
    freq, phase = rng.uniform(0.005, 0.03, (4, 2)), rng.uniform(0, 2 * np.pi, 4)
    y = np.arange(row0, row0 + rows, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None]
    value = sum(np.sin(freq[i, 0] * y + phase[i]) * np.cos(freq[i, 1] * x + 2 * phase[i]) for i in range(4))
    data = np.clip(((value + 2) * 1.5).astype(np.int16), 0, 5).astype(np.uint8)
    noise = np.random.default_rng([seed, row0])
    speckle = noise.random((rows, width)) < 0.002
    data[speckle] = noise.integers(0, 6, int(speckle.sum()))
    return data


#: The bounded map: cells of CELL px whose edges are moved by up to WARP px (value noise on a lattice of
#: WARP_STEP px), discs of radius 2-6 px in 4 % of the BLOB px cells, speckle SPECKLE of the pixels.
CELL, WARP_STEP, WARP, BLOB, SPECKLE = 128, 64, 40.0, 16, 0.002


def _hash(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """uint32 hash of integer lattice coordinates: the same value whichever strip asks for it."""
    h = ((np.asarray(a, np.int64).astype(np.uint32) * np.uint32(0x9E3779B1))
         ^ (np.asarray(b, np.int64).astype(np.uint32) * np.uint32(0x85EBCA77)) ^ np.uint32(seed * 0xC2B2AE3D & 0xFFFFFFFF))
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return h


def _warp(y: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    """float32 value noise in [-WARP, WARP] at rows ``y`` and columns ``x``, smooth at the WARP_STEP scale."""
    iy, ix = y // WARP_STEP, x // WARP_STEP
    fy, fx = (y % WARP_STEP) / WARP_STEP, (x % WARP_STEP) / WARP_STEP
    fy, fx = (fy * fy * (3 - 2 * fy)).astype(np.float32), (fx * fx * (3 - 2 * fx)).astype(np.float32)
    ly, lx = np.arange(iy[0], iy[-1] + 2), np.arange(ix[0], ix[-1] + 2)
    lattice = (_hash(ly[:, None], lx[None], seed) >> np.uint32(8)).astype(np.float32) * np.float32(2 * WARP / 2**24) - np.float32(WARP)
    along = lattice[:, ix - lx[0]] * (1 - fx) + lattice[:, ix - lx[0] + 1] * fx
    out = along[iy - ly[0]]
    out *= (1 - fy)[:, None]
    out += along[iy - ly[0] + 1] * fy[:, None]
    return out


def fields(row0: int, rows: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 classes 0..5 of rows ``row0`` onwards of the bounded map (each pixel a function of its coordinates)."""
    y, x = np.arange(row0, row0 + rows), np.arange(width)
    wy = _warp(y, x, seed + 1)
    wy += y[:, None].astype(np.float32)
    wy *= np.float32(1 / CELL)
    wx = _warp(y, x, seed + 2)
    wx += x[None].astype(np.float32)
    wx *= np.float32(1 / CELL)
    cell_y, cell_x = np.floor(wy, out=wy).astype(np.int32), np.floor(wx, out=wx).astype(np.int32)
    del wy, wx
    y0, x0 = int((row0 - WARP) // CELL) - 1, int(-WARP // CELL) - 1
    ty, tx = np.arange(y0, int((row0 + rows + WARP) // CELL) + 2), np.arange(x0, int((width + WARP) // CELL) + 2)
    table = (_hash(ty[:, None], tx[None], seed) % np.uint32(6)).astype(np.uint8)
    cell_y -= np.int32(y0)
    cell_y *= np.int32(len(tx))
    cell_y += cell_x
    cell_y -= np.int32(x0)
    data = np.take(table.ravel(), cell_y)
    del cell_y, cell_x
    # discs ("buildings"), each inside its own BLOB cell, so two never touch
    by, bx = np.arange(row0 // BLOB, -(-(row0 + rows) // BLOB)), np.arange(-(-width // BLOB))
    h = _hash(by[:, None], bx[None], seed + 3)
    for i, j in zip(*np.nonzero((h & np.uint32(1023)) < 41)):
        v = int(h[i, j])
        r = 2 + (v >> 10) % 5
        cy, cx = int(by[i]) * BLOB + 6 + (v >> 13) % 4, int(bx[j]) * BLOB + 6 + (v >> 15) % 4
        dy, dx = np.ogrid[-r:r + 1, -r:r + 1]
        disc = dy * dy + dx * dx <= r * r
        top, bottom, right = max(cy - r, row0), min(cy + r + 1, row0 + rows), min(cx + r + 1, width)
        if top < bottom and cx - r < right:
            data[top - row0:bottom - row0, cx - r:right][disc[top - cy + r:bottom - cy + r, :right - cx + r]] = (v >> 20) % 6
    # speckle, drawn per 256 px block from the block's own seed (the same whatever the strips and the map size)
    for block_y in range(row0 // 256, -(-(row0 + rows) // 256)):
        for block_x in range(-(-width // 256)):
            rng = np.random.default_rng([seed, block_y, block_x])
            n = rng.binomial(256 * 256, SPECKLE)
            py, px = block_y * 256 + rng.integers(0, 256, n), block_x * 256 + rng.integers(0, 256, n)
            value = rng.integers(0, 6, n).astype(np.uint8)
            inside = (py >= row0) & (py < row0 + rows) & (px < width)
            data[py[inside] - row0, px[inside]] = value[inside]
    return data


#: The synthetic maps by kind, and the file name of each (the spanning map keeps its first name, so caches stay valid).
MAPS = {"spanning": (patches, "vector_{size}.tif"), "bounded": (fields, "vector_bounded_{size}.tif")}


def class_map(folder: Path, size: int, kind: str = "spanning") -> Path:
    """The synthetic class map of ``size`` x ``size`` pixels of ``kind`` (a key of :data:`MAPS`; written once, in strips)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    generate, name = MAPS[kind]
    path = folder / name.format(size=size)
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32633", nodata=255,
                   transform=from_origin(500000, 5000000, 10, 10), tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", BIGTIFF="IF_SAFER")
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, 1024):
            rows = min(1024, size - row)
            dst.write(generate(row, rows, size), 1, window=Window(0, row, size, rows))
        dst.update_tags(CLASS_NAMES="water,forest,grass,crop,urban,bare")
    tmp.rename(path)
    return path


def child(mode: str, path: str) -> dict[str, Any]:
    """One measurement in this process: seconds, polygons and peak resident memory (MiB)."""
    import resource

    import rasterio
    import rasterio.features
    import shapely

    from geobp.inference.regions import RegionStream
    from geobp.inference.vectorize import VectorOptions, read_strips, vectorize_class_map

    start = time.perf_counter()
    if mode == "streamed":
        options, count = VectorOptions(), 0
        with rasterio.open(path) as src:
            stream = RegionStream(src.width)
            for classes, keep, _ in read_strips(src, options):
                count += len(stream.add(classes, keep))
            count += len(stream.finish())
    elif mode in ("shapes", "shapes+shapely"):
        with rasterio.open(path) as src:
            data = src.read(1)
        polygons = list(rasterio.features.shapes(data, mask=data != 255, connectivity=4))
        if mode == "shapes+shapely":
            polygons = [shapely.geometry.shape(g) for g, _ in polygons]
        count = len(polygons)
    else:  # gpkg: the whole command's work, file included
        out = Path(path).with_suffix(".gpkg")
        count = vectorize_class_map(path, out, VectorOptions(overwrite=True)).polygons
        out.unlink()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "polygons": count, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(mode: str, path: Path) -> dict[str, Any]:
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.vectorize", mode, str(path)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {path}: {proc.stderr.strip()[-500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # before and after
    print(f"vectorize: {mode} {path.name}: {result}", flush=True)
    return result


def run(cfg: Config) -> dict[str, Any]:
    sizes = QUICK_SIZES if cfg.quick else SIZES
    folder = Path(cfg.cache_dir) / "vectorize"
    runs: dict[str, dict[str, Any]] = {}
    speed_rows, memory_rows = [], []
    for size in sizes:
        path = class_map(folder, size)
        modes = ["streamed", "shapes", "shapes+shapely", "gpkg"] if size <= WHOLE_MAX else ["streamed", "gpkg"]
        runs[str(size)] = {mode: measure(mode, path) for mode in modes}
        r = runs[str(size)]
        mpx = size * size / 1e6
        whole = "shapes" in r
        speed_rows.append([f"{size}^2", r["streamed"]["polygons"], r["streamed"]["seconds"], mpx / r["streamed"]["seconds"],
                           r["shapes"]["seconds"] if whole else None, r["shapes+shapely"]["seconds"] if whole else None,
                           r["shapes"]["seconds"] / r["streamed"]["seconds"] if whole else None,
                           r["shapes+shapely"]["seconds"] / r["streamed"]["seconds"] if whole else None,
                           "{:.1f}-{:.1f}".format(*r["streamed"]["load_1min"])])
        memory_rows.append([f"{size}^2", r["gpkg"]["polygons"], r["gpkg"]["seconds"], mpx / r["gpkg"]["seconds"], r["gpkg"]["peak_mib"],
                            r["shapes"]["peak_mib"] if "shapes" in r else None])
    bounded: dict[str, dict[str, Any]] = {}
    bounded_rows = []
    for size in sizes:
        b = bounded[str(size)] = measure("gpkg", class_map(folder, size, "bounded"))
        spanning = runs[str(size)]["gpkg"]
        bounded_rows.append([f"{size}^2", b["polygons"], b["seconds"], size * size / 1e6 / b["seconds"], b["peak_mib"],
                             b["peak_mib"] / bounded[str(sizes[0])]["peak_mib"], spanning["peak_mib"],
                             spanning["peak_mib"] / runs[str(sizes[0])]["gpkg"]["peak_mib"], "{:.1f}-{:.1f}".format(*b["load_1min"])])
    small, large = bounded[str(sizes[0])]["peak_mib"], bounded[str(sizes[-1])]["peak_mib"]
    spanning_small, spanning_large = runs[str(sizes[0])]["gpkg"]["peak_mib"], runs[str(sizes[-1])]["gpkg"]["peak_mib"]
    compared = [str(s) for s in sizes if s <= WHOLE_MAX]
    ratios = {s: runs[s]["shapes"]["seconds"] / runs[s]["streamed"]["seconds"] for s in compared}
    slowest = min(ratios, key=ratios.get)
    speed = ratios[slowest]
    biggest_whole = compared[-1]
    speed_shapely = runs[biggest_whole]["shapes+shapely"]["seconds"] / runs[biggest_whole]["streamed"]["seconds"]
    machine = machine_info()
    result = SectionResult(
        section="vectorize",
        title="Polygons of a class map",
        setup=["Synthetic class maps of 6 classes with 0.2% single-pixel speckle, uint8 GeoTIFF tiled 256, of two kinds. "
               "*Spanning*: smooth sums of sines whose largest regions grow with the map and span it (the worst case: regions "
               f"open across every strip edge). *Bounded*: cells of {CELL} px with edges moved by up to {WARP:g} px of smooth "
               f"noise, each cell's class drawn on its own (a region is a cluster of a few cells), discs of radius 2-6 px in 4% "
               f"of the {BLOB} px cells: regions of bounded size at any map size, as fields, buildings and patches of forest "
               "are; each pixel is a function of its coordinates, so a smaller map is the top-left corner of a larger one.",
               "Each measurement in a fresh process, peak memory its `ru_maxrss`.",
               "`streamed`: geobp's strips (16 Mi pixels each) through `RegionStream` (polygons with attributes, no file); "
               "`shapes`: `rasterio.features.shapes(connectivity=4)` over the whole map read at once; `+ shapely`: its "
               "polygons made shapely geometries; `gpkg`: `vectorize_class_map` writing a GeoPackage.",
               f"On {machine['cpu']} ({machine['usable_cores']} usable cores)."],
        tables=[table("Speed against the whole map at once (seconds), spanning map", ["map", "polygons", "streamed", "streamed Mpx/s", "shapes",
                                                                          "shapes + shapely", "speed / shapes", "speed / shapes + shapely",
                                                                          "load (before-after streamed)"], speed_rows),
                table("Writing a GeoPackage, and peak memory, spanning map (the worst case)",
                      ["map", "polygons", "seconds", "Mpx/s", "peak MiB", "shapes' peak MiB"], memory_rows),
                table("Peak memory writing a GeoPackage: bounded regions (the target) against spanning ones",
                      ["map", "polygons (bounded)", "seconds", "Mpx/s", "peak MiB", f"/ {sizes[0]}^2", "spanning: peak MiB",
                       f"spanning: / {sizes[0]}^2", "load (before-after bounded)"], bounded_rows)],
        targets=[target(f"streamed speed / shapes on the whole map, the least over {', '.join(s + '^2' for s in compared)}", speed, ">=", 0.8,
                        f"{fmt(speed)} (at {slowest}^2)"),
                 target(f"peak memory {sizes[-1]}^2 / {sizes[0]}^2 (gpkg), bounded regions", large / small, "<=", 1.2,
                        f"{fmt(large)} / {fmt(small)} MiB = {fmt(large / small)}")],
        notes=[f"Against shapes with its polygons made shapely geometries the streamed vectorizer runs at {fmt(speed_shapely)}x "
               "its speed: making shapely polygons of each strip's shapes, stitching the regions cut by strip edges and their "
               "attributes are the difference against shapes alone.",
               *([f"The whole-map baseline runs up to {biggest_whole}^2 only: beyond, `shapes` on the whole map needs about "
                  f"{fmt(runs[biggest_whole]['shapes']['peak_mib'] * 4 / 1024)} GiB (4 times its peak at {biggest_whole}^2), more than "
                  "this shared machine can give; the streamed vectorizer runs at every size."] if len(compared) < len(sizes) else []),
               f"Worst case, regions spanning the map: the peak grows {fmt(spanning_large / spanning_small)}x from {sizes[0]}^2 to "
               f"{sizes[-1]}^2 ({fmt(spanning_small)} to {fmt(spanning_large)} MiB), as the streamed vectorizer holds every region "
               "still open at a strip edge, and there they reach across the map. The memory target is stated on the bounded map, "
               "whose regions have the same sizes at every map size, as a land-cover map's do.",
               "Each measurement's load average (1 min, before and after) is in the results file: on 2 cores shared with other "
               "work, one measurement repeated minutes apart moved by 20% or more while this section was written."],
        metrics={"runs": runs, "speed_vs_shapes": ratios, "speed_vs_shapes_least": speed,
                 "speed_vs_shapes_shapely": speed_shapely,
                 "bounded_runs": bounded, "memory_ratio": large / small, "memory_ratio_spanning": spanning_large / spanning_small},
    )
    return result.to_dict()


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
