"""One image through the fold ensemble, exactly as the batch predictor treats it.

``segflow predict`` and ``segflow serve`` share every step: the same decode (JPEG draft to
just above the frame), the same placement into the dataset frame, ``Ensemble.predict`` and
:func:`segflow.predict.postprocess.full_size_mask`. So a served mask equals the PNG that
``segflow predict`` writes for the same file. The steps are separate functions so that a
server can run the model alone under a lock while other requests decode and encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segflow import png
from segflow.geometry import Placement, place
from segflow.imaging import Decoded, decode_image, image_to_frame
from segflow.masks import (
    DEFAULT_BACKGROUND,
    DEFAULT_MARGIN,
    Box,
    encode,
    expand_box,
    full_size_mask,
    largest_box,
    masked_crop,
)
from segflow.predict.ensemble import Ensemble
from segflow.train.model import ModelSpec


@dataclass
class Prepared:
    """A decoded image placed in the dataset frame, ready for the model."""

    name: str
    decoded: Decoded
    placement: Placement
    frame: np.ndarray  # (H, W, 3) uint8 at the dataset size


@dataclass
class SingleResult:
    """The final mask of one image and its largest component."""

    mask: np.ndarray  # bool (h, w) at the original size, thresholded and post-processed
    bbox: Box | None  # largest 8-connected component, (x0, y0, x1, y1), ends exclusive
    area: int  # pixels of that component
    n_components: int
    component: np.ndarray  # uint8 {0, 1} (h, w): that component alone
    foreground: float  # fraction of the mask's pixels that are foreground

    @property
    def size(self) -> tuple[int, int]:
        return self.mask.shape[0], self.mask.shape[1]

    def mask_png(self) -> bytes:
        """The mask as a 0/255 greyscale PNG, as ``segflow predict`` writes it."""
        return png.encode(self.mask.astype(np.uint8) * 255)


def prepare(data: bytes, name: str, spec: ModelSpec, max_pixels: int) -> Prepared:
    """Decode ``data`` and place it in the model's frame; raises ``Rejected`` (reasons
    ``unreadable``, ``too_large``) for bytes that are not a usable image. ``name`` only picks
    the decoder (``.tif``/``.tiff`` go to tifffile) and names the file in messages."""
    size, policy = spec.dataset_size, spec.resize
    decoded = decode_image(data, name, max_pixels, size, policy)  # type: ignore[arg-type]
    placement = place(decoded.orig_size, size, policy)  # type: ignore[arg-type]
    return Prepared(name, decoded, placement, image_to_frame(decoded, placement))


def finish(prob: np.ndarray, placement: Placement, threshold: float, method: str) -> SingleResult:
    """One probability frame -> the full-size mask and its largest component."""
    mask = full_size_mask(prob, placement, threshold, method)
    bbox, area, n, component = largest_box(mask)
    return SingleResult(mask, bbox, area, n, component, float(mask.mean()))


def segment_bytes(
    ensemble: Ensemble,
    data: bytes,
    name: str,
    threshold: float,
    method: str,
    tta: str,
    max_pixels: int,
) -> SingleResult:
    """Image bytes -> the ensemble's post-processed mask at the image's original size."""
    prepared = prepare(data, name, ensemble.spec, max_pixels)
    return finish(predict_one(ensemble, prepared, tta), prepared.placement, threshold, method)


def predict_one(ensemble: Ensemble, prepared: Prepared, tta: str) -> np.ndarray:
    """The probability frame of one prepared image."""
    # a batch of one built as the batch predictor builds its batches (np.stack: a fresh,
    # writable array; the decoded frame itself is a read-only view of Pillow's buffer)
    return ensemble.predict(np.stack([prepared.frame]), tta)[0]


def masked_crop_png(
    prepared: Prepared,
    result: SingleResult,
    data: bytes,
    max_pixels: int,
    margin: float = DEFAULT_MARGIN,
    background: str = DEFAULT_BACKGROUND,
) -> tuple[bytes, Box] | None:
    """The image cut to the largest component's box (widened by ``margin``) with everything
    outside the component set to ``background``, as a PNG, and the box; ``None`` for an empty
    mask. The crop is cut from the full-resolution pixels: a JPEG decoded in draft mode for
    the model is decoded again in full."""
    if result.bbox is None:
        return None
    decoded = prepared.decoded
    h, w = result.size
    if decoded.image.size != (w, h):
        decoded = decode_image(data, prepared.name, max_pixels)
    box = expand_box(result.bbox, margin, (h, w))
    crop = masked_crop(np.asarray(decoded.image), result.component, box, background)
    return encode(crop, "png"), box
