"""Synthetic dermoscopy-like images and masks in the ISIC-2018 Task 1 layout.

``generate_demo_data`` writes ``ISIC_%07d.jpg`` (RGB, JPEG) and ``ISIC_%07d_segmentation.png``
(mode L, 0/255) side by side in one folder, so the whole pipeline can run offline.

The images are made to be learnable but not trivial:

* skin of a random tone, low-frequency illumination, a dermatoscope vignette (dark corners);
* an irregular lesion: an ellipse whose boundary radius is perturbed by a few Fourier
  harmonics plus fine noise, sometimes with a second lobe, anywhere near the centre;
* pigment variation inside the lesion (light/dark brown, bluish-grey, mottling, dark dots),
  uneven opacity and a blurred edge in the image (the mask stays hard);
* dark curved hairs over skin and lesion in most images (not part of the mask);
* mild sensor noise and JPEG compression.

So a global grey threshold confuses hairs, vignette and faint lesion parts with the lesion,
while local colour contrast against the surrounding skin separates them reasonably well.

Every sample ``i`` draws from its own ``np.random.default_rng([seed, i])``: the output is
byte-identical for a seed, and any single sample can be regenerated alone.
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from segflow.errors import SegflowError
from segflow.storage import StorageOptions, Store

MIN_SIDE = 32
JPEG_QUALITY = 90
# Foreground fraction a lesion must have; outside it the lesion is drawn again.
_FRACTION_RANGE = (0.04, 0.6)
_MAX_TRIES = 20

# Reference colours, RGB in [0, 1]; float32 like every image array here.
_SKIN_LIGHT = np.array([0.95, 0.80, 0.72], np.float32)
_SKIN_DARK = np.array([0.62, 0.43, 0.33], np.float32)
_LIGHT_BROWN = np.array([0.70, 0.50, 0.37], np.float32)
_BROWN = np.array([0.50, 0.32, 0.22], np.float32)
_DARK_BROWN = np.array([0.27, 0.16, 0.11], np.float32)
_BLUE_GREY = np.array([0.48, 0.50, 0.57], np.float32)
_HAIR = np.array([0.10, 0.07, 0.05], np.float32)


class DemoDataError(SegflowError, ValueError):
    """A bad argument to the demo-data generator (a ValueError, and a SegflowError so the
    CLI prints the message without a traceback)."""


@dataclass(frozen=True)
class DemoDataResult:
    out: str  # the URL written to
    n: int  # number of image/mask pairs
    size: tuple[int, int]  # (H, W)
    files: list[str]  # relative names written, sorted


def image_name(i: int) -> str:
    return f"ISIC_{i:07d}.jpg"


def mask_name(i: int) -> str:
    return f"ISIC_{i:07d}_segmentation.png"


def generate_demo_data(
    out: str,
    n: int,
    size: tuple[int, int] = (192, 256),
    seed: int = 0,
    storage: StorageOptions | None = None,
) -> DemoDataResult:
    """Write ``n`` synthetic image/mask pairs of ``size`` (H, W) into the folder ``out``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DemoDataError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DemoDataError(f"seed must be an integer >= 0, got {seed!r}")
    size = _check_size(size)
    store = Store(out, storage)

    def one(i: int) -> list[str]:
        image, mask = make_sample(np.random.default_rng([seed, i]), size)
        _write_if_changed(store, image_name(i), _encode(image, "JPEG", quality=JPEG_QUALITY))
        _write_if_changed(store, mask_name(i), _encode(mask * np.uint8(255), "PNG"))
        return [image_name(i), mask_name(i)]

    # Threads overlap encoding and (fsync'd or S3) writes; samples are independent.
    with ThreadPoolExecutor(max_workers=min(4, n)) as pool:
        files = sorted(name for names in pool.map(one, range(n)) for name in names)
    return DemoDataResult(out=store.url, n=n, size=size, files=files)


