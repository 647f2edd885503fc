#!/usr/bin/env bash
# The GPU run of issue #15, prepared to finish within 8 minutes on a lent H100/H200 (16 cores).
#
# Once, on the development machine, from the repository root (wheels of what the GPU machine lacks
# into .whl/, which git ignores; about 45 MB):
#     bash scripts/gpu_wheels.sh
# Then through the device tool, from the checkout to measure (its commit, since .git does not travel):
#     run  command: "GEOBP_COMMIT=<git rev-parse --short HEAD> bash scripts/gpu_bench.sh"
#          carry: [".whl"]   timeout_s: 540
#
# It installs the wheels into /tmp/site, runs benchmarks/gpu.py within a time budget (results are
# written after each part, so a cut-short run keeps what it measured), then the GPU-marked tests.
# Everything lands in $OUT (the device tool's folder; /tmp/geobp_gpu_out elsewhere):
#   gpu.json          the result file (copy to benchmarks/results/gpu.json, then `python -m benchmarks render`)
#   gpu_profile.txt   torch.profiler summaries of a few training steps of each variant
#   bench.log         the benchmark's output;  pytest_gpu.log  the GPU tests;  env.txt  device and packages
# Worst case: wheels ~20 s, benchmark killed at BUDGET_S + 60 s, tests killed at 120 s: under 8 minutes.
#
# Checking it without a GPU (tiny sizes on the CPU, the installed environment's Python, no wheels):
#     PY=.venv/bin/python DRY_RUN=1 SKIP_WHEELS=1 OUT=/tmp/gpu_bench bash scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/geobp_gpu_out}
BUDGET_S=${BUDGET_S:-270}
PY=${PY:-python3}
DRY=()
[ "${DRY_RUN:-0}" = 1 ] && DRY=(--dry-run)
mkdir -p "$OUT"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if [ "${SKIP_WHEELS:-0}" = 1 ]; then
  export PYTHONPATH=$PWD
elif compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the wheels of .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/: run scripts/gpu_wheels.sh here and carry .whl; parts needing rasterio will be skipped" >&2
  export PYTHONPATH=$PWD
fi
# albumentations would look for a newer version online at import (nothing is reachable there)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 NO_ALBUMENTATIONS_UPDATE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  echo "cores: $(nproc)"; "$PY" --version
  "$PY" -c "import torch, lightning, rasterio; print('torch', torch.__version__, 'lightning', lightning.__version__, 'rasterio', rasterio.__version__, 'gdal', rasterio.__gdal_version__)" 2>&1
  "$PY" -c "import geobp.cli, geobp.task; print('geobp imports: ok')" 2>&1 | tail -n 3
  echo "commit: ${GEOBP_COMMIT:-unknown}"
} >"$OUT/env.txt"
cat "$OUT/env.txt"

# the benchmark: at most BUDGET_S for its parts, killed after BUDGET_S + 60 s in any case
timeout --kill-after=10 $((BUDGET_S + 60)) "$PY" benchmarks/gpu.py --out "$OUT/gpu.json" --budget-s "$BUDGET_S" \
  --work /tmp "${DRY[@]}" >"$OUT/bench.log" 2>&1
echo "benchmark exit $? after $(elapsed) s"
grep -v "Warning\|warn(" "$OUT/bench.log" | tail -n 5

# the GPU-marked tests (test files without GPU tests are left out: they need packages not carried)
timeout --kill-after=10 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/training/test_gpu_training.py tests/callbacks/test_precision.py tests/data/test_preprocessing.py >"$OUT/pytest_gpu.log" 2>&1
echo "GPU tests exit $? after $(elapsed) s"
tail -n 15 "$OUT/pytest_gpu.log"
ls -la "$OUT"
