"""Section "help": how long ``geobp --help`` and ``geobp VERB --help`` take, against importing rasterio.

Each command runs in a fresh Python process (as a user's shell starts it), timed from start to
exit; the baseline is ``python -c "import rasterio"``, the least any geobp command pays. The help
pages are built without torch and Lightning: the argparse verbs' parsers import only their
option choices (:mod:`geobp.choices`), and ``fit``/``validate``/``test`` print a page cached
under ``$XDG_CACHE_HOME/geobp`` (here a fresh folder, filled by one untimed call first).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import REPO, Config, SectionResult, fmt, machine_info, median, spread, table, target

#: (label, command after ``python``)
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('python -c "import rasterio" (baseline)', ("-c", "import rasterio")),
    ("geobp --help", ("-m", "geobp", "--help")),
    ("geobp infer --help", ("-m", "geobp", "infer", "--help")),
    ("geobp check --help", ("-m", "geobp", "check", "--help")),
    ("geobp fit --help (cached page)", ("-m", "geobp", "fit", "--help")),
)
#: What a help page may take on this machine, in seconds.
TARGET_S = 1.5


def wall_seconds(args: tuple[str, ...], env: dict[str, str]) -> float:
    """Seconds from starting ``python ARGS`` to its exit (output discarded).

    Raises:
        RuntimeError: the command failed.
    """
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return seconds


def run(cfg: Config) -> dict[str, Any]:
    repeats = max(cfg.repeats, 3) if cfg.quick else max(cfg.repeats, 7)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache, "COLUMNS": "100",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        wall_seconds(("-m", "geobp", "fit", "--help"), env)  # builds the cached page (imports Lightning)
        build_s = time.perf_counter() - start
        seconds: dict[str, list[float]] = {label: [] for label, _ in COMMANDS}
        for _ in range(repeats):  # the commands alternate, so a busy moment spreads over all of them
            for label, args in COMMANDS:
                seconds[label].append(wall_seconds(args, env))
        for label, _ in COMMANDS:
            print(f"help: {label}: median {median(seconds[label]):.3f} s", flush=True)
    base = median(seconds[COMMANDS[0][0]])
    rows = [[label, median(s), spread(s), median(s) / base] for label, s in seconds.items()]
    machine = machine_info()
    result = SectionResult(
        section="help",
        title="Command-line help",
        setup=["Each command in a fresh `python` process, wall time from start to exit, output discarded; "
               f"{repeats} repeats, the commands alternating; the baseline is `python -c \"import rasterio\"`.",
               "The `fit --help` page comes from the help cache (filled by one untimed call first, which builds it "
               f"with LightningCLI in {build_s:.1f} s).",
               f"On {machine['cpu']} ({machine['usable_cores']} usable cores)."],
        tables=[table("Seconds to print a help page", ["command", "seconds (median)", "min-max", "/ import rasterio"], rows)],
        targets=[target(f"help: {label}, seconds", median(seconds[label]), "<=", TARGET_S,
                        f"{fmt(median(seconds[label]))} s ({fmt(median(seconds[label]) / base)}x import rasterio)")
                 for label, _ in COMMANDS[1:3]],
        notes=["No help page imports torch or Lightning (tests/cli/test_help.py checks it); a stale cache key "
               "(another geobp version or source file, Lightning or jsonargparse version, terminal width) rebuilds "
               "the `fit`/`validate`/`test` page once."],
        metrics={"seconds": seconds, "baseline_s": base, "build_fit_help_s": build_s,
                 "ratio": {label: median(s) / base for label, s in seconds.items()}},
    )
    return result.to_dict()
