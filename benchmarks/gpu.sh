#!/usr/bin/env bash
# Every GPU figure the project claims, in one run (at most ~8 minutes on one GPU), as one table:
#   train    img/s, resnet34 U-Net at 256x256, bf16 + channels_last, fed from Zarr, against the
#            same steps on in-memory tensors (benchmarks/train.py)       target >= 1,500 img/s
#   predict  img/s, 5 folds x d4 TTA at 256x256, JPEG files to PNG masks, against the model-only
#            rate (benchmarks/predict.py)        targets >= 100 img/s, e2e / model-only >= 0.8
#   scaling  two folds at once on two GPUs (one process per GPU) against one alone: efficiency
#            = combined img/s / (2 x single img/s); only with 2+ GPUs
#   serve    p50/p99 latency over HTTP with 1 and 8 clients (benchmarks/serve.py)
#
#   benchmarks/gpu.sh            needs a CUDA device; refuses (exit 2) without one
#   benchmarks/gpu.sh --dry-run  the same sequence on the CPU at tiny sizes (checks the wiring,
#                                not the figures: targets are not judged)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: benchmarks/gpu.sh [--dry-run]" >&2; exit 64 ;;
esac

GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [ "$DRY" = 0 ] && [ "$GPUS" = 0 ]; then
  echo "benchmarks/gpu.sh: no CUDA device here (torch.cuda.is_available() is False), so there" >&2
  echo "is nothing to measure. Run it on a GPU host, or 'benchmarks/gpu.sh --dry-run' for a tiny" >&2
  echo "CPU run of the same steps." >&2
  exit 2
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
cd "$ROOT"
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  echo ">> dry run on the CPU, tiny sizes (figures are not comparable to the targets)"
  TRAIN=(--n 16 --size 64 --encoder resnet18 --batch-size 4 --steps 4 --repeats 1)
  PRED=(--folds 2 --tta d4 --size 64 64 --train-n 8 --repeats 1)
  SERVE=(--folds 2 --tta flips --size 64 64 --train-n 8 --generated 4 --gen-size 128 128)
  SERVE_N=(--requests 2)
else
  echo ">> $GPUS CUDA device(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
  TRAIN=(--size 256 --encoder resnet34 --amp bf16 --steps 200 --repeats 2)
  PRED=(--folds 5 --tta d4 --size 256 256 --replicate 8 --repeats 2 --batch-size 32)
  SERVE=(--folds 5 --tta d4 --size 256 256)
  SERVE_N=(--requests 16)
fi

echo ">> train"
"$PY" benchmarks/train.py "${TRAIN[@]}" --json | tail -1 >"$OUT/train.json"
if [ "$GPUS" -ge 2 ]; then
  echo ">> two-fold scaling (GPU 0 and GPU 1 at once)"
  CUDA_VISIBLE_DEVICES=0 "$PY" benchmarks/train.py "${TRAIN[@]}" --json | tail -1 >"$OUT/s0.json" &
  P0=$!
  CUDA_VISIBLE_DEVICES=1 "$PY" benchmarks/train.py "${TRAIN[@]}" --json | tail -1 >"$OUT/s1.json" &
  P1=$!
  wait "$P0" "$P1"
fi
echo ">> predict"
"$PY" benchmarks/predict.py "${PRED[@]}" --json | tail -1 >"$OUT/predict.json"
echo ">> serve, 1 and 8 clients"
"$PY" benchmarks/serve.py "${SERVE[@]}" --clients 8 "${SERVE_N[@]}" --json | tail -1 >"$OUT/serve.json"

"$PY" - "$OUT" "$DRY" <<'PY'
import json, pathlib, sys

out, dry = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
load = lambda n: json.loads((out / f"{n}.json").read_text()) if (out / f"{n}.json").exists() else None
train, pred, serve = load("train"), load("predict"), load("serve")
s0, s1 = load("s0"), load("s1")
rows = []

def row(figure, value, target, ok):
    verdict = "-" if dry or ok is None else ("pass" if ok else "MISS")
    rows.append((figure, value, target, verdict))

ips = train["images_per_s"]
row(f"train img/s ({train['device']}, {train['amp']})", f"{ips['zarr']:.1f}", ">= 1500", ips["zarr"] >= 1500)
row("train zarr / in-memory", f"{train['ratio']:.3f}", ">= 0.9", train["ratio"] >= 0.9)
if "images_per_s" in pred:
    pips = pred["images_per_s"]
    row("predict img/s (5 folds x d4, e2e)", f"{pips['segflow']:.1f}", ">= 100",
        pips["segflow"] >= 100)
    row("predict e2e / model-only", f"{pred['segflow_over_model_only']:.3f}", ">= 0.8",
        pred["segflow_over_model_only"] >= 0.8)
else:  # benchmarks/predict.py reads the full-resolution ISIC JPEGs of ../shared/data
    row("predict img/s (5 folds x d4, e2e)", "skipped", str(pred.get("speed"))[:60], None)
if s0 and s1:
    both = s0["images_per_s"]["zarr"] + s1["images_per_s"]["zarr"]
    eff = both / (2 * ips["zarr"])
    row("two-fold scaling efficiency", f"{eff:.3f}", "reported", None)
else:
    row("two-fold scaling efficiency", "n/a (< 2 GPUs)", "needs 2+ GPUs", None)
for name, label in (("http_1", "1 client"), ("http_n", "8 clients")):
    r = serve["loads"][name]
    row(f"serve p50 / p99 ms, {label}", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}", "reported", None)

w = [max(len(str(r[i])) for r in rows + [("figure", "value", "target", "verdict")]) for i in range(4)]
print()
for r in [("figure", "value", "target", "verdict"), *rows]:
    print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
PY
