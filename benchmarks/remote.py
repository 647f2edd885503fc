"""Section "remote": training and inference over HTTP, in bytes and requests, and under latency.

The Sentinel-2-like bands of section ``sources`` (B02, B03, B04, B08 at 10 m, B11 and B12 at 20 m,
uint16) are copied once as Cloud-Optimized GeoTIFFs (GDAL's COG driver: ``block_size`` px tiles,
DEFLATE with a predictor, overviews) and served by the test suite's Range server
(:mod:`tests.sources.servers`, a subprocess counting requests and bytes). ``data.images`` is a
STAC item whose assets point at the server's URLs; the labels are local.

- Bytes: one epoch of random training tiles through ``GeoTiffDataModule.train_dataloader()``
  (0 and 2 workers) and one ``predict_raster`` of the scene (a 1x1 convolution), against the
  compressed bytes of the blocks those reads need (``src.block_size``, summed over the unique
  blocks the tile windows touch, per reading process) plus each file's header (the bytes before its
  first tile: the IFDs). Requests per tile from the server's counter.
- Latency: the server answers every request 20 ms late; training tiles/s with 2 workers over HTTP
  against the same COGs on local disk.

Every measurement runs in a fresh process (spawned), so that no file handle or GDAL cache of
another run (GDAL keeps downloaded ranges per process) serves its reads; the data module's own
cache (headers, statistics) is filled beforehand, as on a second run.
Standalone: ``python -m benchmarks.remote [--quick] [--json PATH]``.
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Config, SectionResult, fmt, median, run_standalone, spread, table, target
from benchmarks.imagery import datamodule, write_item
from benchmarks.sources import QUICK_SIZE, SIZE, ensure_sources

#: Added latency of every HTTP answer in the latency runs (seconds).
LATENCY = 0.02
#: Pixels around a warped band's source window that bilinear resampling reads (kernel and rounding).
WARP_MARGIN = 2


def ensure_cogs(manifest: dict[str, Any], block: int) -> Path:
    """The Sentinel-2 bands as COGs in ``<root>/cogs`` (made once)."""
    import rasterio.shutil

    folder = Path(manifest["root"]) / "cogs"
    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, path in manifest["files"]["s2"]:
        rasterio.shutil.copy(path, folder / f"{name}.tif", driver="COG", BLOCKSIZE=block, COMPRESS="DEFLATE",
                             PREDICTOR="YES")
    (folder / "done").write_text("")
    return folder


# ----- what the reads need --------------------------------------------------------------------


def _offset(src: Any) -> int:
    return int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))


def file_layout(path: Path) -> dict[str, Any]:
    """A COG's header bytes (before its first tile of any level), block shape, resolution and block sizes."""
    import rasterio

    with rasterio.open(path) as src:
        first = _offset(src)
        for level in range(len(src.overviews(1))):
            with rasterio.open(path, overview_level=level) as ovr:
                first = min(first, _offset(ovr))
        bh, bw = src.block_shapes[0]
        rows, cols = math.ceil(src.height / bh), math.ceil(src.width / bw)
        sizes = {(i, j): sum(src.block_size(b, i, j) for b in src.indexes) for i in range(rows) for j in range(cols)}
        return {"header": first, "block": (bh, bw), "res": src.res[0], "shape": (src.height, src.width),
                "sizes": sizes}


