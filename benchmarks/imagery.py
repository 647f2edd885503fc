"""Section "imagery": several local sources through the data module, against the same bands pre-stacked.

The scene of section ``sources`` (:func:`benchmarks.sources.ensure_sources`): Sentinel-2-like
per-band files at 10 m and 20 m (the reference grid) and Sentinel-1-like VV and VH in EPSG:4326
(float32, NaN nodata), each given as a STAC item written beside them (one asset per band file, as
published), and a DEM of two EPSG:3035 tiles,
with labels on the reference grid. Three loaders of random training tiles, each with 0 and 2
DataLoader workers:

- ``GeoTiffDataModule(images={s2: item, s1: {images: item, resampling: bilinear}, dem: [tiles]},
  labels=..., bands=[9 bands]).train_dataloader()``: the scene as published, stacked at read time;
- the same data module over the 9 bands pre-stacked on the reference grid in one file;
- the bare loop: a DataLoader reading, from the pre-stacked file and the labels, the very windows
  the pre-stacked data module's sampler draws (the limit: one windowed read, no checks, no mask).

Batches are iterated as the loader yields them (compact raw tiles, uint8 labels); tiles/s are
counted after a warm-up. Standalone: ``python -m benchmarks.imagery [--quick] [--json PATH]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Config, SectionResult, fmt, median, run_standalone, spread, table, target
from benchmarks.sources import QUICK_SIZE, SIZE, ensure_sources

#: The nine bands, in the order the model sees them.
BANDS = ["s2:B02", "s2:B03", "s2:B04", "s2:B08", "s2:B11", "s2:B12", "s1:VV", "s1:VH", "dem:elevation"]
#: DataLoader workers of the two runs of every loader.
WORKERS = (0, 2)
CLASSES = 5


def write_item(path: Path, item_id: str, bands: list[tuple[str, str]], hrefs: dict[str, str] | None = None) -> str:
    """A static STAC item with one asset per band file (``bands``: (name, file)), as published.

    ``hrefs`` (band -> href) points the assets elsewhere (a server's URLs); by default at the files.
    Footprint, CRS, transform, dtype and nodata are read from the files.
    """
    import rasterio

    from geobp.raster import project_bounds

    assets, boxes = {}, []
    for name, file in bands:
        with rasterio.open(file) as src:
            epsg, (a, b, c, d, e, f) = src.crs.to_epsg(), tuple(src.transform)[:6]
            boxes.append(project_bounds(src.crs.to_string(), "EPSG:4326", *src.bounds))
            nodata = "nan" if src.nodata is not None and src.nodata != src.nodata else src.nodata  # STAC: NaN as "nan"
            assets[name] = {
                "href": (hrefs or {}).get(name, str(file)), "type": "image/tiff; application=geotiff",
                "roles": ["data"], "proj:epsg": epsg, "proj:shape": [src.height, src.width],
                "proj:transform": [a, b, c, d, e, f], "eo:bands": [{"name": name}],
                "raster:bands": [{"nodata": nodata, "data_type": src.dtypes[0]}],
            }
    l, bot = min(x[0] for x in boxes), min(x[1] for x in boxes)
    r, t = max(x[2] for x in boxes), max(x[3] for x in boxes)
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id, "bbox": [l, bot, r, t],
        "geometry": {"type": "Polygon", "coordinates": [[[l, bot], [r, bot], [r, t], [l, t], [l, bot]]]},
        "properties": {"datetime": "2026-06-01T10:00:00Z"},
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/raster/v1.1.0/schema.json"],
        "links": [], "assets": assets,
    }
    path.write_text(json.dumps(item))
    return str(path)


def sources_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """``data.images`` of the scene as published: Sentinel-2 and Sentinel-1 as STAC items (one file per
    band), the S2 item first (the reference grid), and the DEM's two tiles."""
    root, files = Path(manifest["root"]), manifest["files"]
    return {"s2": write_item(root / "s2_item.json", "S2_BENCH", files["s2"]),
            "s1": {"images": write_item(root / "s1_item.json", "S1_BENCH", files["s1"]), "resampling": "bilinear"},
            "dem": [p for _, p in files["dem"]]}


def datamodule(images: Any, labels: str, cfg: Config, *, bands: list[str] | None, workers: int, tiles: int,
               seed: int, cache_dir: str) -> Any:
    """The data module as a user configures it; its statistics are computed (or read from the cache) here."""
    from geobp.data.datamodule import GeoTiffDataModule

    dm = GeoTiffDataModule(images=images, labels=labels, bands=bands, num_classes=CLASSES, tile_size=cfg.tile_size,
                           batch_size=cfg.batch_size, num_workers=workers, tiles_per_epoch=tiles, seed=seed,
                           augment=False, val_fraction=0.0, test_fraction=0.0, cache_dir=cache_dir)
    dm.preprocessing  # noqa: B018 - the statistics pass, kept out of the timing
    return dm


class WindowReads:
    """A Dataset reading pre-drawn windows (row, col) of one image file and its labels; nothing else."""

    def __init__(self, image: str, labels: str, windows: np.ndarray, tile: int) -> None:
        self.image, self.labels, self.windows, self.tile = image, labels, windows, tile
        self._handles: dict[str, Any] = {}

    def _open(self, path: str) -> Any:
        import rasterio

        if path not in self._handles:  # opened in the worker that reads
            self._handles[path] = rasterio.open(path)
        return self._handles[path]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch
        from rasterio.windows import Window

        r, c = (int(v) for v in self.windows[i])
        w = Window(c, r, self.tile, self.tile)
        return {"raw": torch.from_numpy(self._open(self.image).read(window=w)),
                "mask": torch.from_numpy(self._open(self.labels).read(1, window=w))}


def sampler_windows(dm: Any) -> np.ndarray:
    """The (row, col) origins of the tiles the data module's training sampler draws."""
    return np.array([(s.row, s.col) for s in dm.train_dataloader().sampler], dtype=np.int64)


def run(cfg: Config) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from benchmarks.loading import time_loader
    from geobp.sources.stack import warp_block_for

    size = QUICK_SIZE if cfg.quick else SIZE
    start = time.perf_counter()
    manifest = ensure_sources(cfg.cache_dir, size, cfg.block_size)
    root = Path(manifest["root"])
    gen_seconds = time.perf_counter() - start
    bs = cfg.batch_size
    warm, timed = max(1, min(cfg.warmup_tiles, 32) // bs), max(1, min(cfg.tiles, 320) // bs)
    total = (warm + timed) * bs
    cache = str(root / "dmcache")
    spec = sources_spec(manifest)
    labels = manifest["labels"]

    def geobp(images: Any, bands: list[str] | None) -> Callable[[int, int], Iterable[dict[str, Any]]]:
        return lambda seed, workers: datamodule(images, labels, cfg, bands=bands, workers=workers, tiles=total,
                                                seed=seed, cache_dir=cache).train_dataloader()

    def bare(seed: int, workers: int) -> DataLoader:
        dm = datamodule(manifest["stacked"], labels, cfg, bands=None, workers=workers, tiles=total, seed=seed,
                        cache_dir=cache)
        return DataLoader(WindowReads(manifest["stacked"], labels, sampler_windows(dm), cfg.tile_size), batch_size=bs,
                          num_workers=workers)

    loaders = {"sources": geobp(spec, BANDS), "stacked": geobp(manifest["stacked"], None), "bare": bare}
    built = time.perf_counter()
    for make in loaders.values():  # statistics and headers into the cache, before any timing
        make(0, 0)
    setup_seconds = time.perf_counter() - built
    names = [f"{kind}_{w}" for w in WORKERS for kind in loaders]
    rates: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(cfg.repeats):
        for name in names if rep % 2 == 0 else list(reversed(names)):
            kind, w = name.rsplit("_", 1)
            m = time_loader(lambda: loaders[kind](rep, int(w)), warm, timed, key="raw")
            rates[name].append(m["tiles_per_s"])
            cpu[name].append(m["cpu_ms_per_tile"])
            print(f"imagery: repeat {rep} {name}: {m['tiles_per_s']:.1f} tiles/s, {m['cpu_ms_per_tile']:.2f} CPU ms/tile",
                  flush=True)
    med = {k: median(v) for k, v in rates.items()}
    cpu_med = {k: median(v) for k, v in cpu.items()}
    ratios = {w: med[f"sources_{w}"] / med[f"stacked_{w}"] for w in WORKERS}
    labels_of = {"sources": "geobp data module, 3 sources as published (6 + 2 + 1 bands, 4 grids)",
                 "stacked": "geobp data module, the 9 bands pre-stacked in one file",
                 "bare": "bare loop over the pre-stacked file (the limit)"}
    headers = ["loader", "workers", "tiles/s (median)", "min-max", "tiles timed x n", "this / pre-stacked data module",
               "CPU ms per tile"]
    rows = [[labels_of[name.rsplit("_", 1)[0]], name.rsplit("_", 1)[1], med[name], spread(rates[name]),
             f"{timed * bs} x {cfg.repeats}", med[name] / med[f"stacked_{name.rsplit('_', 1)[1]}"], fmt(cpu_med[name])]
            for name in names]
    res = SectionResult(
        section="imagery",
        title="Several local sources through the data module",
        setup=[
            f"The scene of section 4b ({size} x {size} px at 10 m): Sentinel-2-like B02, B03, B04, B08 (10 m) and "
            "B11, B12 (20 m), one uint16 file per band, as a STAC item (the reference grid); Sentinel-1-like VV and VH "
            "(EPSG:4326, float32, NaN nodata, one file each, as a STAC item, bilinear); a DEM of two EPSG:3035 tiles (float32, "
            f"nodata -9999); uint8 labels on the reference grid. Files tiled {cfg.block_size} px, DEFLATE.",
            "geobp: `GeoTiffDataModule(images={s2: s2_item.json, s1: {images: s1_item.json, resampling: bilinear}, "
            "dem: [tile_0, tile_1]}, labels=..., bands=[s2:B02 ... dem:elevation]).train_dataloader()`; against the "
            "same data module over the 9 bands warped once onto the reference grid into one float32 file "
            "(`images=stacked.tif`), and the bare loop: a DataLoader reading from that file and the labels the very "
            "windows its sampler draws (`src.read(window=...)`, nothing else). The bands on other grids are warped "
            f"in blocks of {warp_block_for(cfg.tile_size)} px (`warp_block_for({cfg.tile_size})`): training tiles lie "
            "at any offset inside a reference block.",
            f"Random {cfg.tile_size} px tiles, batches of {bs}; {warm * bs} warm-up tiles (worker start, file "
            f"opening), then {timed * bs} timed tiles per repeat, iterated as the loader yields them (compact raw "
            "tiles, uint8 labels); each repeat builds the data module and starts fresh workers; repeats alternate "
            f"the order. GDAL block cache {cfg.gdal_cache_mb} MiB per process (`GDAL_CACHEMAX`): it holds the "
            "sources' decoded blocks (about 55 MiB at full size) but not the pre-stacked file's (144 MiB).",
            "CPU ms per tile: CPU time of the main process and its workers over the loader's life (warm-up "
            "included), per tile read.",
        ],
        tables=[table("Random training tiles, 9 bands from 3 sources", headers, rows)],
        targets=[target(f"imagery: several sources / pre-stacked file, data module tiles/s, {w} workers", ratios[w],
                        ">=", 0.7, f"{fmt(ratios[w])}x") for w in WORKERS],
        notes=[
            "The multi-source data module over the bare loop: " + ", ".join(
                f"{fmt(med[f'sources_{w}'] / med[f'bare_{w}'])}x with {w} workers" for w in WORKERS) + "; the "
            "pre-stacked data module: " + ", ".join(
                f"{fmt(med[f'stacked_{w}'] / med[f'bare_{w}'])}x" for w in WORKERS) + ".",
            f"Preparing the files took {gen_seconds:.0f} s (made on first use, then cached); the statistics "
            f"and header passes of the three data modules {setup_seconds:.0f} s (cached, outside the timing).",
        ],
        metrics={"tiles_per_s": med, "cpu_ms_per_tile": cpu_med, "repeats": rates, "ratio": ratios},
    )
    return res.to_dict()


def main(argv: list[str] | None = None) -> int:
    """Run the section alone and print (or write) its result."""
    return run_standalone("python -m benchmarks.imagery", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
