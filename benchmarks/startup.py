"""Section "startup": the work before the first training step, against the size of the dataset.

The same synthetic scenes as the loading section (6 bands uint16, DEFLATE, a nodata value and
every other scene with a nodata border; no mask band, no overviews: the case where only pixels
tell where the nodata is), in two datasets, one four times the other. For each, the data module
is built on an empty cache and asked for what training needs before its first step: the scene
headers, the band statistics, the validity map and the training tile places
(``GeoTiffDataModule(...)``, ``.preprocessing``, ``.train_dataloader()``). Three ways:

- the full pass: every pixel of every training scene decoded (``stats_budget: 0``,
  ``validity: scan``), what start-up was before issue #16;
- sampled statistics (the default ``stats_budget``), validity still scanned (``validity: scan``);
- sampled statistics and read-time rejection (``validity: at_read``, what ``auto`` picks beyond
  1 GiB of pixels to scan).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Config, SectionResult, fmt, machine_info, median, spread, table, target
from benchmarks.scenes import ensure_scenes

#: (label, data module options)
WAYS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("full pass (every pixel decoded)", {"stats_budget": 0, "validity": "scan"}),
    ("sampled statistics, validity scanned", {"validity": "scan"}),
    ("sampled statistics, nodata rejected at read", {"validity": "at_read"}),
)


def start_up(root: Path, cache: Path, tile: int, options: dict[str, Any]) -> float:
    """Seconds from nothing (empty cache) to the training loader of ``root``."""
    from geobp.data import GeoTiffDataModule

    if cache.exists():
        shutil.rmtree(cache)
    start = time.perf_counter()
    dm = GeoTiffDataModule(str(root), num_classes=5, tile_size=tile, tiles_per_epoch=64, batch_size=16,
                           val_fraction=0.0, augment=False, cache_dir=str(cache), **options)
    dm.preprocessing  # noqa: B018  (band statistics)
    dm.train_dataloader()  # validity map and tile places
    return time.perf_counter() - start


def run(cfg: Config) -> dict[str, Any]:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    small, size = (2, 512) if cfg.quick else (8, 2048)
    counts = (small, 4 * small)
    roots = {n: ensure_scenes(cfg.cache_dir, n, size, cfg.bands, cfg.classes, cfg.block_size) for n in counts}
    seconds: dict[str, dict[int, list[float]]] = {label: {n: [] for n in counts} for label, _ in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(cfg.repeats):
            for n in counts:
                for label, options in WAYS:
                    s = start_up(roots[n], Path(tmp) / "cache", cfg.tile_size, options)
                    seconds[label][n].append(s)
                    print(f"startup: {n} scenes, {label}: {s:.2f} s", flush=True)
    mpx = {n: n * size * size / 1e6 for n in counts}
    rows = []
    for label, _ in WAYS:
        row: list[Any] = [label]
        for n in counts:
            row += [median(seconds[label][n]), spread(seconds[label][n])]
        row.append(median(seconds[label][counts[1]]) / median(seconds[label][counts[0]]))
        rows.append(row)
    growth = {label: median(seconds[label][counts[1]]) / median(seconds[label][counts[0]]) for label, _ in WAYS}
    full = WAYS[0][0]
    last = WAYS[-1][0]
    machine = machine_info()
    result = SectionResult(
        section="startup",
        title="Start-up before the first training step",
        setup=[f"Synthetic scenes of {size} x {size} px, {cfg.bands} bands uint16, {cfg.block_size} px blocks, DEFLATE "
               "(geobp.data.synth, as in the loading section), a nodata value and no mask band or overviews; "
               f"{counts[0]} scenes ({mpx[counts[0]]:,.0f} Mpx) and {counts[1]} scenes ({mpx[counts[1]]:,.0f} Mpx).",
               "Timed: building the data module on an empty cache, its band statistics and its training loader (headers, "
               "statistics, validity map, tile places): everything before the first step. Files are in the OS page cache.",
               f"{cfg.repeats} repeat(s), the ways and sizes alternating; on {machine['cpu']} ({machine['usable_cores']} usable cores)."],
        tables=[table("Seconds before the first training step (empty cache)",
                      ["way", f"{counts[0]} scenes (median)", "min-max", f"{counts[1]} scenes (median)", "min-max",
                       f"{counts[1]} / {counts[0]} scenes"], rows)],
        targets=[target(f"startup: {last}, {counts[1]} / {counts[0]} scenes", growth[last], "<=", 2.0,
                        f"{fmt(growth[last])}x (full pass {fmt(growth[full])}x)")],
        notes=["Sampled statistics read at most `data.stats_budget` pixels (2**25) of whole blocks whatever the "
               "dataset's size; a dataset within the budget is read whole, so its statistics are exact."],
        metrics={"seconds": {label: {str(n): v for n, v in by.items()} for label, by in seconds.items()},
                 "growth": growth, "scenes": list(counts), "scene_size": size},
    )
    return result.to_dict()
