"""Test-time augmentation: the dihedral group D4 on batches, each view inverted exactly.

A view is (k, flip): rotate by k*90 degrees, then optionally flip left-right. Its inverse
undoes the flip, then rotates back. Views of the same output shape run as one batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

View = tuple[int, bool]
TTA_MODES: dict[str, list[View]] = {
    "none": [(0, False)],
    # identity, horizontal, vertical (= rot180 + hflip), both (= rot180)
    "flips": [(0, False), (0, True), (2, True), (2, False)],
    "d4": [(k, f) for k in range(4) for f in (False, True)],
}


def apply(x: torch.Tensor, view: View) -> torch.Tensor:
    k, flip = view
    x = torch.rot90(x, k, dims=(-2, -1)) if k else x
    return torch.flip(x, dims=(-1,)) if flip else x


def invert(y: torch.Tensor, view: View) -> torch.Tensor:
    k, flip = view
    y = torch.flip(y, dims=(-1,)) if flip else y
    return torch.rot90(y, -k, dims=(-2, -1)) if k else y


def tta_views(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str
) -> torch.Tensor:
    """``sigmoid(model(view(x)))`` of every view of ``mode``, mapped back: float32
    (V, B, 1, H, W) on ``x``'s device, in the order of :data:`TTA_MODES` (view 0 is the
    identity). The views stay on the device: the uncertainty score reduces them there."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; allowed: {sorted(TTA_MODES)}")
    views = TTA_MODES[mode]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(views):
        by_shape.setdefault(tuple(apply(x[:1], v).shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(views)
    for group in by_shape.values():
        batch = torch.cat([apply(x, views[i]) for i in group])
        probs = torch.sigmoid(model(batch).float())
        for j, i in enumerate(group):
            out[i] = invert(probs[j * len(x) : (j + 1) * len(x)], views[i])
    return torch.stack(out)  # type: ignore[arg-type]


def tta_mean(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str):
    """Mean over the views of ``mode`` of ``sigmoid(model(view(x)))``, mapped back."""
    return tta_views(model, x, mode).mean(0)
