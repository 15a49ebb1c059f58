"""Warm start against cold start: epochs a retrain needs to reach the previous model's score.

On ISIC 2017 train (``../shared/data/isic2017/train``) at 128x128, one fold:

1. v1 is trained cold on the first ``--n1`` (1,000) images for ``--v1-epochs`` epochs; its
   best validation thresholded Jaccard is the target;
2. v2 warm (``train.init_from`` = v1) and v2 cold are trained on all images, each until it
   reaches the target on the *same* validation images, or up to ``--max-epochs``.

The validation images (``--n-val``, drawn with a fixed seed from the first ``--n1``) are held
out of every training set: each run's ``splits.json`` is written beforehand with them as fold 0
and everything else as fold 1, and only fold 0 is trained. The measure is epochs, not seconds,
so a loaded machine does not bias it; seconds are reported too. Target: warm <= 1/3 of cold.
A cold run that hits ``--max-epochs`` (or the ``--deadline``) is reported as capped.

    python benchmarks/warmstart.py [--data ../shared/data/isic2017/train] [--work DIR]
        [--encoder timm-tf_efficientnet_lite0 --encoder-weights efficientnet-lite0-imagenet]
        [--size 128 128] [--v1-epochs 8] [--max-epochs 12] [--deadline HH:MM] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1 / 3
log = logging.getLogger("warmstart")


# -- data -----------------------------------------------------------------------------------------
def ingest_subset(data: Path, ids: list[str], work: Path, name: str, size: tuple[int, int]) -> str:
    """Symlinks to ``ids`` (images + masks) ingested into ``work/<name>.zarr``."""
    from segflow.ingest import IngestConfig, ingest

    url = str(work / f"{name}.zarr")
    if (work / f"{name}.zarr").exists():
        return url
    images, masks = work / f"{name}-src" / "images", work / f"{name}-src" / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in ids:
        for folder, sub, fname in (
            (images, "images", f"{i}.jpg"),
            (masks, "masks", f"{i}_segmentation.png"),
        ):
            link = folder / fname
            if not link.exists():
                link.symlink_to(data / sub / fname)
    cfg = IngestConfig(
        layout="isic",
        source=str(images),
        masks=str(masks),
        dataset=url,
        size=size,
        workers=1,
        allow_external_links=True,  # the subset is symlinks into --data, on purpose
    )
    res = ingest(cfg)
    if res.n_images != len(ids):
        raise RuntimeError(f"ingest {name}: {res.n_images} images, expected {len(ids)}")
    return url


def write_split(models: Path, all_ids: list[str], val: list[str]) -> None:
    """Fold 0 validates on ``val``; fold 1 holds the rest (never trained here)."""
    from segflow.storage import Store

    rest = sorted(set(all_ids) - set(val))
    split = {
        "k": 2,
        "seed": 0,
        "grouped": False,
        "n_images": len(all_ids),
        "folds": [{"fold": 0, "val": sorted(val)}, {"fold": 1, "val": rest}],
    }
    Store(str(models)).write_json("splits.json", split)


# -- training -------------------------------------------------------------------------------------
def make_cfg(args: argparse.Namespace, dataset: str, models: Path, **kw: Any):
    from segflow.train import TrainConfig

    if getattr(args, "init_lr_scale", None) is not None and "init_from" in kw:
        kw["init_lr_scale"] = args.init_lr_scale

    return TrainConfig(
        dataset=dataset,
        models=str(models),
        folds=2,
        fold_ids=[0],
        encoder=args.encoder,
        encoder_weights=args.encoder_weights,
        size=tuple(args.size),
        batch_size=args.batch_size,
        lr=args.lr,
        monitor="thresholded_jaccard",
        early_stopping=None,
        executor="inline",
        seed=args.seed,
        **kw,
    )


def train_until(cfg, max_epochs: int, target: float | None, deadline: float) -> dict[str, Any]:
    """Fold 0, epoch by epoch, until validation thresholded Jaccard >= ``target`` (or the
    epoch cap or the deadline); returns the per-epoch curve and when the target was met."""
    from segflow.dataset import Dataset
    from segflow.storage import Store
    from segflow.train.loop import (
        EpochStats,
        Progress,
        fold_data,
        on_epoch_end,
        setup_run,
        train_epoch,
        validate,
    )
    from segflow.train.model import save_spec

    dataset = Dataset(Store(cfg.dataset))
    models = Store(cfg.models)
    train_data, val_data = fold_data(cfg, dataset, 0)
    run = setup_run(cfg, 0, dataset)
    # config.json beside the weights, as fit_fold writes it: a warm start from this run reads it
    save_spec(models.child("fold-0"), run.spec)
    progress = Progress()
    start = validate(run, val_data)  # epoch 0: the initial weights as they are
    curve = [
        {
            "epoch": 0,
            "thresholded_jaccard": start["thresholded_jaccard"],
            "loss": start["loss"],
            "seconds": 0.0,
        }
    ]
    reached, capped, t0 = None, None, time.perf_counter()
    for epoch in range(max_epochs):
        t = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        loss, ips = train_epoch(run, train_data, epoch)
        val = validate(run, val_data)
        stats = EpochStats(epoch + 1, lr, loss, val, ips, time.perf_counter() - t)
        progress = on_epoch_end(run, progress, stats)
        curve.append(
            {
                "epoch": epoch + 1,
                "thresholded_jaccard": val["thresholded_jaccard"],
                "loss": val["loss"],
                "train_loss": loss,
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        log.info(
            "%s epoch %d: val tJ %.4f loss %.4f (%.0fs)",
            models.url,
            epoch + 1,
            val["thresholded_jaccard"],
            val["loss"],
            curve[-1]["seconds"],
        )
        if target is not None and val["thresholded_jaccard"] >= target:
            reached = epoch + 1
            break
        per_epoch = (time.perf_counter() - t0) / (epoch + 1)
        if time.time() + per_epoch > deadline:
            capped = f"deadline after {epoch + 1} epochs"
            break
    else:
        if target is not None:
            capped = f"max_epochs {max_epochs}"
    return {
        "n_train": len(train_data),
        "n_val": len(val_data),
        "curve": curve,
        "epochs_to_target": reached,
        "capped": capped,
        "best_thresholded_jaccard": max(c["thresholded_jaccard"] for c in curve[1:]),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -- main -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    from segflow.storage import Store
    from segflow.train.loop import initial_lr, set_threads

    set_threads(args.threads)
    data = Path(args.data)
    if not (data / "images").is_dir():
        raise SystemExit(f"no ISIC images at {data}/images; pass --data")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    deadline = _deadline(args.deadline)
    ids = sorted(p.name.removesuffix(".jpg") for p in (data / "images").glob("*.jpg"))
    ids = ids[: args.n2]
    first = ids[: args.n1]
    rng = np.random.default_rng(args.seed)
    val = sorted(rng.choice(first, size=args.n_val, replace=False).tolist())

    t = time.perf_counter()
    ds1 = ingest_subset(data, first, work, "first", tuple(args.size))
    ds2 = ingest_subset(data, ids, work, "all", tuple(args.size))
    ingest_s = round(time.perf_counter() - t, 1)

    runs: dict[str, Any] = {}
    v1 = work / "v1"
    write_split(v1, first, val)
    v1_fold, v1_json = Store(str(v1)).child("fold-0"), v1 / "v1.json"
    if v1_json.exists() and v1_fold.read_marker("fold") and v1_fold.exists("config.json"):
        runs["v1"] = json.loads(v1_json.read_text())  # a rerun reuses the finished v1
    else:
        runs["v1"] = train_until(make_cfg(args, ds1, v1), args.v1_epochs, None, math.inf)
        v1_json.write_text(json.dumps(runs["v1"]))
        # v1 is finished: the marker a warm start looks for (as fit_fold would write it)
        v1_fold.mark_complete("fold", {"fold": 0, "status": "done"})
    target = runs["v1"]["best_thresholded_jaccard"]
    log.info("v1 best validation thresholded Jaccard: %.4f", target)

    for name, kw in (("v2_warm", {"init_from": str(v1)}), ("v2_cold", {})):
        models = work / name
        cfg = make_cfg(args, ds2, models, **kw)
        if name == "v2_warm":
            warm_lr = initial_lr(cfg)
        # a rerun reuses a finished arm trained with the same settings (e.g. the cold arm
        # when only the warm start's learning rate changed)
        key = {"cfg": cfg.model_dump(mode="json"), "target": target, "max": args.max_epochs}
        saved = work / f"{name}.json"
        if saved.exists() and json.loads(saved.read_text()).get("key") == key:
            runs[name] = json.loads(saved.read_text())["result"]
            log.info("%s: reused %s", name, saved)
            continue
        if models.exists():
            shutil.rmtree(models)
        write_split(models, ids, val)
        runs[name] = train_until(cfg, args.max_epochs, target, deadline)
        if runs[name]["capped"] is None or runs[name]["epochs_to_target"]:
            saved.write_text(json.dumps({"key": key, "result": runs[name]}))

    warm, cold = runs["v2_warm"]["epochs_to_target"], runs["v2_cold"]["epochs_to_target"]
    ratio = warm / cold if warm and cold else None
    return {
        "benchmark": "warmstart",
        "data": str(data),
        "size": args.size,
        "encoder": args.encoder,
        "encoder_weights": args.encoder_weights,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warm_lr": warm_lr,
        "n_v1_images": len(first),
        "n_v2_images": len(ids),
        "n_val": len(val),
        "v1_epochs": args.v1_epochs,
        "max_epochs": args.max_epochs,
        "ingest_s": ingest_s,
        "target_thresholded_jaccard": target,
        "epochs_warm": warm,
        "epochs_cold": cold,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(ratio is not None and ratio <= TARGET_RATIO)
        if cold
        else (None if runs["v2_cold"]["capped"] is None else "cold capped"),
        "runs": runs,
    }


def _deadline(hhmm: str | None) -> float:
    if not hhmm:
        return math.inf
    h, m = (int(x) for x in hhmm.split(":"))
    now = datetime.now()
    return now.replace(hour=h, minute=m, second=0, microsecond=0).timestamp()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "isic2017" / "train"))
    p.add_argument("--work", default="/tmp/segflow-warmstart")
    p.add_argument("--encoder", default="timm-tf_efficientnet_lite0")
    p.add_argument("--encoder-weights", default="efficientnet-lite0-imagenet")
    p.add_argument("--size", type=int, nargs=2, default=[128, 128])
    p.add_argument("--n1", type=int, default=1000)
    p.add_argument("--n2", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--v1-epochs", type=int, default=8)
    p.add_argument("--max-epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--init-lr-scale",
        type=float,
        default=None,
        help="warm arm's lr multiplier (default: train's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--deadline", default=None, help="local HH:MM: stop the cold run before it")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        print(text)
    else:
        print(
            f"target {result['target_thresholded_jaccard']:.4f}: warm {result['epochs_warm']} "
            f"epochs, cold {result['epochs_cold']} epochs (ratio {result['ratio']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
