"""Resize policies and their exact inverses.

``stretch`` maps the whole original image onto the (H, W) target, ignoring aspect ratio.
``letterbox`` scales by the largest factor that fits, centres the result and pads the rest.
Either way the target frame holds the content in ``pad_box = (top, left, bottom, right)``,
which is what a predictor needs to map a target-size mask back to the original pixels:
crop ``pad_box`` out, then resize to ``orig_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

ResizePolicy = Literal["stretch", "letterbox"]
RESIZE_POLICIES: tuple[str, ...] = ("stretch", "letterbox")


@dataclass(frozen=True)
class Placement:
    """Where an ``orig_size`` image lands inside a ``size`` frame."""

    size: tuple[int, int]  # target (H, W)
    orig_size: tuple[int, int]  # original (h, w)
    pad_box: tuple[int, int, int, int]  # (top, left, bottom, right) of the content

    @property
    def content_hw(self) -> tuple[int, int]:
        top, left, bottom, right = self.pad_box
        return bottom - top, right - left


def place(orig_size: tuple[int, int], size: tuple[int, int], policy: ResizePolicy) -> Placement:
    h, w = orig_size
    th, tw = size
    if policy == "stretch":
        return Placement(size, orig_size, (0, 0, th, tw))
    if policy != "letterbox":
        raise ValueError(f"unknown resize policy {policy!r}; allowed: {RESIZE_POLICIES}")
    scale = min(th / h, tw / w)
    nh, nw = max(1, min(th, round(h * scale))), max(1, min(tw, round(w * scale)))
    top, left = (th - nh) // 2, (tw - nw) // 2
    return Placement(size, orig_size, (top, left, top + nh, left + nw))


def to_frame(img: Image.Image, placement: Placement, nearest: bool = False) -> np.ndarray:
    """Resize a PIL image into the target frame; padding is 0."""
    ch, cw = placement.content_hw
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    content = np.asarray(img.resize((cw, ch), resample) if img.size != (cw, ch) else img)
    if placement.pad_box == (0, 0, *placement.size):
        return content
    top, left, bottom, right = placement.pad_box
    frame = np.zeros((*placement.size, *content.shape[2:]), dtype=content.dtype)
    frame[top:bottom, left:right] = content
    return frame


def from_frame(arr: np.ndarray, placement: Placement, nearest: bool = True) -> np.ndarray:
    """Inverse of :func:`to_frame`: crop the content box, resize to the original size.

    Works for uint8 masks (nearest) and float probabilities (bilinear, ``nearest=False``)."""
    top, left, bottom, right = placement.pad_box
    content = arr[top:bottom, left:right]
    h, w = placement.orig_size
    if content.shape[:2] == (h, w):
        return content
    mode = "F" if content.dtype.kind == "f" else None
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    src = content.astype(np.float32) if mode == "F" else content
    out = np.asarray(Image.fromarray(src, mode=mode).resize((w, h), resample))
    return out.astype(arr.dtype)