def blocks_of(window: tuple[int, int, int], layout: dict[str, Any], ref_res: float) -> set[tuple[int, int]]:
    """Blocks of a file that a tile window (row, col, size on the reference grid) reads."""
    row, col, size = window
    k = layout["res"] / ref_res
    margin = 0 if k == 1 else WARP_MARGIN
    (bh, bw), (h, w) = layout["block"], layout["shape"]
    r0, r1 = max(int(row / k) - margin, 0), min(math.ceil((row + size) / k) + margin, h)
    c0, c1 = max(int(col / k) - margin, 0), min(math.ceil((col + size) / k) + margin, w)
    return {(i, j) for i in range(r0 // bh, (r1 - 1) // bh + 1) for j in range(c0 // bw, (c1 - 1) // bw + 1)}


def needed_bytes(layouts: list[dict[str, Any]], windows: list[tuple[int, int, int]], ref_res: float) -> int:
    """Headers plus the compressed bytes of the unique blocks ``windows`` touch, over ``layouts``' files."""
    total = 0
    for layout in layouts:
        blocks = set().union(*(blocks_of(w, layout, ref_res) for w in windows)) if windows else set()
        total += layout["header"] + sum(layout["sizes"][b] for b in blocks)
    return total


# ----- measurements, each in a fresh process ------------------------------------------------------


def _call(queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as err:  # noqa: BLE001 - reported in the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def fresh(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new spawned process (not daemonic: DataLoader workers may start in it)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call, args=(queue, fn, args))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def _server(url: str) -> Any:
    """The counters of the server at ``url``, which another process started."""
    from tests.sources.servers import ServerProcess

    return ServerProcess(process=None, port=int(url.rsplit(":", 1)[1]))  # type: ignore[arg-type]


def epoch_reads(images: str, labels: str, cfg_json: str, workers: int, tiles: int, seed: int, cache: str,
                url: str) -> dict[str, Any]:
    """One epoch of training tiles: the windows read (with their batch), bytes and requests served."""
    cfg = Config.from_json(cfg_json)
    dm = datamodule(images, labels, cfg, bands=None, workers=workers, tiles=tiles, seed=seed, cache_dir=cache)
    loader = dm.train_dataloader()
    server = _server(url)
    setup = sum(server.stats()["bytes"].values())  # headers (the statistics come from the data module's cache)
    server.reset()
    windows = []
    for i, batch in enumerate(loader):
        windows += [(i, int(w[0]), int(w[1])) for w in batch["window"]]  # (batch, row, col)
    stats = server.stats()
    return {"windows": windows, "bytes": sum(stats["bytes"].values()), "requests": sum(stats["requests"].values()),
            "setup_bytes": setup}


def fill_cache(images: str, labels: str, cfg_json: str, cache: str) -> None:
    """Build the data module and its training loader once: its cache (headers, statistics, valid cells) is
    filled for the measurements."""
    cfg = Config.from_json(cfg_json)
    datamodule(images, labels, cfg, bands=None, workers=0, tiles=cfg.batch_size, seed=0, cache_dir=cache).train_dataloader()


def infer_reads(images: str, labels: str, cfg_json: str, cache: str, url: str, out: str) -> dict[str, Any]:
    """One ``predict_raster`` of the scene: bytes and requests served, tiles predicted."""
    import torch

    from geobp.inference.predict import predict_raster

    cfg = Config.from_json(cfg_json)
    dm = datamodule(images, labels, cfg, bands=None, workers=0, tiles=cfg.batch_size, seed=0, cache_dir=cache)
    server = _server(url)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(len(dm.band_names), 5, 1)
    setup = sum(server.stats()["bytes"].values())
    server.reset()
    predict_raster(model, dm.scenes[0].image.path, Path(out) / "scene_classes.tif", dm.preprocessing,
                   tile_size=cfg.tile_size, overlap=cfg.infer_overlap, batch_size=cfg.infer_batch, device="cpu",
                   progress=False)
    stats = server.stats()
    return {"bytes": sum(stats["bytes"].values()), "requests": sum(stats["requests"].values()), "setup_bytes": setup}


def timed_epoch(images: str, labels: str, cfg_json: str, workers: int, warm: int, timed: int, seed: int,
                cache: str) -> dict[str, float]:
    """Training tiles/s of the data module over ``images`` (after ``warm`` batches)."""
    from benchmarks.loading import time_loader

    cfg = Config.from_json(cfg_json)
    dm = datamodule(images, labels, cfg, bands=None, workers=workers, tiles=(warm + timed) * cfg.batch_size,
                    seed=seed, cache_dir=cache)
    return time_loader(dm.train_dataloader, warm, timed, key="raw")


# ----- the section --------------------------------------------------------------------------------


def run(cfg: Config) -> dict[str, Any]:
    from tests.sources import servers

    size = QUICK_SIZE if cfg.quick else SIZE
    start = time.perf_counter()
    manifest = ensure_sources(cfg.cache_dir, size, cfg.block_size)
    cogs = ensure_cogs(manifest, cfg.block_size)
    gen_seconds = time.perf_counter() - start
    names = [n for n, _ in manifest["files"]["s2"]]
    layouts = [file_layout(cogs / f"{n}.tif") for n in names]
    ref_res = min(layout["res"] for layout in layouts)
    labels, cache = manifest["labels"], str(Path(manifest["root"]) / "dmcache")
    bands = [(n, str(cogs / f"{n}.tif")) for n in names]
    local = write_item(cogs / "item_local.json", "S2_COG", bands)
    bs = cfg.batch_size
    warm, timed = max(1, min(cfg.warmup_tiles, 32) // bs), max(1, min(cfg.tiles, 320) // bs)
    epoch_tiles = (warm + timed) * bs
    cfg_json = cfg.to_json()
    plain, slow = servers.start("http", str(cogs)), servers.start("http", str(cogs), "--latency", str(LATENCY))
    try:
        items = {}
        for kind, server in (("http", plain), ("slow", slow)):
            items[kind] = write_item(cogs / f"item_{kind}.json", "S2_COG", bands,
                                     {n: f"{server.url}/{n}.tif" for n in names})
            fresh(fill_cache, items[kind], labels, cfg_json, cache)
        fresh(fill_cache, local, labels, cfg_json, cache)
        # (a) bytes and requests
        reads = {}
        for w in (0, 2):
            plain.reset()
            got = fresh(epoch_reads, items["http"], labels, cfg_json, w, epoch_tiles, 0, cache, plain.url)
            windows = [(r, c, cfg.tile_size) for _, r, c in got["windows"]]
            by_worker = [[(r, c, cfg.tile_size) for b, r, c in got["windows"] if b % max(w, 1) == k] for k in range(max(w, 1))]
            heads = sum(layout["header"] for layout in layouts)
            # the main process reads the headers when it builds the data module; each worker opens the files again
            got.update(tiles=len(windows), needed=needed_bytes(layouts, windows, ref_res),
                       needed_per_worker=(heads if w else 0) + sum(needed_bytes(layouts, ws, ref_res) for ws in by_worker),
                       bytes=got["bytes"] + got["setup_bytes"])
            del got["windows"]
            reads[f"train_{w}"] = got
            print(f"remote: epoch with {w} workers: {got}", flush=True)
        out = Path(cache) / "infer_out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        plain.reset()
        got = fresh(infer_reads, items["http"], labels, cfg_json, cache, plain.url, str(out))
        got["needed"] = sum(layout["header"] + sum(layout["sizes"].values()) for layout in layouts)
        got["bytes"] += got["setup_bytes"]
        got["tiles"] = _grid_tiles(size, cfg.tile_size, cfg.infer_overlap)
        reads["infer"] = got
        print(f"remote: inference: {got}", flush=True)
        # (b) latency
        rates: dict[str, list[float]] = {"local": [], "slow": []}
        cpu: dict[str, list[float]] = {"local": [], "slow": []}
        for rep in range(cfg.repeats):
            for kind in ("local", "slow") if rep % 2 == 0 else ("slow", "local"):
                images = local if kind == "local" else items["slow"]
                m = fresh(timed_epoch, images, labels, cfg_json, 2, warm, timed, rep, cache)
                rates[kind].append(m["tiles_per_s"])
                cpu[kind].append(m["cpu_ms_per_tile"])
                print(f"remote: repeat {rep} {kind}: {m['tiles_per_s']:.1f} tiles/s", flush=True)
    finally:
        plain.stop()
        slow.stop()
    return _result(cfg, size, reads, rates, cpu, layouts, warm * bs, timed * bs, gen_seconds).to_dict()


def _grid_tiles(size: int, tile: int, overlap: int) -> int:
    """Tiles of ``predict_raster``'s grid over a ``size`` px square scene."""
    step = tile - overlap
    n = max(math.ceil((size - tile) / step), 0) + 1
    return n * n


def _result(cfg: Config, size: int, reads: dict[str, dict[str, Any]], rates: dict[str, list[float]],
            cpu: dict[str, list[float]], layouts: list[dict[str, Any]], warm: int, timed: int,
            gen_seconds: float) -> SectionResult:
    med = {k: median(v) for k, v in rates.items()}
    cpu_med = {k: median(v) for k, v in cpu.items()}
    latency_ratio = med["slow"] / med["local"]
    mib = 2**20
    headers = ["reads", "tiles", "bytes fetched (MiB)", "bytes the reads need (MiB)", "fetched / needed",
               "HTTP requests", "requests per tile"]
    rows = []
    labels = {"train_0": "one training epoch, 0 workers", "train_2": "one training epoch, 2 workers",
              "infer": f"`predict_raster` of the scene (tile {cfg.tile_size}, overlap {cfg.infer_overlap})"}
    ratio = {}
    for key, r in reads.items():
        ratio[key] = r["bytes"] / r["needed"]
        rows.append([labels[key], r["tiles"], r["bytes"] / mib, r["needed"] / mib, ratio[key], r["requests"],
                     r["requests"] / max(r["tiles"], 1)])
    w2 = reads["train_2"]
    ratio["train_2_per_worker"] = w2["bytes"] / w2["needed_per_worker"]
    rows.append(["one training epoch, 2 workers, against what each worker's own reads need", w2["tiles"],
                 w2["bytes"] / mib, w2["needed_per_worker"] / mib, ratio["train_2_per_worker"], w2["requests"],
                 w2["requests"] / max(w2["tiles"], 1)])
    lat_headers = ["images", "tiles/s (median)", "min-max", "tiles timed x n", "this / local", "CPU ms per tile"]
    lat_rows = [["COGs on local disk", med["local"], spread(rates["local"]), f"{timed} x {cfg.repeats}", 1.0,
                 fmt(cpu_med["local"])],
                [f"the same COGs over HTTP, {LATENCY * 1000:.0f} ms per request", med["slow"], spread(rates["slow"]),
                 f"{timed} x {cfg.repeats}", latency_ratio, fmt(cpu_med["slow"])]]
    compressed = sum(sum(layout["sizes"].values()) for layout in layouts) / mib
    heads = sum(layout["header"] for layout in layouts) / 1024
    return SectionResult(
        section="remote",
        title="Remote reads: bytes, requests and latency",
        setup=[
            f"The Sentinel-2-like bands of section 4b ({size} x {size} px at 10 m: B02, B03, B04, B08; B11, B12 at "
            f"20 m; uint16) as COGs (GDAL's COG driver, {cfg.block_size} px tiles, DEFLATE with predictor, "
            f"overviews): {compressed:.1f} MiB of compressed full-resolution tiles, {heads:.0f} KiB of headers in "
            "all; served by the test suite's Range server (`tests/sources/servers.py`, a subprocess on 127.0.0.1 "
            "counting requests and bytes sent). `data.images` is a STAC item with one asset per band at the "
            "server's URLs; labels are local; geobp's GDAL options (`geobp.sources.urls.READ_OPTIONS`).",
            f"Training: `GeoTiffDataModule(images=item.json, ...).train_dataloader()`, {warm + timed} random "
            f"{cfg.tile_size} px tiles, batches of {cfg.batch_size}. Inference: `predict_raster` of the scene with "
            f"a 1x1 convolution, batches of {cfg.infer_batch}, the default reader. Every measurement runs in a "
            "freshly spawned process: no file handle and no GDAL cache of an earlier run serves it; the data "
            "module's cache (headers, statistics, valid cells) is filled beforehand, so that building the data "
            "module reads only the files' headers; bytes are counted from the process's start to its last read.",
            "Bytes the reads need: each file's header (the bytes before its first tile of any level: the IFDs) "
            "plus the compressed size (`src.block_size`) of every block the tile windows touch, each counted once "
            f"(for the 20 m bands, the warped source window with a {WARP_MARGIN} px margin for the bilinear "
            "kernel); with 2 workers also per process, summed: the main process's headers (building the data "
            "module), and each worker's headers and the blocks of its own batches (each worker opens the files and "
            "caches ranges on its own).",
            f"Latency: the same server with {LATENCY * 1000:.0f} ms added before every answer; training tiles/s with "
            f"2 workers over HTTP against the same COGs read from local disk (a STAC item with local hrefs), "
            f"{warm} warm-up tiles then {timed} timed, a fresh process per run; repeats alternate the order. GDAL "
            f"block cache {cfg.gdal_cache_mb} MiB per process.",
        ],
        tables=[table("Bytes and requests over HTTP", headers, rows),
                table(f"Training tiles/s with {LATENCY * 1000:.0f} ms per request, 2 workers", lat_headers, lat_rows)],
        targets=[
            target("remote: bytes fetched / needed, one training epoch (0 workers)", ratio["train_0"], "<=", 1.3,
                   f"{fmt(ratio['train_0'])}x"),
            target("remote: bytes fetched / needed per worker, one training epoch (2 workers)",
                   ratio["train_2_per_worker"], "<=", 1.3, f"{fmt(ratio['train_2_per_worker'])}x"),
            target("remote: bytes fetched / needed, predict_raster of the scene", ratio["infer"], "<=", 1.3,
                   f"{fmt(ratio['infer'])}x"),
            target(f"remote: HTTP ({LATENCY * 1000:.0f} ms latency) / local disk, training tiles/s, 2 workers",
                   latency_ratio, ">=", 0.5, f"{fmt(latency_ratio)}x"),
        ],
        notes=[
            f"With 2 workers one epoch fetched {fmt(w2['bytes'] / w2['needed'])}x the bytes its tiles need once: "
            "each worker process has its own GDAL caches, so a block both workers' tiles touch is fetched by both.",
            f"One epoch's {reads['train_0']['tiles']} tiles touch "
            f"{fmt(100 * reads['train_0']['needed'] / reads['infer']['needed'])}% of the scene's compressed bytes "
            "(inference reads them all); GDAL keeps what it fetched for a file in memory (`VSI_CACHE`, 25 MB per "
            "file), so a block is fetched once per process.",
            f"Preparing the files took {gen_seconds:.0f} s (made on first use, then cached).",
        ],
        metrics={"reads": reads, "bytes_ratio": ratio, "tiles_per_s": med, "repeats": rates, "cpu_ms_per_tile": cpu_med,
                 "latency_ratio": latency_ratio},
    )


def main(argv: list[str] | None = None) -> int:
    """Run the section alone and print (or write) its result."""
    return run_standalone("python -m benchmarks.remote", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
