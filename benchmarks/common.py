"""Shared pieces of the benchmark harness: configuration, statistics, machine description, results.

A section is a function ``run(cfg) -> dict`` (see :class:`SectionResult`) that runs in its own
process; the harness stores its result as JSON and renders all results to Markdown.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from geobp.atomic import atomic_write_text  # noqa: F401  (benchmarks write results through it)
from geobp.cores import usable_cores

REPO = Path(__file__).resolve().parents[1]
SECTIONS: tuple[str, ...] = ("loading", "startup", "training", "inference", "readers", "tta", "export", "vectorize",
                             "labels", "sources", "imagery", "remote", "balance", "help")
#: Sections whose ``run`` lives in another section's module: name -> (module, function).
SECTION_ENTRIES: dict[str, tuple[str, str]] = {"readers": ("inference", "run_readers")}


@dataclass
class Config:
    """Sizes and repeat counts of every section; ``quick()`` gives tiny sizes for the test suite."""

    quick: bool = False
    cache_dir: str = str(REPO / "benchmarks" / ".data")
    repeats: int = 3  # timed repeats per measurement; tables show their median and n
    workers: int = 2  # DataLoader workers (loading) and reader threads (inference)
    torch_threads: int = 0  # intra-op threads of the training and inference sections; 0: torch's default
    # loading: synthetic scenes, generated once into cache_dir
    scenes: int = 4
    scene_size: int = 4096
    bands: int = 6
    classes: int = 5
    block_size: int = 512  # internal GeoTIFF tile size
    tile_size: int = 256
    batch_size: int = 16
    tiles: int = 2000  # timed tiles per repeat, after the warm-up
    warmup_tiles: int = 160
    gdal_cache_mb: int = 64  # per process: smaller than the decoded scenes, as with a real dataset
    grid_val_fraction: float = 0.5  # share of scenes tiled by the grid comparison
    # training
    train_batch: int = 4
    train_size: int = 128
    train_steps: int = 30  # timed steps per run, after the warm-up
    train_warmup: int = 5
    monitor_steps: int = 60  # at least this many timed steps for the monitor table
    monitor_pairs: int = 6  # back-to-back fits without and with the monitor, for its overhead
    monitor_cost_steps: int = 40  # timed steps of the monitor's cost by component (half are recordings)
    # inference
    infer_size: int = 4096  # throughput raster (6 bands), U-Net ResNet-18
    infer_tile: int = 256
    infer_overlap: int = 32
    infer_batch: int = 4
    mem_sizes: tuple[int, int] = (5000, 20000)  # peak-RSS rasters (1 band), 1x1 convolution
    mem_tile: int = 512
    mem_overlap: int = 64
    mem_batch: int = 8
    # inference readers (threads, processes) against the bare decode loop: 6-band DEFLATE raster
    readers_size: int = 3072
    readers_block: int = 512
    readers_tile: int = 256
    readers_overlap: int = 32
    readers_batch: int = 8
    # a wide raster whose block row outgrows a 32 MiB cache: width x height
    readers_wide: tuple[int, int] = (16384, 1536)

    @classmethod
    def quick_config(cls, **overrides: Any) -> Config:
        """Tiny sizes: checks that the harness runs, numbers mean nothing."""
        base = dict(
            quick=True, repeats=1, torch_threads=1, scenes=2, scene_size=1024, tiles=64, warmup_tiles=32,
            train_batch=2, train_size=32, train_steps=2, train_warmup=1, monitor_steps=2, monitor_pairs=1, monitor_cost_steps=4,
            infer_size=512, infer_tile=128, infer_overlap=16, infer_batch=2,
            mem_sizes=(500, 1000), mem_tile=128, mem_overlap=16, mem_batch=2,
            readers_size=512, readers_block=128, readers_tile=128, readers_overlap=16, readers_batch=2,
            readers_wide=(2048, 384),
        )
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        data = json.loads(text)
        data["mem_sizes"] = tuple(data["mem_sizes"])
        if "readers_wide" in data:
            data["readers_wide"] = tuple(data["readers_wide"])
        return cls(**data)


# ----- statistics -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Median of the repeats (NaN when there are none)."""
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the repeats, for the tables."""
    if len(values) < 2:
        return "-"
    return f"{fmt(min(values))}-{fmt(max(values))}"


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no exponent for everyday magnitudes)."""
    if value is None or value != value:  # None or NaN
        return "-"
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - int(f"{mag:e}".split("e")[1]))
    return f"{value:.{decimals}f}"


# ----- training batches ---------------------------------------------------------------------


def make_batches(n: int, batch: int, size: int, bands: int = 6, classes: int = 5,
                 seed: int = 0) -> list[dict[str, Any]]:
    """``n`` batches in the batch contract (image float32 [B, bands, H, W], mask int64 [B, H, W])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image = torch.randn(batch, bands, size, size, generator=g)
        mask = torch.randint(0, classes, (batch, size, size), generator=g)
        window = torch.tensor([[0, 0, size, size]] * batch)
        out.append({"image": image, "mask": mask, "scene": [f"s{i}"] * batch, "window": window})
    return out


# ----- results ----------------------------------------------------------------------------


def target(name: str, value: float, op: str, threshold: float, text: str | None = None) -> dict[str, Any]:
    """A target check: ``value op threshold`` with ``op`` one of ``>=``, ``<=``."""
    ok = value >= threshold if op == ">=" else value <= threshold
    if value != value:
        ok = False
    return {"name": name, "value": value, "text": text or fmt(value), "target": f"{op} {threshold:g}", "ok": bool(ok)}


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """A Markdown table as data: cells are turned into strings here."""
    return {"title": title, "headers": list(headers), "rows": [[_cell(c) for c in r] for r in rows]}


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return fmt(value)


@dataclass
class SectionResult:
    """What a section returns; stored as ``<results>/<section>.json`` and rendered to Markdown."""

    section: str
    title: str
    setup: list[str] = field(default_factory=list)  # Markdown bullet lines: what is compared, how
    tables: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # raw numbers, for tests and tooling
    skipped: str | None = None  # why the section (or part of it) could not run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----- machine and files ----------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    """CPU, cores, RAM, load, library versions, commit and date of this run."""
    try:
        import rasterio

        gdal = rasterio.__gdal_version__
    except ImportError:
        gdal = "not installed"
    ram = _ram_gib()
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "ram_gib": round(ram, 1) if ram else None,
        "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "lightning": _version("lightning"),
        "rasterio": _version("rasterio"),
        "gdal": gdal,
        "torchgeo": _version("torchgeo"),
        "numpy": _version("numpy"),
        "commit": f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else "unknown",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def rss_peak_mib() -> float:
    """Peak resident memory of this process (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_standalone(prog: str, run: Callable[[Config], dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """A section's own ``main``: ``python -m benchmarks.<section> [--quick] [--json PATH]`` runs it alone,
    prints its metrics and writes the whole result as JSON when asked."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run(Config.quick_config() if args.quick else Config())
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result["metrics"], indent=1, default=float))
    return 0