def make_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3 RGB, mask uint8 HxW in {0,1})."""
    h, w = _check_size(size)
    mask = _lesion_mask(rng, h, w)
    image = _skin(rng, h, w)
    _paint_lesion(rng, image, mask)
    _draw_hairs(rng, image)
    image *= _shading(rng, h, w)[..., None]
    image += rng.standard_normal(image.shape, np.float32) * np.float32(rng.uniform(0.004, 0.018))
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mask


# -- validation and encoding -------------------------------------------------------------------
def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    ok = (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= MIN_SIDE for s in size)
    )
    if not ok:
        raise DemoDataError(f"size must be (H, W) with two integers >= {MIN_SIDE}, got {size!r}")
    return int(size[0]), int(size[1])


def _encode(array: np.ndarray, fmt: str, **kwargs: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# -- random fields -------------------------------------------------------------------------------
def _bspline_taps(n: int, scale: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """For n pixels over knots ``scale`` apart: the first of 4 knots each pixel reads, and
    the 4 cubic B-spline weights."""
    pos = np.arange(n, dtype=np.float32) / np.float32(scale)
    t = pos - np.floor(pos)
    first = pos.astype(np.intp)
    weights = [
        (1 - t) ** 3 / 6,
        (3 * t**3 - 6 * t**2 + 4) / 6,
        (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
    ]
    return first, [*weights, t**3 / 6]


def _field(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Smooth float32 noise with features about ``scale`` pixels wide, mean 0 and std ~1.

    A coarse random grid upsampled with cubic B-splines, one axis at a time: cheap at any
    scale (blurring white noise with a wide kernel is not), exact in shape, and free of BLAS,
    whose own threads would fight the writer threads for the cores."""
    iy, wy = _bspline_taps(h, scale)
    ix, wx = _bspline_taps(w, scale)
    coarse = rng.standard_normal((int(iy[-1]) + 4, int(ix[-1]) + 4), np.float32)
    rows = sum(wk[:, None] * coarse[iy + k] for k, wk in enumerate(wy))
    # Interpolating white noise shrinks its variance to ~0.48 per axis; undo that.
    return sum(wk * rows[:, ix + k] for k, wk in enumerate(wx)) * np.float32(1 / 0.48)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates as broadcastable float32 (h,1) and (1,w) arrays."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


# -- lesion shape ------------------------------------------------------------------------------
def _lesion_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    for _ in range(_MAX_TRIES):
        mask = _draw_lesion_shape(rng, h, w)
        if _FRACTION_RANGE[0] <= mask.mean() <= _FRACTION_RANGE[1]:
            break
    return mask


def _draw_lesion_shape(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = _grid(h, w)
    radius = math.sqrt(rng.uniform(0.05, 0.36) * h * w / math.pi)
    # Not always centred: the centre may move a fifth of the image away.
    cy = h / 2 + rng.uniform(-0.2, 0.2) * h
    cx = w / 2 + rng.uniform(-0.2, 0.2) * w
    # Fine boundary wiggle, shared by all lobes so their union still looks like one lesion.
    limit = 1.0 + 0.06 * _field(rng, h, w, max(2.5, radius / 6))
    inside = _blob(rng, yy - cy, xx - cx, radius) < limit
    if rng.random() < 0.45:  # a second lobe, overlapping the first
        angle = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(0.5, 0.95) * radius
        r2 = rng.uniform(0.4, 0.75) * radius
        y2, x2 = cy + dist * math.sin(angle), cx + dist * math.cos(angle)
        inside |= _blob(rng, yy - y2, xx - x2, r2) < limit
    return _one_piece(inside).astype(np.uint8)


def _one_piece(inside: np.ndarray) -> np.ndarray:
    """The largest connected part, holes filled: the wiggle can leave specks and pinholes
    near the boundary, and an annotator draws one closed outline."""
    labels, count = ndimage.label(inside)
    if count > 1:
        inside = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    # Holes are background parts that do not reach the border (binary_fill_holes does the
    # same by dilating to convergence, which is far slower on a large lesion).
    outside, _ = ndimage.label(~inside)
    edge = np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]])
    return ~np.isin(outside, edge[edge > 0])


