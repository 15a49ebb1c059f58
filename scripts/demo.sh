#!/usr/bin/env bash
# The main job on embedded defaults: a local folder store, local Dask, local Ray, generated
# demo data (so it runs offline). Each stage is incremental: a second `make demo` is fast.
set -euo pipefail
OUT="${1:-demo-out}"
BIN="${BIN:-.venv/bin}"
N="${DEMO_N:-64}"
EPOCHS="${DEMO_EPOCHS:-5}"
mkdir -p "$OUT"
echo ">> 1/6 generating $N synthetic ISIC-layout images in $OUT/raw (+16 held back in $OUT/holdout)"
"$BIN/segflow" demo-data --out "$OUT/raw" --n "$N" --seed 0
"$BIN/segflow" demo-data --out "$OUT/holdout" --n 16 --seed 1
echo ">> 2/6 ingesting into $OUT/dataset.zarr"
"$BIN/segflow" ingest --layout isic --source "$OUT/raw" --dataset "$OUT/dataset.zarr" --size 128 128
echo ">> 3/6 training 2 folds x $EPOCHS epochs on local Ray (resnet18 U-Net) into $OUT/models"
"$BIN/segflow" train --dataset "$OUT/dataset.zarr" --models "$OUT/models" --folds 2 \
    --epochs "$EPOCHS" --encoder resnet18 --batch-size 4 --lr 1e-3
echo ">> 4/6 predicting the held-back images (ensemble of 2 folds x flips TTA, auto threshold)"
"$BIN/segflow" predict --models "$OUT/models" --source "$OUT/holdout" --layout isic \
    --out "$OUT/predictions" --tta flips
echo ">> 5/6 evaluating the held-back predictions against their masks"
"$BIN/segflow" evaluate --predictions "$OUT/predictions/masks" --truth "$OUT/holdout" --layout isic
echo ">> 6/6 cropping each held-back image to its predicted lesion"
"$BIN/segflow" crops --predictions "$OUT/predictions" --source "$OUT/holdout" --layout isic \
    --out "$OUT/crops" --mode all
echo ">> done: dataset $OUT/dataset.zarr, models $OUT/models, masks $OUT/predictions/masks,"
echo "   crops $OUT/crops (manifest $OUT/crops/crops.csv)"
