"""Section "vectorize": the streamed vectorizer against ``rasterio.features.shapes`` on the whole map, and its peak memory.

Class maps of land-cover-like patches (smooth patterns of 6 classes, with 0.2 % single-pixel
speckle, as raw model output has) are generated strip by strip into the cache folder. Each
measurement runs in a fresh process (so ``ru_maxrss`` is its own peak): the streamed vectorizer
polygonizes the map (regions with attributes, no file), against ``rasterio.features.shapes`` over
the whole map read at once, alone and with the polygons made shapely geometries (what a user of it
gets to a comparable product); then ``geobp.inference.vectorize.vectorize_class_map`` writes a
GeoPackage from each size of map, for the peak memory.
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


def class_map(folder: Path, size: int) -> Path:
    """The synthetic class map of ``size`` x ``size`` pixels (written once, in strips)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    path = folder / f"vector_{size}.tif"
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
            dst.write(patches(row, rows, size), 1, window=Window(0, row, size, rows))
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
    small, large = runs[str(sizes[0])]["gpkg"]["peak_mib"], runs[str(sizes[-1])]["gpkg"]["peak_mib"]
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
        setup=["Synthetic class maps (6 classes in smooth patches, 0.2% single-pixel speckle), uint8 GeoTIFF tiled 256; "
               "each measurement in a fresh process, peak memory its `ru_maxrss`.",
               "`streamed`: geobp's strips (16 Mi pixels each) through `RegionStream` (polygons with attributes, no file); "
               "`shapes`: `rasterio.features.shapes(connectivity=4)` over the whole map read at once; `+ shapely`: its "
               "polygons made shapely geometries; `gpkg`: `vectorize_class_map` writing a GeoPackage.",
               f"On {machine['cpu']} ({machine['usable_cores']} usable cores)."],
        tables=[table("Speed against the whole map at once (seconds)", ["map", "polygons", "streamed", "streamed Mpx/s", "shapes",
                                                                          "shapes + shapely", "speed / shapes", "speed / shapes + shapely",
                                                                          "load (before-after streamed)"], speed_rows),
                table("Writing a GeoPackage, and peak memory", ["map", "polygons", "seconds", "Mpx/s", "peak MiB", "shapes' peak MiB"], memory_rows)],
        targets=[target(f"streamed speed / shapes on the whole map, the least over {', '.join(s + '^2' for s in compared)}", speed, ">=", 0.8,
                        f"{fmt(speed)} (at {slowest}^2)"),
                 target(f"peak memory {sizes[-1]}^2 / {sizes[0]}^2 (gpkg)", large / small, "<=", 1.2,
                        f"{fmt(large)} / {fmt(small)} MiB = {fmt(large / small)}")],
        notes=[f"Against shapes with its polygons made shapely geometries the streamed vectorizer runs at {fmt(speed_shapely)}x "
               "its speed: making shapely polygons of each strip's shapes, stitching the regions cut by strip edges and their "
               "attributes are the difference against shapes alone.",
               *([f"The whole-map baseline runs up to {biggest_whole}^2 only: beyond, `shapes` on the whole map needs about "
                  f"{fmt(runs[biggest_whole]['shapes']['peak_mib'] * 4 / 1024)} GiB (4 times its peak at {biggest_whole}^2), more than "
                  "this shared machine can give; the streamed vectorizer runs at every size."] if len(compared) < len(sizes) else []),
               "Each measurement's load average (1 min, before and after) is in the results file: on 2 cores shared with other "
               "work, one measurement repeated minutes apart moved by 20% or more while this section was written."],
        metrics={"runs": runs, "speed_vs_shapes": ratios, "speed_vs_shapes_least": speed,
                 "speed_vs_shapes_shapely": speed_shapely, "memory_ratio": large / small},
    )
    return result.to_dict()


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
