"""Crop throughput of segflow against two references measured in the same run.

On the 32 full-resolution ISIC 2017 JPEGs (``shared/data/isic2017/fullres``), with their true
masks standing in for predicted ones, it times:

1. naive: the seed's loop: one process, OpenCV ``findContours``, a bounding rectangle per
   contour, each crop written to the image's one output file (the last contour wins);
2. decode floor: every core (a thread pool) fully decoding image and mask, nothing written;
3. segflow: ``segflow.crops.make_crops`` (mode masked, ``--format``, PNG by default) into a
   fresh folder.

Each is repeated ``--repeats`` times, interleaved, and the best (shortest) is reported. Target:
segflow is at least 0.8x the decode floor.

    python benchmarks/crops.py [--repeats 3] [--format png|jpeg] [--json] [--data DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("SEGFLOW_BENCH_DATA", REPO.parent / "shared/data"))
TARGET_VS_FLOOR = 0.8

Pair = tuple[Path, Path]  # (image, mask)


def find_pairs(root: Path) -> list[Pair]:
    pairs = []
    for image in sorted((root / "images").glob("ISIC_*.jpg")):
        mask = root / "masks" / f"{image.stem}_segmentation.png"
        if mask.is_file():
            pairs.append((image, mask))
    return pairs


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- 1. naive -------------------------------------------------------------------------------------
def naive_crops(pairs: list[Pair], out: Path) -> None:
    """The seed's way: a box per contour, every crop to the same file (last contour wins)."""
    import cv2

    for image_path, mask_path in pairs:
        image = cv2.imread(str(image_path))
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for c in contours:
            x, y, w, h = cv2.boundingRect(c)
            cv2.imwrite(str(out / f"{image_path.stem}.png"), image[y : y + h, x : x + w])


def time_naive(pairs: list[Pair]) -> float:
    with tempfile.TemporaryDirectory(prefix="segflow-bench-naive-") as tmp:
        t0 = time.perf_counter()
        naive_crops(pairs, Path(tmp))
        return time.perf_counter() - t0


# -- 2. decode floor ------------------------------------------------------------------------------
def decode_pair(pair: Pair) -> None:
    image_path, mask_path = pair
    np.asarray(Image.open(io.BytesIO(image_path.read_bytes())).convert("RGB"))
    np.asarray(Image.open(io.BytesIO(mask_path.read_bytes())).convert("L"))


def time_floor(pool: ThreadPoolExecutor, pairs: list[Pair]) -> float:
    t0 = time.perf_counter()
    list(pool.map(decode_pair, pairs))
    return time.perf_counter() - t0


# -- 3. segflow -----------------------------------------------------------------------------------
def predictions_folder(pairs: list[Pair], tmp: Path) -> Path:
    """True masks as a predictions folder: ``<tmp>/preds/masks/<id>_segmentation.png``."""
    masks = tmp / "preds" / "masks"
    masks.mkdir(parents=True)
    for _, mask in pairs:
        (masks / mask.name).symlink_to(mask.resolve())
    return tmp / "preds"


def time_segflow(preds: Path, source: Path, n: int, fmt: str) -> float:
    from segflow.crops import CropsConfig, make_crops

    with tempfile.TemporaryDirectory(prefix="segflow-bench-crops-") as tmp:
        cfg = CropsConfig(
            predictions=str(preds),
            source=str(source),
            out=tmp,
            mode="masked",
            format=fmt,
            layout="isic",
        )
        t0 = time.perf_counter()
        result = make_crops(cfg)
        seconds = time.perf_counter() - t0
    if result.n_ok != n:
        raise RuntimeError(f"segflow crops: expected {n} crops, got {result.to_dict()}")
    return seconds


# -- main -----------------------------------------------------------------------------------------
def run(data: Path, repeats: int, fmt: str = "png") -> dict:
    root = data / "isic2017" / "fullres"
    pairs = find_pairs(root)
    if not pairs:
        return {"skipped": f"no ISIC image/mask pairs under {root}"}
    n = len(pairs)
    runs: dict[str, list[float]] = {"naive": [], "floor": [], "segflow": []}
    with tempfile.TemporaryDirectory(prefix="segflow-bench-preds-") as tmp:
        preds = predictions_folder(pairs, Path(tmp))
        with ThreadPoolExecutor(cores()) as pool:
            list(pool.map(decode_pair, pairs[: 2 * cores()]))  # warm up: page cache, threads
            time_segflow(preds, root / "images", n, fmt)  # warm up: lazy imports of Dask
            for _ in range(repeats):  # interleaved, so background load hits all alike
                runs["naive"].append(time_naive(pairs))
                runs["floor"].append(time_floor(pool, pairs))
                runs["segflow"].append(time_segflow(preds, root / "images", n, fmt))
    rate = {k: n / min(v) for k, v in runs.items()}
    return {
        "images": n,
        "cores": cores(),
        "repeats": repeats,
        "format": fmt,
        "img_per_s": {k: round(v, 2) for k, v in rate.items()},
        "segflow_vs_floor": round(rate["segflow"] / rate["floor"], 3),
        "segflow_vs_naive": round(rate["segflow"] / rate["naive"], 3),
        "target_vs_floor": TARGET_VS_FLOOR,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--format", choices=("png", "jpeg"), default="png")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    report = run(args.data, args.repeats, args.format)
    if args.json:
        print(json.dumps(report))
    elif "skipped" in report:
        print(f"skipped: {report['skipped']}")
    else:
        print(
            f"{report['images']} images, {report['cores']} cores, best of {args.repeats}, "
            f"segflow mode masked, {args.format}"
        )
        for name, value in report["img_per_s"].items():
            print(f"  {name:8s} {value:8.2f} img/s")
        print(
            f"  segflow/floor {report['segflow_vs_floor']:.3f} (target >= {TARGET_VS_FLOOR})"
            f"  segflow/naive {report['segflow_vs_naive']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
