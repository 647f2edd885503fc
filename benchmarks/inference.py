"""Section "inference": ``predict_raster`` throughput against the bare model, and its peak memory;
section "readers" (:func:`run_readers`): the inference readers against the decode limit.

- Throughput: pixels per second of ``geobp.inference.predict_raster`` (what ``geobp infer``
  runs) on a 6-band raster with a U-Net ResNet-18, against the model's forward pass alone over
  the same tiles (same grid, overlap and batch size) already read and normalised in memory.
  A 1x1 convolution through ``predict_raster`` shows the pipeline's own ceiling.
- Memory: peak RSS (``VmHWM``) of a fresh process predicting a 1-band raster with a 1x1
  convolution (cheap on the CPU; the model's size does not depend on the raster), for a small
  and a large raster.

- Readers: tiles per second of the thread and the process reader (1, 2 and all usable cores)
  over a 6-band DEFLATE raster, alone and fed to a consumer that takes batches at a fixed
  "GPU rate" (it sleeps batch / rate seconds per batch), against the bare decode loop: one core
  reading the same tile windows with rasterio in a plain loop; that rate times the usable cores
  is the node's decode limit.

The memory child is this module run as a script: ``python -m benchmarks.inference --memory-child``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO, Config, SectionResult, fmt, median, rss_peak_mib, spread, table, target
from benchmarks.scenes import ensure_plain_raster

ENCODER = "resnet18"
BANDS = 6
CLASSES = 5


def _inference_api() -> tuple[Any, str]:
    try:
        from geobp.inference import PredictOptions, predict_raster
    except Exception as err:  # not written yet, or broken
        return None, f"geobp.inference.predict_raster not available ({type(err).__name__}: {err})"
    return (predict_raster, PredictOptions), ""


def preprocessing(bands: int) -> Any:
    from geobp.data.preprocessing import Preprocessing

    return Preprocessing(bands=list(range(1, bands + 1)), nodata=0, method="meanstd", mean=[1000.0] * bands,
                         std=[300.0] * bands)


def predict(model: torch.nn.Module, src: Path, dst: Path, bands: int, tile: int, overlap: int, batch: int,
            workers: int) -> float:
    """Seconds for one ``predict_raster`` call (class map only, overwritten each time)."""
    api, why = _inference_api()
    if api is None:
        raise RuntimeError(why)
    predict_raster, PredictOptions = api
    options = PredictOptions(tile_size=tile, overlap=overlap, batch_size=batch, device="cpu", progress=False, overwrite=True,
                             num_workers=workers or None)
    start = time.perf_counter()
    predict_raster(model, src, dst, preprocessing(bands), options)
    return time.perf_counter() - start


def tiles_in_memory(src: Path, tile: int, overlap: int) -> torch.Tensor:
    """Every tile of the prediction grid, read and normalised: float32 [N, C, tile, tile]."""
    import rasterio
    from rasterio.windows import Window

    from geobp.tiling import TileGrid

    pre = preprocessing(BANDS)
    with rasterio.open(src) as ds:
        grid = TileGrid.build(ds.height, ds.width, tile, overlap)
        out = []
        for r in grid.row_offsets:
            for c in grid.col_offsets:
                raw = ds.read(pre.bands, window=Window(c, r, tile, tile))
                out.append(torch.from_numpy(pre(raw)[0]))
    return torch.stack(out)


def reading_tiles_per_s(src: Path, tile: int, overlap: int, batch: int, readers: int, decode: int) -> float:
    """Tiles per second of geobp's inference reader alone (read, normalise) over the prediction grid."""
    import rasterio

    from geobp.inference.blockcache import block_cache_bytes
    from geobp.inference.reader import PrefetchReader
    from geobp.tiling import TileGrid

    with rasterio.open(src) as ds:
        grid, profile = TileGrid.build(ds.height, ds.width, tile, overlap), ds.profile
    with rasterio.Env(GDAL_CACHEMAX=block_cache_bytes(profile, grid.tile_h)):
        with PrefetchReader(src, grid, grid.batches(batch), preprocessing(BANDS), num_workers=readers,
                            decode_threads=decode) as reader:
            start = time.perf_counter()
            n = sum(len(b.tiles) for b in reader)
            return n / (time.perf_counter() - start)


