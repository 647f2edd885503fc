#!/usr/bin/env bash
# Download, into .whl/ (ignored by git), the wheels that scripts/gpu_bench.sh installs on the lent GPU
# machine (nvidia-h200: Python 3.12, x86-64, no package registry; torch, lightning, torchmetrics, timm,
# numpy, scipy, pyyaml, rich, matplotlib, opencv-python-headless, tensorboard, pytest and hypothesis are
# there already). These are what geobp imports for `geobp fit`/`geobp infer` and its tests that the
# machine lacks, at the versions of the development environment. Run once, from the repository root:
#     bash scripts/gpu_wheels.sh
# then carry .whl with the run (see BENCHMARKS.md, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(
  rasterio==1.4.4 affine==3.0.1 cligj==0.7.2 click-plugins==1.1.1.2
  albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 simsimd==6.5.16 stringzilla==5.3.2
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.14.0
)
mkdir -p .whl
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    -d .whl "$w"
done
ls -1 .whl
du -sh .whl
