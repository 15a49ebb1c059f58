#!/usr/bin/env bash
# The main job on embedded defaults: local folder store, local Dask (and, as stages land,
# Prefect's local API and local Ray). Generated demo data, so it runs offline.
set -euo pipefail
OUT="${1:-demo-out}"
BIN="${BIN:-.venv/bin}"
N="${DEMO_N:-64}"
mkdir -p "$OUT"
echo ">> 1/2 generating $N synthetic ISIC-layout images in $OUT/raw"
"$BIN/segflow" demo-data --out "$OUT/raw" --n "$N"
echo ">> 2/2 ingesting into $OUT/dataset.zarr (rerun: a no-op)"
"$BIN/segflow" ingest --layout isic --source "$OUT/raw" --dataset "$OUT/dataset.zarr" --size 128 128
"$BIN/segflow" ingest --layout isic --source "$OUT/raw" --dataset "$OUT/dataset.zarr" --size 128 128 --json | tail -1
echo ">> done: dataset at $OUT/dataset.zarr, report at $OUT/dataset.zarr/report.json"