def forward_seconds(model: torch.nn.Module, tiles: torch.Tensor, batch: int) -> float:
    """Seconds for the model's forward pass over ``tiles`` in batches (inference mode)."""
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            model(tiles[i : i + batch])
    return time.perf_counter() - start


def memory_child(src: str, dst: str, tile: int, overlap: int, batch: int, workers: int) -> dict[str, float]:
    """In a fresh process: predict ``src`` with a 1x1 convolution; peak RSS and baseline."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 4, kernel_size=1)
    baseline = rss_peak_mib()  # after imports and model: what any run pays
    seconds = predict(model, Path(src), Path(dst), 1, tile, overlap, batch, workers)
    return {"peak_mib": rss_peak_mib(), "baseline_mib": baseline, "seconds": seconds}


def _memory_run(src: Path, dst: Path, cfg: Config) -> dict[str, float]:
    argv = [sys.executable, "-m", "benchmarks.inference", "--memory-child", str(src), str(dst), str(cfg.mem_tile),
            str(cfg.mem_overlap), str(cfg.mem_batch), "0"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(cfg: Config) -> dict[str, Any]:
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    api, why = _inference_api()
    res = SectionResult(section="inference", title="Inference")
    if api is None:
        res.skipped = f"{why}; rerun this section once it exists."
        return res.to_dict()
    from geobp.models import create_model

    cache = Path(cfg.cache_dir) / "inference"
    block = min(512, cfg.infer_size // 2 // 16 * 16)
    src = ensure_plain_raster(cache, cfg.infer_size, bands=BANDS, block=block)
    torch.manual_seed(0)
    unet = create_model("unet", encoder=ENCODER, in_channels=BANDS, num_classes=CLASSES).eval()
    conv = torch.nn.Conv2d(BANDS, CLASSES, kernel_size=1).eval()
    tiles = tiles_in_memory(src, cfg.infer_tile, cfg.infer_overlap)
    pixels = cfg.infer_size**2
    args = (BANDS, cfg.infer_tile, cfg.infer_overlap, cfg.infer_batch, 0)  # 0: geobp's default reader threads
    times: dict[str, list[float]] = {"predict": [], "forward": [], "predict_conv": []}
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "out_classes.tif"
        forward_seconds(unet, tiles[: cfg.infer_batch], cfg.infer_batch)  # warm-up
        predict(conv, src, dst, *args)  # warm-up: file cache, GDAL, threads
        for rep in range(cfg.repeats):
            runs = {
                "predict": lambda: predict(unet, src, dst, *args),
                "forward": lambda t=tiles: forward_seconds(unet, t, cfg.infer_batch),  # bound now: deleted below
                "predict_conv": lambda: predict(conv, src, dst, *args),
            }
            for name in runs if rep % 2 == 0 else reversed(list(runs)):
                times[name].append(runs[name]())
                print(f"inference: repeat {rep} {name}: {times[name][-1]:.2f} s", flush=True)
    del tiles, runs  # the tiles' memory is not part of the memory runs below
    px = {k: [pixels / t for t in v] for k, v in times.items()}
    med = {k: median(v) for k, v in px.items()}
    ratio = med["predict"] / med["forward"]
    n = cfg.repeats
    rows = [
        ["model forward only, tiles in memory (the limit)", med["forward"] / 1e6, spread([v / 1e6 for v in px["forward"]]),
         median(times["forward"]), n, "1"],
        ["`predict_raster` (read, normalise, forward, blend, write)", med["predict"] / 1e6,
         spread([v / 1e6 for v in px["predict"]]), median(times["predict"]), n, ratio],
        ["`predict_raster` with a 1x1 convolution (pipeline ceiling)", med["predict_conv"] / 1e6,
         spread([v / 1e6 for v in px["predict_conv"]]), median(times["predict_conv"]), n, "-"],
    ]
    res.tables.append(table(f"Throughput, {cfg.infer_size} x {cfg.infer_size} px, U-Net ResNet-18",
                            ["run", "Mpixel/s (median)", "min-max", "seconds", "n", "vs forward only"], rows))
    res.targets.append(target("inference: predict_raster / model forward, pixels/s", ratio, ">=", 0.85, f"{fmt(ratio)}"))

    # the reader alone, in the layouts geobp picks (CPU: one thread; GPU: few threads, several GDAL
    # decoding threads each) against two single-threaded readers
    layouts = [(2, 1), (1, 1), (1, 2)]
    read_rate: dict[tuple[int, int], list[float]] = {lay: [] for lay in layouts}
    for rep in range(cfg.repeats + 1):
        for lay in layouts if rep % 2 == 0 else reversed(layouts):
            rate = reading_tiles_per_s(src, cfg.infer_tile, cfg.infer_overlap, cfg.infer_batch, *lay)
            if rep:  # the first round warms the file cache
                read_rate[lay].append(rate)
    res.tables.append(table(
        f"Reading alone (`PrefetchReader`, read and normalise the same grid of {cfg.infer_tile} px tiles)",
        ["reader threads x GDAL decoding threads", "tiles/s (median)", "min-max", "n"],
        [[f"{r} x {d}", median(v), spread(v), len(v)] for (r, d), v in read_rate.items()]))

    small, large = cfg.mem_sizes
    mem: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (small, large):
            path = ensure_plain_raster(cache, size, bands=1, block=min(512, size // 2 // 16 * 16))
            mem[size] = _memory_run(path, Path(tmp) / f"m{size}_classes.tif", cfg)
            print(f"inference: memory {size}: {mem[size]}", flush=True)
    mratio = mem[large]["peak_mib"] / mem[small]["peak_mib"]
    inc = {s: mem[s]["peak_mib"] - mem[s]["baseline_mib"] for s in mem}
    mrows = [
        [f"{s} x {s}", m["peak_mib"], m["baseline_mib"], inc[s], s * s / m["seconds"] / 1e6, "1"
         if s == small else f"{fmt(mratio)}"]
        for s, m in mem.items()
    ]
    res.tables.append(table("Peak memory (1-band uint16 raster, 1x1 convolution, one fresh process per raster)",
                            ["raster", "peak RSS (MiB)", "RSS before predicting (MiB)", "growth while predicting (MiB)",
                             "Mpixel/s", "peak vs small"], mrows))
    res.targets.append(target(f"inference: peak RSS {large}^2 / {small}^2 raster", mratio, "<=", 1.3, f"{fmt(mratio)}x"))
    from geobp.inference.threads import default_workers

    res.setup = [
        f"Throughput: a {cfg.infer_size} x {cfg.infer_size} px, {BANDS}-band uint16 raster (DEFLATE, predictor 2, "
        f"{block} px blocks); `predict_raster(model, src, dst, preprocessing, PredictOptions(tile_size={cfg.infer_tile}, "
        f"overlap={cfg.infer_overlap}, batch_size={cfg.infer_batch}, device='cpu'))` with the default reader threads "
        f"({default_workers('cpu')} here), "
        f"class map only. The limit runs the same model on the same {cfg.infer_tile} px tiles of the same grid, "
        f"read and normalised beforehand, in batches of {cfg.infer_batch} under `torch.inference_mode()`.",
        f"Memory: 1-band uint16 rasters of {small} x {small} and {large} x {large} px, a 1x1 convolution to 4 "
        f"classes (so that the CPU run takes minutes, not hours; the model's memory does not depend on the raster), "
        f"tile {cfg.mem_tile}, overlap {cfg.mem_overlap}, batch {cfg.mem_batch}; peak RSS is the child process's "
        "`VmHWM` (n = 1 each: it does not vary between runs).",
        f"{n} timed repeats in alternating order after one warm-up run; {torch.get_num_threads()} torch threads.",
        "Reading alone: geobp's reader over the throughput grid, in batches as `predict_raster` reads them: two "
        "reader threads with one decoding thread each (each thread's file handle has its own GDAL block cache, so "
        "blocks that both threads' batches touch are decoded twice), one thread (geobp's CPU default on 2 cores), "
        "and one thread decoding with two GDAL threads (`NUM_THREADS`, the layout geobp uses on a GPU).",
    ]
    res.metrics = {"mpixel_per_s": {k: v / 1e6 for k, v in med.items()}, "seconds": times, "memory": mem,
                   "reading_tiles_per_s": {f"{r}x{d}": v for (r, d), v in read_rate.items()},
                   "ratio": ratio, "memory_ratio": mratio}
    return res.to_dict()


def bare_decode_tiles_per_s(src: Path, tile: int, overlap: int, cache_bytes: int | None = None) -> float:
    """Tiles per second of one core reading every tile window of the grid (all bands, raw uint16)
    with rasterio in a plain loop, under the block cache ``predict_raster`` sets for one process
    (or ``cache_bytes``)."""
    import rasterio
    from rasterio.windows import Window

    from geobp.inference.blockcache import block_cache_bytes
    from geobp.tiling import TileGrid

    with rasterio.open(src) as ds:
        grid = TileGrid.build(ds.height, ds.width, tile, overlap)
        cache = cache_bytes or block_cache_bytes(ds.profile, grid.tile_h)
    with rasterio.Env(GDAL_CACHEMAX=cache), rasterio.open(src) as ds:
        start = time.perf_counter()
        n = 0
        for i, j in grid.tiles():
            ds.read(window=Window(grid.col_offsets[j], grid.row_offsets[i], grid.tile_w, grid.tile_h))
            n += 1
        return n / (time.perf_counter() - start)


#: The fixed GDAL cache ``predict_raster`` set per process before it was sized from the raster.
EARLIER_CACHE = 32 * 2**20


def reader_run(src: Path, kind: str, readers: int, tile: int, overlap: int, batch: int,
               rate: float = 0.0, hold_gil: bool = False, earlier: bool = False) -> dict[str, float]:
    """One pass of geobp's ``threads`` or ``processes`` reader over the grid, each worker decoding on
    one core (``processes-raw``: handing over raw tiles, as on a GPU, where the device normalises); with ``rate`` > 0 the consumer takes each batch for ``len(batch) / rate`` seconds
    (a GPU's forward pass): sleeping, or with ``hold_gil`` spinning in Python, as a thread
    launching a model's kernels holds the GIL. ``earlier``: as before the caches were sized from
    the raster (a fixed 32 MiB per process) and batches went to the least busy worker, whatever
    their columns. Returns tiles/s from the first batch to the last (the steady rate: neither the
    workers' start nor the first read is in it) and the seconds from making the reader to its
    first batch."""
    import contextlib
    from unittest import mock

    import rasterio

    from geobp.inference.blockcache import block_cache_bytes
    from geobp.inference.procreader import ProcessReader
    from geobp.inference.reader import PrefetchReader
    from geobp.tiling import TileGrid

    with rasterio.open(src) as ds:
        grid, profile = TileGrid.build(ds.height, ds.width, tile, overlap), ds.profile
    batches = grid.batches(batch)
    extra: dict[str, Any] = {}
    if kind.endswith("-raw"):  # raw tiles, as on a GPU (normalised on the device): the reader's share of the work
        from geobp.inference.reader import raw_dtype

        extra["raw"], kind = raw_dtype(profile["dtype"]), kind.removesuffix("-raw")
    if kind == "processes" and not earlier:  # earlier: the workers take the fixed cache of the Env below
        extra["profile"] = profile  # each worker's cache sized for its stripe, as predict_raster does
    routing = contextlib.ExitStack()
    if earlier:
        def least_busy(home: int, load: list[int]) -> int:
            return min(range(len(load)), key=load.__getitem__)
        routing.enter_context(mock.patch("geobp.inference.reader.pick_worker", least_busy))
        routing.enter_context(mock.patch("geobp.inference.procreader.pick_worker", least_busy))
    with routing, rasterio.Env(GDAL_CACHEMAX=EARLIER_CACHE if earlier else block_cache_bytes(profile, grid.tile_h)):
        made = time.perf_counter()
        with (ProcessReader(src, grid, batches, preprocessing(BANDS), num_workers=readers, **extra) if kind == "processes"
              else PrefetchReader(src, grid, batches, preprocessing(BANDS), num_workers=readers,
                                  raw=extra.get("raw"))) as reader:
            start = 0.0
            n = 0
            for b in reader:
                if not start:  # the clock starts at the first batch: its tiles are not counted
                    start = time.perf_counter()
                else:
                    n += len(b.tiles)
                if rate and hold_gil:
                    end = time.perf_counter() + len(b.tiles) / rate
                    while time.perf_counter() < end:
                        pass
                elif rate:
                    time.sleep(len(b.tiles) / rate)
            return {"tiles_per_s": n / (time.perf_counter() - start), "first_batch_s": start - made}


def wide_raster_rows(cfg: Config, cores: int) -> tuple[list[list[Any]], dict[str, Any]]:
    """Rows of the wide-raster table: the bare loop and both readers on all cores, earlier against now."""
    width, height = cfg.readers_wide
    src = ensure_plain_raster(Path(cfg.cache_dir) / "inference", width, bands=BANDS, block=cfg.readers_block,
                              height=height)
    tile, overlap, batch = cfg.readers_tile, cfg.readers_overlap, cfg.readers_batch
    bare_decode_tiles_per_s(src, tile, overlap)  # warm-up: file cache
    runs: dict[str, dict[str, list[float]]] = {}
    for rep in range(cfg.repeats):
        for when in ("earlier", "now") if rep % 2 == 0 else ("now", "earlier"):
            old = when == "earlier"
            got = {"bare": bare_decode_tiles_per_s(src, tile, overlap, cache_bytes=EARLIER_CACHE if old else None)}
            for kind in ("threads", "processes"):
                got[kind] = reader_run(src, kind, cores, tile, overlap, batch, earlier=old)["tiles_per_s"]
            for key, v in got.items():
                runs.setdefault(key, {"earlier": [], "now": []})[when].append(v)
            print(f"readers: wide raster, repeat {rep}, {when}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()),
                  flush=True)
    labels = {"bare": ("bare decode loop", "1"), "threads": ("`threads` reader", str(cores)),
              "processes": ("`processes` reader", str(cores))}
    rows = [[labels[k][0], labels[k][1], median(v["earlier"]), median(v["now"]), median(v["now"]) / median(v["earlier"]),
             cfg.repeats] for k, v in runs.items()]
    return rows, {"size": [width, height], "tiles_per_s": runs}


def run_readers(cfg: Config) -> dict[str, Any]:
    """Section "readers": the thread and process readers against the bare decode loop, alone and
    fed to a consumer at the decode limit's rate."""
    from geobp.cores import usable_cores

    res = SectionResult(section="readers", title="Inference readers")
    cache = Path(cfg.cache_dir) / "inference"
    src = ensure_plain_raster(cache, cfg.readers_size, bands=BANDS, block=cfg.readers_block)
    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    geo = (cfg.readers_tile, cfg.readers_overlap, cfg.readers_batch)
    counts = sorted({1, 2, cores})
    layouts = [("threads", 1), ("threads", cores), *(("processes", c) for c in counts),
               *(("processes-raw", c) for c in counts)]
    layouts = list(dict.fromkeys(layouts))
    bare_decode_tiles_per_s(src, cfg.readers_tile, cfg.readers_overlap)  # warm-up: file cache
    bare: list[float] = []
    alone: dict[tuple[str, int], list[float]] = {lay: [] for lay in layouts}
    fed: dict[tuple[str, int], list[float]] = {lay: [] for lay in layouts}
    busy: dict[tuple[str, int], list[float]] = {lay: [] for lay in layouts}
    first: dict[tuple[str, int], list[float]] = {lay: [] for lay in layouts}
    for rep in range(cfg.repeats):
        bare.append(bare_decode_tiles_per_s(src, cfg.readers_tile, cfg.readers_overlap))
        print(f"readers: repeat {rep} bare decode loop: {bare[-1]:.1f} tiles/s", flush=True)
        for lay in layouts if rep % 2 == 0 else reversed(layouts):
            got = reader_run(src, *lay, *geo)
            alone[lay].append(got["tiles_per_s"])
            first[lay].append(got["first_batch_s"])
            print(f"readers: repeat {rep} {lay} alone: {got['tiles_per_s']:.1f} tiles/s, first batch after "
                  f"{got['first_batch_s']:.2f} s", flush=True)
    one_core = median(bare)
    limit = one_core * cores
    for rep in range(cfg.repeats):
        for lay in layouts if rep % 2 == 0 else reversed(layouts):
            fed[lay].append(reader_run(src, *lay, *geo, rate=limit)["tiles_per_s"])
            print(f"readers: repeat {rep} {lay} fed at {limit:.1f} tiles/s: {fed[lay][-1]:.1f} tiles/s", flush=True)
            busy[lay].append(reader_run(src, *lay, *geo, rate=one_core, hold_gil=True)["tiles_per_s"])
            print(f"readers: repeat {rep} {lay} fed at {one_core:.1f} tiles/s holding the GIL: {busy[lay][-1]:.1f} tiles/s",
                  flush=True)
    n = cfg.repeats
    rows = [["bare decode loop, one core", "-", one_core, spread(bare), one_core / limit, "-", "-", "-", n],
            [f"decode limit: one core x {cores} usable cores", "-", limit, "-", 1.0, "-", "-", "-", "-"]]
    for (kind, k), v in alone.items():
        name = "`processes` reader, raw tiles (as on a GPU)" if kind == "processes-raw" else f"`{kind}` reader"
        rows.append([name, f"{k} (all usable cores)" if k == cores > 1 else k, median(v), spread(v),
                     median(v) / limit, median(fed[(kind, k)]) / limit, median(busy[(kind, k)]) / one_core,
                     median(first[(kind, k)]), n])
    res.tables.append(table(
        f"Tiles/s of {cfg.readers_tile} px tiles ({cfg.readers_overlap} px overlap, batches of {cfg.readers_batch})",
        ["reader", "workers", "tiles/s alone (median)", "min-max", "alone / decode limit",
         "sleeping consumer at the decode limit: achieved / its rate",
         "GIL-holding consumer at one core's decode rate: achieved / its rate", "first batch after (s)", "n"], rows))
    best = max(median(fed[lay]) for lay in layouts if lay[0].startswith("processes")) / limit
    res.targets.append(target("readers: process reader fed at the decode limit's rate / decode limit", best, ">=", 0.85,
                              f"{fmt(best)}"))
    wide_rows, wide_metrics = wide_raster_rows(cfg, cores)
    res.tables.append(table(
        f"A wide raster ({cfg.readers_wide[0]} x {cfg.readers_wide[1]} px): tiles/s alone, with the earlier fixed "
        "32 MiB cache per process and any free worker, and now",
        ["reader", "workers", "earlier (median)", "now (median)", "now / earlier", "n"], wide_rows))
    res.setup = [
        f"Input: a {cfg.readers_size} x {cfg.readers_size} px, {BANDS}-band uint16 GeoTIFF (DEFLATE, predictor 2, "
        f"{cfg.readers_block} px blocks); the prediction grid of {cfg.readers_tile} px tiles with "
        f"{cfg.readers_overlap} px overlap, read as `predict_raster` reads it (batches of {cfg.readers_batch}, "
        "tiles of a batch in one tile row read as one window, then normalised).",
        "Bare decode loop: one process reading every tile window of the grid with `rasterio` in a plain loop (all "
        "bands, raw, no normalising) under the block cache `predict_raster` sets for one process "
        "(`geobp.inference.blockcache`); times the usable cores, it is the node's decode limit.",
        f"The wide raster ({cfg.readers_wide[0]} x {cfg.readers_wide[1]} px, same bands, blocks and compression): one "
        "block row takes more than a 32 MiB cache, so with the earlier fixed cache the blocks a tile row shares with "
        "the next were decoded again; now the cache holds the block rows a tile row spans (for a process, those of "
        "its stripe of columns) and each batch goes to the worker of its stripe. Earlier is emulated by the fixed "
        "cache and the least-busy routing patched in.",
        "Readers: `PrefetchReader` (threads of one process, each with one GDAL decoding thread) and `ProcessReader` "
        "(worker processes, each decoding on one core, batches in a shared-memory ring, copied out in the parent); "
        "tiles/s from the first batch to the last (the steady rate); the time from making the reader to its first "
        "batch is a column of its own (for processes: starting the workers, with the fork server already running, "
        "and their first open of the file). Raw tiles: what the readers do by default on a GPU, where the device "
        "normalises the tiles (`normalize_on`): the workers hand over the uint16 pixels, half the bytes of float32, "
        "and do not normalise.",
        "Fed: the consumer takes batch / rate seconds per batch, sleeping with the rate at the decode limit (a GPU "
        "exactly as fast as the node can decode), or spinning in Python (holding the GIL, as the thread that "
        "launches a model's kernels and runs the writer's Python does) with the rate at one core's decode rate; "
        "1.0 means the reader never kept it waiting.",
        f"{n} repeats in alternating order after a warm-up pass; {cores} usable cores.",
    ]
    if load > cores / 2:
        res.notes.append(f"The machine was busy when this section started (load average {load:.2f} on {cores} cores): "
                         "other work took CPU time from the readers, so the rates are lower and noisier than on an idle "
                         "machine, and workers beyond the free cores cannot add to them.")
    res.notes.append("Readers do more than the bare loop: they normalise every tile to float32 and copy it into "
                     "its batch (tiles overlap), which the bare loop's raw reads leave out; on the CPU that part is "
                     "about a third of a reader's time per tile. Each reader process also costs the parent a copy of "
                     "its batches out of shared memory. Processes are meant for a node with cores to spare, where the "
                     "threads' share of the GIL would be the bound, which a node with two cores cannot show; that "
                     "measurement is the GPU node's (section 6).")
    res.notes.append("Each worker (thread or process) has its own file handle and decoded blocks: a block two "
                     "workers need is decoded by both. Batches go to the worker of their stripe of columns, so that "
                     "only the blocks on a stripe's edges are shared.")
    res.metrics = {"bare_tiles_per_s": bare, "decode_limit_tiles_per_s": limit, "cores": cores,
                   "alone_tiles_per_s": {f"{k}_{c}": v for (k, c), v in alone.items()},
                   "fed_tiles_per_s": {f"{k}_{c}": v for (k, c), v in fed.items()},
                   "fed_holding_gil_tiles_per_s": {f"{k}_{c}": v for (k, c), v in busy.items()},
                   "first_batch_s": {f"{k}_{c}": v for (k, c), v in first.items()}, "wide": wide_metrics}
    return res.to_dict()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--memory-child", nargs=6, metavar=("SRC", "DST", "TILE", "OVERLAP", "BATCH", "WORKERS"), required=True)
    a = p.parse_args()
    s, d, t, o, b, w = a.memory_child
    print(json.dumps(memory_child(s, d, int(t), int(o), int(b), int(w))))
