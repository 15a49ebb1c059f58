#!/usr/bin/env bash
# The main job on embedded defaults: a local folder store, local Dask, local Ray, generated
# demo data (so it runs offline). Each stage is incremental: a second `make demo` is fast.
set -euo pipefail
OUT="${1:-demo-out}"
BIN="${BIN:-.venv/bin}"
N="${DEMO_N:-64}"
EPOCHS="${DEMO_EPOCHS:-4}"
mkdir -p "$OUT"
echo ">> 1/3 generating $N synthetic ISIC-layout images in $OUT/raw"
"$BIN/segflow" demo-data --out "$OUT/raw" --n "$N"
echo ">> 2/3 ingesting into $OUT/dataset.zarr"
"$BIN/segflow" ingest --layout isic --source "$OUT/raw" --dataset "$OUT/dataset.zarr" --size 128 128
echo ">> 3/3 training 2 folds x $EPOCHS epochs on local Ray (resnet18 U-Net) into $OUT/models"
"$BIN/segflow" train --dataset "$OUT/dataset.zarr" --models "$OUT/models" --folds 2 \
    --epochs "$EPOCHS" --encoder resnet18 --batch-size 8 --lr 1e-3
echo ">> done: dataset $OUT/dataset.zarr, models $OUT/models (curves: $OUT/models/fold-*/curves.png)"
