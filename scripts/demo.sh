#!/usr/bin/env bash
# The main job on embedded defaults: pipeline_flow (ingest -> K-fold training on local Ray ->
# ensemble + TTA prediction -> evaluation -> crops) on generated demo data, with a local folder
# store and Prefect's local API (or the server at PREFECT_API_URL). Every task is cached by
# the content of its inputs: a second `make demo` is all cache hits and takes seconds.
#
# Then the model lifecycle in two versions: the first retrain is gated against a frozen
# benchmark ($OUT/benchmark) and, as the first version, promoted to `production`; a second
# retrain, warm-started from production on a week of bad labels (masks shuffled between
# images), is gated against it, and the log says whether it was promoted and why. The
# week-2 retrain fine-tunes at the full rate (init_lr_scale 1.0, not the default 0.1), as a
# team would after a large relabelling: the bad labels then reach the weights within the
# demo's few epochs, and the gate has a worse model to refuse.
set -euo pipefail
OUT="${1:-demo-out}"
BIN="${BIN:-.venv/bin}"
N="${DEMO_N:-64}"
EPOCHS="${DEMO_EPOCHS:-5}"
mkdir -p "$OUT"
echo ">> 1/4 generating $N synthetic ISIC-layout images in $OUT/raw (+16 held back in $OUT/holdout, +16 in the benchmark $OUT/benchmark)"
"$BIN/segflow" demo-data --out "$OUT/raw" --n "$N" --seed 0
"$BIN/segflow" demo-data --out "$OUT/holdout" --n 16 --seed 1
"$BIN/segflow" demo-data --out "$OUT/benchmark" --n 16 --seed 2
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
  gate: {benchmark: $OUT/benchmark, layout: isic, margin: 0.0}
YAML
echo ">> 2/4 running pipeline_flow from $OUT/pipeline.yaml (Prefect; folds on local Ray)"
"$BIN/segflow" run --config "$OUT/pipeline.yaml" --json | tail -1 > "$OUT/pipeline-result.json"
"$BIN/python" - "$OUT/pipeline-result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t, s = r["train"], r["segment"]
print(f">> done: model version {t['version']} (OOF Dice {t['oof']['dice']:.3f}, "
      f"threshold {t['choice']['threshold']:.2f}, {t['choice']['postprocess']})")
print(f"   held-back Dice {s['evaluation']['mean_dice']:.3f} over {s['evaluation']['n']} images; "
      f"masks {s['predictions']['masks']}; crops {s['crops']['manifest']}")
p = t["promotion"]
print(f">> gate, version 1: {p['decision']}: {p['reason']} (production: {p['production']})")
PY

echo ">> 3/4 a week of bad labels: $OUT/raw-week2 has the same images, masks shuffled between them"
"$BIN/python" - "$OUT/raw" "$OUT/raw-week2" <<'PY'
import pathlib, shutil, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
images = sorted(src.glob("ISIC_*[0-9].jpg"))
masks = [src / f"{p.stem}_segmentation.png" for p in images]
for image, mask in zip(images, masks[1:] + masks[:1]):  # every image gets its neighbour's mask
    shutil.copyfile(image, dst / image.name)
    shutil.copyfile(mask, dst / f"{image.stem}_segmentation.png")
PY
sed -e "s#dataset_source: $OUT/raw#dataset_source: $OUT/raw-week2#" \
    -e "s#out_url: $OUT/predictions#out_url: $OUT/predictions-week2#" \
    -e "s#^  ingest: {size: \[128, 128\]}#  dataset: $OUT/models/dataset-week2.zarr\n  ingest: {size: [128, 128]}#" \
    -e "s#^  train: {\(.*\)}#  train: {\1, init_from: production, init_lr_scale: 1.0}#" \
    "$OUT/pipeline.yaml" > "$OUT/pipeline-week2.yaml"
echo ">> 4/4 retraining on it, warm-started from production, gated against the benchmark"
"$BIN/segflow" run --config "$OUT/pipeline-week2.yaml" --json | tail -1 > "$OUT/pipeline-week2-result.json"
"$BIN/python" - "$OUT/pipeline-week2-result.json" "$BIN" "$OUT/models" <<'PY'
import json, subprocess, sys
r = json.load(open(sys.argv[1]))
p = r["train"]["promotion"]
print(f">> gate, version 2 ({p['version']}): {p['decision']}: {p['reason']}")
print(f"   production is {p['production']}; the week-2 images were segmented with "
      f"{r['segment']['version']}")
print(subprocess.run([f"{sys.argv[2]}/segflow", "models", "list", "--models", sys.argv[3]],
                     capture_output=True, text=True).stdout)
PY
