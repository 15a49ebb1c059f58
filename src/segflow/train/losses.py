"""Losses: smp's implementations, selected by name. Nothing here re-implements smp."""

from __future__ import annotations

import torch
from segmentation_models_pytorch import losses as L

from segflow.errors import ConfigError
from segflow.train.config import LOSSES


def make_loss(name: str) -> torch.nn.Module:
    """Binary losses on logits. Dice and Jaccard use smooth=1, as the seed tutorials did."""
    if name == "dice":
        return L.DiceLoss("binary", from_logits=True, smooth=1.0)
    if name == "jaccard":
        return L.JaccardLoss("binary", from_logits=True, smooth=1.0)
    if name == "bce":
        return L.SoftBCEWithLogitsLoss()
    if name == "focal":
        return L.FocalLoss("binary")
    if name == "bce_dice":
        return _Sum(L.SoftBCEWithLogitsLoss(), L.DiceLoss("binary", from_logits=True, smooth=1.0))
    raise ConfigError(f"unknown loss {name!r}; allowed: {LOSSES}")


class _Sum(torch.nn.Module):
    def __init__(self, *parts: torch.nn.Module) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(p(logits, target) for p in self.parts)  # type: ignore[return-value]
