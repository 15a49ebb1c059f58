"""One real local Prefect API for every flow test (prefect_test_harness starts a server), and
a tiny trained-and-segmented pipeline shared by the tests that only inspect its results."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prefect.testing.utilities import prefect_test_harness

from tests.makers import write_isic

TINY_TRAIN = {
    "folds": 2,
    "epochs": 1,
    "batch_size": 8,
    "encoder": "resnet18",
    "encoder_depth": 3,
    "decoder_channels": [32, 16, 8],
    "early_stopping": None,
    "lr": 3e-3,
}


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=180):
        yield str(PREFECT_API_URL.value())


def tiny_config(storage: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "ingest": {"size": [32, 32]},
        "train": dict(TINY_TRAIN),
        "predict": {"tta": "flips", "shard_size": 2, "executor": "inline"},
        "crops": {"mode": "masked"},
    }
    if storage:
        cfg["storage"] = storage
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_sources(store_factory, n_train: int = 12, n_new: int = 5) -> tuple[str, str]:
    raw, new = store_factory("raw"), store_factory("new")
    write_isic(raw, range(n_train), h=32, w=32)
    write_isic(new, range(100, 100 + n_new), h=40, w=48)
    return raw.url, new.url