def _blob(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Normalised radius of each pixel for a rotated, eccentric blob whose boundary radius
    varies with angle as a sum of random harmonics; the blob is where the result is < 1."""
    theta, ecc = rng.uniform(0, math.pi), rng.uniform(1.0, 1.7)
    a, b = radius * math.sqrt(ecc), radius / math.sqrt(ecc)
    c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    u = (dx * c + dy * s) * np.float32(1 / a)
    v = (dy * c - dx * s) * np.float32(1 / b)
    # The boundary radius is tabulated over angle: far cheaper than harmonics per pixel.
    angles = np.linspace(-math.pi, math.pi, 721)
    boundary = np.ones_like(angles)
    for k in range(2, 7):
        boundary += rng.normal(0.0, 0.3 / k) * np.cos(k * angles + rng.uniform(0, 2 * math.pi))
    boundary = np.clip(boundary, 0.35, None).astype(np.float32)
    index = np.rint((np.arctan2(v, u) + np.float32(math.pi)) * np.float32(720 / (2 * math.pi)))
    return np.hypot(u, v) / boundary[index.astype(np.intp)]


# -- appearance --------------------------------------------------------------------------------
def _skin(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    tone = rng.uniform(0.0, 1.0) ** 1.5
    base = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * np.float32(tone)
    base += rng.normal(0, 0.015, 3).astype(np.float32)
    # Pinker patches (only ever redder: skin is not green) and fine skin texture.
    red = np.clip(_field(rng, h, w, rng.uniform(15, 40)), 0, None) * np.float32(0.04)
    texture = 1.0 + np.float32(0.02) * _field(rng, h, w, 2.0)
    tint = np.array([0.5, -0.6, -0.4], np.float32)
    return (base + red[..., None] * tint) * texture[..., None]


def _paint_lesion(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Blend a pigmented lesion into ``image`` in place, within the mask's padded bounding box
    (the only place it shows), which keeps this the cheap part of a sample."""
    h, w = mask.shape
    edge = rng.uniform(0.6, 3.0) * min(h, w) / 192
    pad = math.ceil(4 * edge) + 1
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (
        slice(max(rows[0] - pad, 0), min(rows[-1] + pad + 1, h)),
        slice(max(cols[0] - pad, 0), min(cols[-1] + pad + 1, w)),
    )
    colour = _lesion_colour(rng, mask[box].shape, math.sqrt(mask.sum() / math.pi))
    bh, bw = colour.shape[:2]
    # Uneven opacity makes parts of the lesion faint; the blur makes a soft edge.
    scale = math.sqrt(mask.sum() / math.pi) / 2.5 + 2.0
    contrast = rng.uniform(0.5, 1.0)
    opacity = np.clip(contrast + 0.2 * _field(rng, bh, bw, scale * 1.5), 0.3, 1.0)
    alpha = ndimage.gaussian_filter(mask[box].astype(np.float32), edge) * opacity
    # Pigment absorbs light: the colours are for light skin, so they become transmittances
    # and a lesion stays darker than the skin around it whatever the skin tone.
    transmittance = colour / _SKIN_LIGHT
    skin = image[box]
    skin *= 1.0 - alpha[..., None] * (1.0 - transmittance)


def _lesion_colour(rng: np.random.Generator, shape: tuple[int, int], radius: float) -> np.ndarray:
    """Pigment pattern: light brown -> brown -> dark brown, sometimes a bluish-grey veil,
    mottling and dark dots."""
    h, w = shape
    scale = radius / 2.5 + 2.0  # pigment blobs relative to the lesion size
    depth = _sigmoid(1.6 * _field(rng, h, w, scale) + np.float32(rng.normal(0.0, 0.8)))
    depth = depth[..., None]
    colour = np.where(
        depth < 0.5,
        _LIGHT_BROWN + (_BROWN - _LIGHT_BROWN) * (2 * depth),
        _BROWN + (_DARK_BROWN - _BROWN) * (2 * depth - 1),
    )
    colour *= (1.0 + rng.normal(0, 0.05, 3)).astype(np.float32)  # per-lesion hue shift
    if rng.random() < 0.5:
        veil = np.clip(1.5 * (_field(rng, h, w, scale) - rng.uniform(0.3, 1.2)), 0, 0.85)
        colour += (_BLUE_GREY - colour) * veil[..., None]
    fine = _field(rng, h, w, rng.uniform(1.5, 3.5))
    colour *= (1.0 + np.float32(0.07) * fine)[..., None]
    if rng.random() < 0.5:  # dots/globules where the fine field peaks
        dots = np.clip(2.0 * (fine - 2.0), 0, 0.8)
        colour += (_DARK_BROWN - colour) * dots[..., None]
    return colour


def _draw_hairs(rng: np.random.Generator, image: np.ndarray) -> None:
    """Dark curved hairs over skin and lesion, in place; about one image in five has none."""
    h, w = image.shape[:2]
    if rng.random() < 0.2:
        return
    lines = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(1, 9)):
        _hair_line(rng, lines, rng.uniform(0.6, 0.95))
    # One blur for all hairs (one person's hairs are alike). A 1-pixel line blurred by sigma
    # peaks at 1/(sqrt(2 pi) sigma), so rescale it to reach about its opacity.
    width = rng.uniform(0.45, 1.0) * max(min(h, w) / 192, 0.6)
    ink = np.clip(ndimage.gaussian_filter(lines, width) * np.float32(2.9 * width), 0, 0.95)
    colour = _HAIR * np.float32(rng.uniform(0.6, 2.0))
    image += (colour - image) * ink[..., None]


