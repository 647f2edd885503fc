"""``python -m benchmarks``: run sections, store their results, render ``BENCHMARKS.md``.

Commands:

- ``run [--quick] [--only loading,training,inference,readers,tta,export,vectorize,labels,balance,sources,imagery,remote,help] [--out BENCHMARKS.md]``: each section in a
  fresh process (its own GDAL cache, memory and threads), results stored as JSON, then rendered;
- ``render``: rewrite the Markdown from the stored results (e.g. after adding ``gpu.json``);
- ``section NAME``: one section in this process (what ``run`` starts);
- ``profile-loading``: cProfile of geobp's tile loader against the bare loop, in one process;
- ``monitor-cost [--device cuda ...]``: the gradient-flow monitor's cost by component on any device.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import REPO, SECTION_ENTRIES, SECTIONS, Config, atomic_write_text, machine_info

DEFAULT_OUT = REPO / "BENCHMARKS.md"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
QUICK_DIR = REPO / "benchmarks" / ".data" / "quick"


def _section_env(name: str, cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if name in ("loading", "labels", "imagery", "remote") and cfg.gdal_cache_mb > 0:
        env["GDAL_CACHEMAX"] = str(cfg.gdal_cache_mb)  # read by GDAL when it starts
    return env


def run_section_subprocess(name: str, cfg: Config, results_dir: Path, command: str) -> dict:
    """Run one section in a fresh Python process; its output goes to ``results/logs/<name>.log``."""
    log = results_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    out_json = results_dir / "logs" / f"{name}.partial.json"
    out_json.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "benchmarks", "section", name, "--config", cfg.to_json(), "--json", str(out_json),
            "--command", command]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(argv, cwd=REPO, env=_section_env(name, cfg), stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode == 0 and out_json.exists():
        result = json.loads(out_json.read_text())
        out_json.unlink()
        return result
    tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
    return {
        "section": name, "command": command, "machine": machine_info(), "elapsed_s": time.perf_counter() - start,
        "quick": cfg.quick, "error": f"exit {proc.returncode}: {tail[0][:300]}", "log": str(log),
    }


def run_section_here(name: str, cfg: Config, command: str) -> dict:
    """Run one section in this process and return its stored form."""
    import importlib

    start = time.perf_counter()
    machine = machine_info()
    module_name, function = SECTION_ENTRIES.get(name, (name, "run"))
    result = getattr(importlib.import_module(f"benchmarks.{module_name}"), function)(cfg)
    machine["load_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    result.update(machine=machine, command=command, quick=cfg.quick, elapsed_s=time.perf_counter() - start)
    return result


def render_to(out: Path, results_dir: Path, quick: bool = False) -> None:
    from benchmarks.report import load_results, render

    atomic_write_text(out, render(load_results(results_dir), quick=quick))


def _parse_only(text: str | None) -> list[str]:
    if not text:
        return list(SECTIONS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return names


def _config(args: argparse.Namespace) -> Config:
    overrides = {k: v for k, v in (("repeats", args.repeats), ("workers", args.workers), ("tiles", args.tiles),
                                   ("cache_dir", args.cache_dir),
                                   ("gdal_cache_mb", args.gdal_cache_mb), ("torch_threads", args.torch_threads))
                 if v is not None}
    return Config.quick_config(**overrides) if args.quick else Config(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="geobp benchmarks -> BENCHMARKS.md")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness runs (numbers mean nothing)")
        sp.add_argument("--repeats", type=int, help="timed repeats per measurement (default 3, quick 1)")
        sp.add_argument("--workers", type=int, help="DataLoader workers / reader threads (default 2)")
        sp.add_argument("--tiles", type=int, help="timed tiles per loading repeat (default 2000)")
        sp.add_argument("--cache-dir", help="where generated rasters are kept (default benchmarks/.data)")
        sp.add_argument("--torch-threads", type=int, help="torch intra-op threads for training/inference (default: torch's)")
        sp.add_argument("--gdal-cache-mb", type=int, help="GDAL block cache per loading process (default 64; 0: GDAL's default)")

    r = sub.add_parser("run", help="run sections and write BENCHMARKS.md")
    common(r)
    r.add_argument("--only", help=f"comma-separated sections ({','.join(SECTIONS)}); default all")
    r.add_argument("--out", type=Path, help="Markdown file (default BENCHMARKS.md; quick: benchmarks/.data/quick/)")
    r.add_argument("--results", type=Path, help="results folder (default benchmarks/results; quick: beside --out)")

    rd = sub.add_parser("render", help="rewrite BENCHMARKS.md from stored results")
    rd.add_argument("--out", type=Path, default=DEFAULT_OUT)
    rd.add_argument("--results", type=Path, default=DEFAULT_RESULTS)

    s = sub.add_parser("section", help="run one section in this process (used by run)")
    s.add_argument("name", choices=SECTIONS)
    s.add_argument("--config", required=True, help="Config as JSON")
    s.add_argument("--json", type=Path, required=True, help="where to write the result")
    s.add_argument("--command", default="")

    pr = sub.add_parser("profile-loading", help="cProfile geobp's loader and the bare loop (num_workers=0)")
    common(pr)
    pr.add_argument("--profile-tiles", type=int, default=400)

    sub.add_parser("monitor-cost", add_help=False, help="GradientFlowMonitor cost by component "
                   "(see benchmarks/monitor.py; --device, --precision, --batch, --size, --steps, --warmup)")

    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["monitor-cost"]:
        from benchmarks.monitor import main as monitor_cost

        return monitor_cost(argv[1:])
    args = p.parse_args(argv)
    if args.cmd == "section":
        result = run_section_here(args.name, Config.from_json(args.config), args.command)
        atomic_write_text(args.json, json.dumps(result, indent=1, default=float))
        return 0
    if args.cmd == "render":
        render_to(args.out, args.results)
        print(f"wrote {args.out}")
        return 0
    cfg = _config(args)
    if args.cmd == "profile-loading":
        if cfg.gdal_cache_mb > 0:
            os.environ.setdefault("GDAL_CACHEMAX", str(cfg.gdal_cache_mb))
        from benchmarks.loading import profile_geobp

        print(profile_geobp(cfg, tiles=args.profile_tiles))
        return 0

    names = _parse_only(args.only)
    out = args.out or (QUICK_DIR / "BENCHMARKS.md" if cfg.quick else DEFAULT_OUT)
    results_dir = args.results or (out.parent / "results" if cfg.quick else DEFAULT_RESULTS)
    command = "python -m benchmarks " + shlex.join(argv)
    failed = []
    for name in names:
        print(f"[benchmarks] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            result = run_section_subprocess(name, cfg, results_dir, command)
        except Exception:  # keep the other sections' results
            traceback.print_exc()
            failed.append(name)
            continue
        if result.get("error"):
            failed.append(name)
        atomic_write_text(results_dir / f"{name}.json", json.dumps(result, indent=1, default=float))
        status = f"FAILED ({result['error']})" if result.get("error") else "done"
        print(f"[benchmarks] {name} {status} in {time.perf_counter() - start:.0f} s", flush=True)
    render_to(out, results_dir, quick=cfg.quick)
    print(f"[benchmarks] wrote {out}")
    return 1 if failed else 0
