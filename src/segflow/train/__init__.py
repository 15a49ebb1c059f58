"""Training stage: K-fold U-Nets (segmentation-models-pytorch), one fold per Ray task.

Public API: :func:`train`, :class:`TrainConfig`, :class:`TrainResult`, :func:`fit_fold`,
:class:`ModelSpec`, :func:`load_model`.
"""

from segflow.train.config import TrainConfig
from segflow.train.loop import FoldResult, fit_fold
from segflow.train.model import ModelSpec, build_model, load_model
from segflow.train.run import TrainResult, train

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