def _hair_line(rng: np.random.Generator, lines: np.ndarray, opacity: float) -> None:
    """Draw a 1-pixel quadratic Bezier curve through the image; its ends may lie outside."""
    h, w = lines.shape
    middle = rng.uniform([0.1 * h, 0.1 * w], [0.9 * h, 0.9 * w])
    angle = rng.uniform(0, math.pi)
    direction = np.array([math.sin(angle), math.cos(angle)])
    length = rng.uniform(0.3, 0.9) * math.hypot(h, w)
    p0, p2 = middle - direction * length / 2, middle + direction * length / 2
    normal = np.array([direction[1], -direction[0]])
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0.0, 1.0, int(2 * length) + 2)[:, None]  # ~2 samples per pixel: no gaps
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    iy, ix = np.rint(pts).astype(np.intp).T
    keep = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    lines[iy[keep], ix[keep]] = np.maximum(lines[iy[keep], ix[keep]], opacity)


def _shading(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multiplicative light: a slow illumination gradient and a dermatoscope vignette."""
    yy, xx = _grid(h, w)
    dy, dx = yy - np.float32((h - 1) / 2), xx - np.float32((w - 1) / 2)
    gy, gx = rng.normal(0, 0.05, 2)
    light = 1.0 + np.float32(0.06) * _field(rng, h, w, min(h, w) / 2)
    light += np.float32(2 * gy / h) * dy + np.float32(2 * gx / w) * dx
    # r is 1 at the corners; the dark ring starts somewhere beyond mid-edge.
    r = np.hypot(dy, dx) * np.float32(2 / math.hypot(h, w))
    start, strength = rng.uniform(0.7, 0.9), rng.uniform(0.3, 0.9)
    ramp = np.clip((r - np.float32(start)) * np.float32(1 / (1 - start)), 0, 1)
    return light * (1.0 - np.float32(strength) * ramp**1.5)


def _write_if_changed(store: Store, name: str, data: bytes) -> None:
    """Regenerating the same data leaves the files untouched, so every stage downstream sees
    unchanged inputs (a second ``make demo`` is all cache hits)."""
    if store.exists(name) and store.read_bytes(name) == data:
        return
    store.write_bytes(name, data)
