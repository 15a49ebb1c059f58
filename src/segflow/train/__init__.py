"""Training stage: K-fold U-Nets (segmentation-models-pytorch), one fold per Ray task.

Public API: :func:`train`, :class:`TrainConfig`, :class:`TrainResult`, :func:`fit_fold`,
:class:`ModelSpec`, :func:`load_model`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segflow.train.config import TrainConfig
    from segflow.train.loop import FoldResult, fit_fold
    from segflow.train.model import ModelSpec, build_model, load_model
    from segflow.train.run import TrainResult, train

# Loaded on first use: importing segflow.train.config (every `segflow` start reads TrainConfig's
# fields to build the train options) must not pull in torch and smp.
_EXPORTS = {
    "FoldResult": "loop",
    "ModelSpec": "model",
    "TrainConfig": "config",
    "TrainResult": "run",
    "build_model": "model",
    "fit_fold": "loop",
    "load_model": "model",
    "train": "run",
}
__all__ = [
    "FoldResult",
    "ModelSpec",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "fit_fold",
    "load_model",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"segflow.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
