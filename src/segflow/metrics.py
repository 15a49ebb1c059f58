"""Segmentation scores as plain functions over batches of binary masks (torch or numpy).

ISIC 2018's thresholded Jaccard: a per-image Jaccard below 0.65 counts as 0. An empty truth
with an empty prediction is a perfect score (1) for every metric: a nerve image without a
nerve, correctly left empty, must not be punished.
"""

from __future__ import annotations

import torch

TJ_THRESHOLD = 0.65


def per_image_scores(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pred`` and ``truth``: (B, ...) bool. Returns (B,) float tensors: dice, jaccard,
    thresholded_jaccard."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != truth {tuple(truth.shape)}")
    p = pred.reshape(pred.shape[0], -1).bool()
    t = truth.reshape(truth.shape[0], -1).bool()
    inter = (p & t).sum(1).double()
    ps, ts = p.sum(1).double(), t.sum(1).double()
    union = ps + ts - inter
    both_empty = (ps + ts) == 0
    dice = torch.where(both_empty, 1.0, 2 * inter / (ps + ts).clamp_min(1))
    jaccard = torch.where(both_empty, 1.0, inter / union.clamp_min(1))
    tj = torch.where(jaccard < TJ_THRESHOLD, 0.0, jaccard)
    return {"dice": dice, "jaccard": jaccard, "thresholded_jaccard": tj}
