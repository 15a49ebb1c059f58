"""How well ``uncertainty`` finds the bad masks: 5-fold out-of-fold on ISIC 2017 train.

Ingests the 2,000 ISIC 2017 training images (``shared/data/isic2017/train``) at ``--size``,
trains ``--folds`` folds cheaply (EfficientNet-Lite0 U-Net from the packaged ImageNet weights,
``--epochs`` epochs, inline on the CPU), and lets ``choose_from_models`` pick the threshold,
post-processing and the review threshold on the OOF predictions. Then, over the OOF images:

* Spearman's rho between each image's OOF uncertainty (``fold-<k>/oof.json``) and its Jaccard
  at the chosen threshold and post-processing (target rho <= -0.4);
* the mean Jaccard of the unflagged minus the flagged images (target gap >= 0.2);
* the calibration's precision, recall and F1 on OOF (flagging Jaccard < 0.65).

The last line of output is JSON. Skips (exit 0, ``"skipped"``) when the data is absent.

    python benchmarks/uncertainty.py [--size 96] [--epochs 3] [--folds 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/isic2017/train"
TARGET_RHO = -0.4
TARGET_GAP = 0.2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None, help="keep the dataset and models here")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the folds")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (args.data / "images").is_dir():
        print(json.dumps({"skipped": f"no ISIC 2017 train data at {args.data}"}))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="segflow-unc-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dataset, models = str(work / "ds.zarr"), str(work / "models")

    from segflow.ingest import IngestConfig, ingest

    size = (args.size, args.size)
    source = subset(args.data, args.limit, work / "subset") if args.limit else args.data
    ingest(
        IngestConfig(
            layout="isic",
            source=str(source),
            dataset=dataset,
            size=size,
            allow_external_links=bool(args.limit),  # the subset is symlinks into --data
        )
    )
    t_ingest = time.perf_counter() - t0

    from segflow.train.config import TrainConfig
    from segflow.train.run import prepare_run, run_fold

    cfg = TrainConfig(
        dataset=dataset,
        models=models,
        folds=args.folds,
        encoder="timm-tf_efficientnet_lite0",
        encoder_weights="efficientnet-lite0-imagenet",
        epochs=args.epochs,
        batch_size=args.batch_size,
        executor="inline",
        early_stopping=None,
        cache_mb=512,
        cpus_per_fold=args.threads,
    )
    # fold by fold, as the flow runs them: the choice is made once, below, by measure()
    for fold in prepare_run(cfg):
        run_fold(cfg, fold)
    t_train = time.perf_counter() - t0 - t_ingest
    figures = measure(models, dataset)
    figures.update(
        {
            "data": str(args.data),
            "images": args.limit or "all",
            "size": args.size,
            "epochs": args.epochs,
            "folds": args.folds,
            "encoder": "timm-tf_efficientnet_lite0 (efficientnet-lite0-imagenet)",
            "ingest_s": round(t_ingest, 1),
            "train_s": round(t_train, 1),
            "total_s": round(time.perf_counter() - t0, 1),
            "rho_target": TARGET_RHO,
            "gap_target": TARGET_GAP,
            "rho_ok": figures["spearman_rho"] <= TARGET_RHO,
            "gap_ok": figures["jaccard_gap"] is not None and figures["jaccard_gap"] >= TARGET_GAP,
        }
    )
    print(json.dumps(figures))
    return 0


def subset(data: Path, n: int, folder: Path) -> Path:
    """The first ``n`` images (by name) and their masks, as symlinks in ``folder``."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for img in sorted((data / "images").iterdir())[:n]:
        mask = f"{img.stem}_segmentation.png"
        for sub, name in (("images", img.name), ("masks", mask)):
            link = folder / sub / name
            if not link.exists():
                link.symlink_to(data / sub / name)
    return folder


def measure(models_url: str, dataset_url: str) -> dict:
    """The signal's figures on the OOF images of a trained models folder, scored where the
    version's choice is made (the original mask resolution when the dataset names sources)."""
    from segflow.predict.postprocess import oof_choice, save_choice
    from segflow.predict.uncertainty import oof_records, oof_uncertainty, spearman
    from segflow.storage import Store

    t0 = time.perf_counter()
    found = oof_choice(models_url, dataset_url)
    choose_s = time.perf_counter() - t0
    choice, rows, jaccard = found.choice, found.rows, found.jaccard
    save_choice(models_url, choice)  # as choose_from_models: predict reuses it
    models = Store(models_url)
    stored = oof_uncertainty(oof_records(models))
    scores = np.array([stored[r] for r in rows])
    cut = choice.review_threshold
    flagged = scores >= cut if cut is not None else np.zeros(len(rows), bool)
    mean = lambda a: float(a.mean()) if a.size else None  # noqa: E731
    gap = None
    if flagged.any() and (~flagged).any():
        gap = mean(jaccard[~flagged]) - mean(jaccard[flagged])
    return {
        "n_oof": len(rows),
        "resolution": choice.resolution,
        "choose_s": round(choose_s, 1),
        "threshold": choice.threshold,
        "postprocess": choice.postprocess,
        "oof_mean_jaccard": mean(jaccard),
        "oof_thresholded_jaccard": choice.oof_thresholded_jaccard,
        "spearman_rho": spearman(scores, jaccard),
        "review_threshold": cut,
        "n_flagged": int(flagged.sum()),
        "flagged_mean_jaccard": mean(jaccard[flagged]),
        "unflagged_mean_jaccard": mean(jaccard[~flagged]),
        "jaccard_gap": gap,
        "calibration": choice.review,
        "uncertainty_quantiles": [float(q) for q in np.quantile(scores, [0.1, 0.5, 0.9])],
    }


if __name__ == "__main__":
    sys.exit(main())
