"""The benchmark section "help" runs at quick sizes and renders its table (timings are never asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_help_section_times_every_command_against_rasterio(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "help", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "## 5b. Command-line help" in text
    for row in ('python -c "import rasterio" (baseline)', "geobp --help", "geobp infer --help", "geobp fit --help (cached page)"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row}"))
        assert re.search(r"\| [\d.]+ \|", line), line
    assert re.search(r"geobp infer --help, seconds [\d.]+ s \([\d.]+x import rasterio\) \(<= 1.5: (PASS|MISS)\)", text)
    stored = json.loads((tmp_path / "results" / "help.json").read_text())
    assert stored["metrics"]["baseline_s"] > 0 and len(stored["metrics"]["seconds"]["geobp --help"]) == 3
