"""A warm start fine-tunes at ``init_lr_scale`` x ``lr``; a cold start keeps ``lr``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from segflow.train import TrainConfig
from segflow.train.loop import initial_lr


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(dataset="/tmp/d.zarr", models="/tmp/m", lr=1e-3, **kw)


def test_cold_start_uses_the_configured_rate() -> None:
    assert initial_lr(_cfg()) == pytest.approx(1e-3)


def test_warm_start_uses_a_tenth_by_default() -> None:
    assert initial_lr(_cfg(init_from="production")) == pytest.approx(1e-4)
    assert initial_lr(_cfg(init_from="v1", init_lr_scale=0.5)) == pytest.approx(5e-4)


def test_scale_must_be_in_range() -> None:
    with pytest.raises(ValidationError, match="init_lr_scale"):
        _cfg(init_lr_scale=0)
