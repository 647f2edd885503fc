#!/usr/bin/env bash
# GPU smoke run: the GPU paths for real, on synthetic scenes, in a few minutes.
#   bash scripts/gpu_smoke.sh [OUT_DIR]
# - geobp fit with configs/gpu.yaml at bf16-mixed (channels_last) and at 16-mixed (loss scaling),
#   each writing its gradient-flow report;
# - geobp infer under bf16 autocast on the GPU;
# - the GPU-marked tests.
# Uses `python` from PATH (activate .venv first, or set PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-runs/gpu_smoke}
DATA=$OUT/data
mkdir -p "$OUT"
[[ -d $DATA/images ]] || $PY -m geobp synth --out "$DATA" --scenes 6 --size 1024 --bands 6 --classes 5 --block-size 256
for prec in bf16-mixed 16-mixed; do
  $PY -m geobp fit --config configs/gpu.yaml --data.root "$DATA" --data.num_classes 5 \
    --data.class_names '[water,forest,cropland,urban,bare_soil]' --data.split scene --data.val_fraction 0.34 \
    --data.tile_size 256 --data.tiles_per_epoch 1600 --data.batch_size 16 --data.num_workers 6 \
    --trainer.max_epochs 3 --trainer.precision "$prec" --gradflow.every_n_steps 10 \
    --trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.name "$prec"
done
CKPT=$(ls -t "$OUT"/runs/bf16-mixed/version_*/checkpoints/last.ckpt | head -1)
$PY -m geobp infer --ckpt "$CKPT" --out "$OUT/pred" --accelerator gpu --precision bf16-mixed --overwrite "$DATA/images"
$PY -m pytest -q -m gpu -p no:cacheprovider tests
