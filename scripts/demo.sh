#!/usr/bin/env bash
# The main job on embedded defaults: pipeline_flow (ingest -> K-fold training on local Ray ->
# ensemble + TTA prediction -> evaluation -> crops) on generated demo data, with a local folder
# store and Prefect's local API (or the server at PREFECT_API_URL). Every task is cached by
# the content of its inputs: a second `make demo` is all cache hits and takes seconds.
set -euo pipefail
OUT="${1:-demo-out}"
BIN="${BIN:-.venv/bin}"
N="${DEMO_N:-64}"
EPOCHS="${DEMO_EPOCHS:-5}"
mkdir -p "$OUT"
echo ">> 1/2 generating $N synthetic ISIC-layout images in $OUT/raw (+16 held back in $OUT/holdout)"
"$BIN/segflow" demo-data --out "$OUT/raw" --n "$N" --seed 0
"$BIN/segflow" demo-data --out "$OUT/holdout" --n 16 --seed 1
cat > "$OUT/pipeline.yaml" <<YAML
# written by scripts/demo.sh; run it again with: segflow run --config $OUT/pipeline.yaml
flow: pipeline
dataset_source: $OUT/raw
layout: isic
models_url: $OUT/models
source: $OUT/holdout
out_url: $OUT/predictions
config:
  ingest: {size: [128, 128]}
  train: {folds: 2, epochs: $EPOCHS, encoder: resnet18, batch_size: 4, lr: 0.001}
  predict: {tta: flips}
  truth: $OUT/holdout
  crops: {mode: all}
YAML
echo ">> 2/2 running pipeline_flow from $OUT/pipeline.yaml (Prefect; folds on local Ray)"
"$BIN/segflow" run --config "$OUT/pipeline.yaml" --json | tail -1 > "$OUT/pipeline-result.json"
"$BIN/python" - "$OUT/pipeline-result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t, s = r["train"], r["segment"]
print(f">> done: model version {t['version']} (OOF Dice {t['oof']['dice']:.3f}, "
      f"threshold {t['choice']['threshold']:.2f}, {t['choice']['postprocess']})")
print(f"   held-back Dice {s['evaluation']['mean_dice']:.3f} over {s['evaluation']['n']} images; "
      f"masks {s['predictions']['masks']}; crops {s['crops']['manifest']}")
PY
