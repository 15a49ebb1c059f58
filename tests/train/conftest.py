"""A tiny, learnable labelled dataset for the training tests (ingested from real JPEG/PNG)."""

from __future__ import annotations

import pytest

from segflow.ingest import IngestConfig, ingest
from segflow.storage import StorageOptions, Store
from segflow.train import TrainConfig
from tests.makers import coded_pair, png_bytes, write_isic

# resnet18 cut to 3 stages with a slim decoder: learns the synthetic set in a few epochs
SMALL_MODEL = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}


def make_dataset(location_url: str, storage: StorageOptions, n: int = 24, size: int = 32) -> str:
    raw = Store(f"{location_url}/raw", storage)
    write_isic(raw, range(n), h=size, w=size)
    url = f"{location_url}/ds"
    cfg = IngestConfig(
        layout="isic", source=raw.url, dataset=url, size=(size, size), storage=storage
    )
    ingest(cfg)
    return url


def small_config(dataset: str, models: str, storage=None, **kw) -> TrainConfig:
    base = {
        "dataset": dataset,
        "models": models,
        "folds": 2,
        "epochs": 2,
        "batch_size": 8,
        "lr": 3e-3,
        "executor": "inline",
        "early_stopping": None,
        **SMALL_MODEL,
    }
    return TrainConfig(storage=storage or StorageOptions(), **{**base, **kw})


@pytest.fixture
def tiny_dataset(local) -> str:
    return make_dataset(local.base, local.storage)


def dataset_with_large_masks(local, n: int = 12) -> tuple[str, Store]:
    """Images at 32x32 whose masks are at 72x96, as ISIC's published training set."""
    raw = Store(f"{local.base}/raw", local.storage)
    write_isic(raw, range(n), h=32, w=32)
    for k in range(n):
        _, mask = coded_pair(k, 72, 96)
        raw.write_bytes(f"ISIC_{k:07d}_segmentation.png", png_bytes(mask))
    url = f"{local.base}/ds"
    cfg = IngestConfig(
        layout="isic", source=raw.url, dataset=url, size=(32, 32), storage=local.storage
    )
    ingest(cfg)
    return url, raw
