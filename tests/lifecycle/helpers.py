"""Tiny model versions for the lifecycle tests (gate, aliases, warm start): images with a dark
box at a seeded random place, so a model that learned the task and one trained on masks
shuffled between images differ deterministically."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from segflow.storage import StorageOptions, Store
from tests.makers import colour_of, jpeg_bytes, png_bytes

SIZE = 32
TINY = {
    "folds": 2,
    "batch_size": 8,
    "encoder": "resnet18",
    "encoder_depth": 3,
    "decoder_channels": [32, 16, 8],
    "early_stopping": None,
    "lr": 3e-3,
    "executor": "inline",
    "size": (SIZE, SIZE),
    "monitor": "loss",
}


def lesion_pair(k: int, h: int = SIZE, w: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + k)
    bh, bw = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
    top, left = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
    img = np.empty((h, w, 3), np.uint8)
    img[:] = colour_of(k)
    img[top : top + bh, left : left + bw] = (25, 15, 10)
    mask = np.zeros((h, w), np.uint8)
    mask[top : top + bh, left : left + bw] = 255
    return img, mask


def write_lesions(
    store: Store, ks: list[int], shuffle: bool = False, names: list[int] | None = None
) -> None:
    """ISIC layout; ``shuffle``: each image gets another image's mask (a fixed derangement);
    ``names``: file numbers other than ``ks`` (same pixels under other names)."""
    masks = [lesion_pair(k)[1] for k in ks]
    if shuffle:
        masks = masks[1:] + masks[:1]
    for k, mask, name in zip(ks, masks, names or ks, strict=True):
        img, _ = lesion_pair(k)
        store.write_bytes(f"ISIC_{name:07d}.jpg", jpeg_bytes(img))
        store.write_bytes(f"ISIC_{name:07d}_segmentation.png", png_bytes(mask))


def ingest_lesions(loc, name: str, ks: list[int], **kw: Any) -> str:
    from segflow.ingest import IngestConfig, ingest

    raw = loc.store(f"raw-{name}")
    write_lesions(raw, ks, **kw)
    url = loc.url(f"{name}.zarr")
    ingest(
        IngestConfig(
            layout="isic",
            source=raw.url,
            dataset=url,
            size=(SIZE, SIZE),
            storage=loc.storage,
            workers=1,
        )
    )
    return url


def train_version(
    models_url: str,
    vid: str,
    dataset: str,
    storage: StorageOptions,
    epochs: int = 8,
    **overrides: Any,
) -> dict[str, Any]:
    """Train ``runs/<vid>`` in-process and record ``versions/<vid>.json`` as train_flow does."""
    from segflow.predict.postprocess import choose_from_models
    from segflow.train import TrainConfig
    from segflow.train.run import train
    from segflow.versions import write_version

    run = f"{models_url.rstrip('/')}/runs/{vid}"
    cfg = TrainConfig(
        dataset=dataset, models=run, storage=storage, **{**TINY, "epochs": epochs, **overrides}
    )
    result = train(cfg)
    choice = choose_from_models(run, dataset, storage).to_dict()
    record = {
        "version": vid,
        "run": f"runs/{vid}",
        "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "dataset": {"url": dataset, "hash": "0" * 64, "n_images": 0},
        "config": cfg.public_dict(),
        "folds": [f.fold for f in result.folds],
        "scores": {"oof": {"thresholded_jaccard": choice["oof_thresholded_jaccard"]}},
        "choice": choice,
    }
    write_version(models_url, record, storage)
    return {"record": record, "result": result, "cfg": cfg}
