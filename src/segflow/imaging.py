"""Decoding of images and masks into the dataset's canonical form.

Images become uint8 RGB (greyscale is replicated to 3 channels later, after resizing, which is
3x cheaper); masks become uint8 {0, 1}. Everything that can go wrong with a file raises
:class:`Rejected` with a reason from :data:`REASONS`, so a batch stage can quarantine it.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from segflow.errors import InputError
from segflow.geometry import Placement, ResizePolicy, place, to_frame
from segflow.png import decode_grey8

#: every reason a file can be quarantined for
REASONS = (
    "unreadable",
    "missing_mask",
    "orphan_mask",
    "duplicate_id",
    "too_large",
    "bad_mask",
    "missing_volume",
    "error",
)
TIFF_SUFFIXES = (".tif", ".tiff")
#: file names every stage treats as images (or masks)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")
# EXIF orientations 5..8 swap width and height.
_SWAPS_AXES = {5, 6, 7, 8}
#: bytes a decode may allocate per pixel of the pixel limit: an RGBA image of 16-bit samples.
#: Every decoder checks what it would allocate against ``max_pixels * BYTES_PER_PIXEL``
#: before allocating it, whatever the format stores: samples, pages, depth or bit depth.
BYTES_PER_PIXEL = 8
#: which mask pixels are foreground: ``ge128`` (>= 128), ``nonzero`` (!= 0), or ``auto``:
#: a {0, 1} map and a label map whose largest value is below 128 by ``nonzero`` (quirk
#: ``mask_label_map`` for the latter), anything reaching 128 by ``ge128``
MaskPositive = Literal["auto", "nonzero", "ge128"]
MASK_POSITIVE: tuple[str, ...] = ("auto", "nonzero", "ge128")


class Rejected(InputError):
    """A file cannot be decoded; ``reason`` is one of :data:`REASONS` and ``detail`` names the
    file and what is wrong with it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    """A decoded image, oriented as displayed, possibly already reduced by JPEG draft mode."""

    image: Image.Image  # mode "L" or "RGB"
    orig_size: tuple[int, int]  # (h, w) at full resolution, after EXIF orientation
    raw_size: tuple[int, int]  # (h, w) as stored, before EXIF orientation
    channels: int  # channel count of the stored file (1 grey, 3 RGB, 4 RGBA/CMYK...)
    orientation: int = 1  # EXIF orientation that was applied (1 = none)
    quirks: list[str] = field(default_factory=list)


def decode_image(
    data: bytes,
    name: str,
    max_pixels: int,
    target: tuple[int, int] | None = None,
    policy: ResizePolicy = "stretch",
) -> Decoded:
    """Decode image bytes. With ``target``, JPEGs are decoded DCT-scaled to just above the size
    the resize needs (Pillow ``draft``), which is several times faster for large sources."""
    if not data:
        raise Rejected("unreadable", f"{name} is empty (0 bytes)")
    try:
        return _decode_image(data, name, max_pixels, target, policy)
    except Rejected:
        raise
    except Exception as e:  # a decoder of untrusted bytes may raise anything: name the file
        raise Rejected("unreadable", f"{name}: {_describe(e)}") from None


def _decode_image(
    data: bytes, name: str, max_pixels: int, target: tuple[int, int] | None, policy: ResizePolicy
) -> Decoded:
    if name.lower().endswith(TIFF_SUFFIXES):
        return _decode_tiff(data, name, max_pixels)
    img = _open_pil(data, name, max_pixels)
    orientation = _orientation(img)
    raw_h, raw_w = img.height, img.width
    h, w = (raw_w, raw_h) if orientation in _SWAPS_AXES else (raw_h, raw_w)
    channels = _pil_channels(img)
    if target is not None and img.format == "JPEG":
        ch, cw = place((h, w), target, policy).content_hw
        want = (ch, cw) if orientation in _SWAPS_AXES else (cw, ch)  # draft works on raw axes
        img.draft(img.mode if img.mode in ("RGB", "L") else None, want)
    img.load()
    quirks: list[str] = []
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        quirks.append("exif_rotated")
    pil, mode_quirk = _to_canonical(img)
    if mode_quirk:
        quirks.append(mode_quirk)
    return Decoded(pil, (h, w), (raw_h, raw_w), channels, orientation, quirks)


@dataclass
class MaskImage:
    """A decoded mask, mode "L", oriented as displayed, and the rule that makes it binary
    (``nonzero`` or ``ge128``), decided on the full mask by :func:`positive_rule`. The rule is
    applied after the nearest-neighbour resize into the frame: the same result, at a fraction
    of the cost on a 6-megapixel mask."""

    image: Image.Image
    rule: Literal["nonzero", "ge128"]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def labels(self) -> bool:
        """Whether any non-zero value is foreground (the values are labels, not levels)."""
        return self.rule == "nonzero"

    def binary(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (values of this mask, e.g. resized) -> bool foreground by the rule."""
        return arr != 0 if self.rule == "nonzero" else arr >= 128


def positive_rule(
    max_value: int, positive: MaskPositive = "auto"
) -> tuple[Literal["nonzero", "ge128"], list[str]]:
    """The rule for a mask whose largest value is ``max_value``, and its quirk. ``auto`` never
    turns a non-empty label map into an empty mask: below 128 everything non-zero counts."""
    if positive == "nonzero":
        return "nonzero", []
    if positive == "ge128":
        return "ge128", []
    if positive != "auto":
        raise ValueError(f"mask_positive must be one of {MASK_POSITIVE}, got {positive!r}")
    if max_value <= 1:
        return "nonzero", []
    if max_value < 128:
        return "nonzero", ["mask_label_map"]
    return "ge128", []


def decode_mask(
    data: bytes, name: str, max_pixels: int, positive: MaskPositive = "auto"
) -> tuple[MaskImage, list[str]]:
    """Mask bytes -> :class:`MaskImage`. The rule is decided on the full mask (its largest
    value: one fast pass); the rest of the value check is left to :func:`mask_to_frame`, on
    the far smaller framed mask."""
    quirks: list[str] = []
    if not data:
        raise Rejected("bad_mask", f"{name} is empty (0 bytes)")
    try:
        if name.lower().endswith(TIFF_SUFFIXES):
            img = _mask_from_array(_read_tiff_array(data, name, max_pixels), quirks)
        else:
            img = _open_pil(data, name, max_pixels)  # the header only: format, size, limit
            grey_png = img.format == "PNG" and img.mode == "L"
            fast = decode_grey8(data, img.size) if grey_png else None
            if fast is not None:
                rule, rq = positive_rule(int(fast.max(initial=0)), positive)
                return MaskImage(Image.fromarray(fast), rule), quirks + rq
            img.load()
            if _orientation(img) != 1:
                img = ImageOps.exif_transpose(img)
            if img.mode != "L":
                rgba = img.convert("RGBA") if "P" in img.mode else img
                img = _mask_from_array(np.asarray(rgba), quirks)
    except Rejected as r:
        raise Rejected("bad_mask", r.detail) from None
    except Exception as e:  # a decoder of untrusted bytes may raise anything: name the file
        raise Rejected("bad_mask", f"{name}: {_describe(e)}") from None
    rule, rq = positive_rule(img.getextrema()[1], positive)
    return MaskImage(img, rule), quirks + rq


def _mask_from_array(arr: np.ndarray, quirks: list[str]) -> Image.Image:
    """Any mask array -> mode "L": integer values in 0..255 are kept (label maps stay label
    maps), wider ones are scaled, soft float masks are thresholded at 0.5 (quirk). With an
    alpha channel, the mask is the colour, unless the colour is uniform and the alpha is not:
    then the shape is in the alpha (quirk ``mask_from_alpha``)."""
    if arr.ndim == 3:
        colour = arr.shape[-1] - 1 if arr.shape[-1] in (2, 4) else arr.shape[-1]
        alpha = arr[..., colour] if colour < arr.shape[-1] else None
        rgb = arr[..., :colour]
        if alpha is not None and rgb.min() == rgb.max() and alpha.min() != alpha.max():
            arr = alpha
            quirks.append("mask_from_alpha")
        else:
            arr = rgb.max(axis=-1)  # a mark in any channel counts
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0)
        if not np.isin(arr, (0.0, 1.0)).all():
            cut = 0.5 if arr.max() <= 1 else 128  # probabilities, or floats on a 0..255 scale
            if not np.isin(arr, (0.0, 1.0 if cut == 0.5 else 255.0)).all():
                quirks.append("mask_thresholded")
            arr = np.where(arr >= cut, 255, 0)
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype != np.uint8:
        in_byte = arr.size and arr.min() >= 0 and arr.max() <= 255
        arr = arr.astype(np.uint8) if in_byte else _to_uint8(arr)
    return Image.fromarray(np.ascontiguousarray(arr), mode="L")


def align_mask(mask: MaskImage, image: Decoded, name: str) -> tuple[MaskImage, list[str]]:
    """Bring a mask into the image's displayed orientation and size.

    A mask stored in the image's raw (pre-EXIF) orientation gets the same transpose as the
    image; a mask of another size is resized to the image with nearest neighbour."""
    quirks: list[str] = []
    h, w = image.orig_size
    if mask.size == (w, h):
        return mask, quirks
    if image.orientation != 1 and mask.size == image.raw_size[::-1]:
        mask = MaskImage(_transpose_for(mask.image, image.orientation), mask.rule)
        quirks.append("mask_exif_aligned")
        if mask.size == (w, h):
            return mask, quirks
    quirks.append("mask_resized")
    return MaskImage(mask.image.resize((w, h), Image.Resampling.NEAREST), mask.rule), quirks


def image_to_frame(img: Decoded, placement: Placement) -> np.ndarray:
    """(H, W, 3) uint8 in the target frame."""
    arr = to_frame(img.image, placement)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr)


def mask_to_frame(
    mask: MaskImage | np.ndarray, placement: Placement, quirks: list[str] | None = None
) -> np.ndarray:
    """(H, W) uint8 {0,1} in the target frame, nearest neighbour so no new values appear,
    made binary by the mask's rule (an array: ``auto``). Adds to ``quirks``:
    ``mask_thresholded`` when >= 128 drops values other than 0/255, and ``mask_emptied`` when
    the rule leaves nothing of a mask that had non-zero pixels."""
    if isinstance(mask, np.ndarray):
        rule, _ = positive_rule(int(mask.max(initial=0)))
        mask = MaskImage(Image.fromarray(mask), rule)
    arr = np.asarray(to_frame(mask.image, placement, nearest=True))
    if mask.rule == "nonzero":
        out = arr != 0
    else:
        counts = np.bincount(arr.ravel(), minlength=256)
        if quirks is not None and counts[1:255].any():
            quirks.append("mask_thresholded")
        out = arr >= 128
        if quirks is not None and counts[1:].any() and not counts[128:].any():
            quirks.append("mask_emptied")
    return np.ascontiguousarray(out.view(np.uint8))


# -- helpers ------------------------------------------------------------------------------------
def check_decode_size(
    name: str,
    hw: tuple[int, int],
    shape: tuple[int, ...],
    itemsize: int,
    max_pixels: int,
    what: str = "decoding",
) -> None:
    """Refuse a decode before it allocates: the plane ``hw`` must hold at most ``max_pixels``
    pixels, and the array it produces (``shape`` of ``itemsize``-byte items: every page,
    sample and plane counted) at most ``max_pixels * BYTES_PER_PIXEL`` bytes."""
    h, w = hw
    if h * w > max_pixels:
        raise Rejected(
            "too_large",
            f"{name} is {w}x{h} = {h * w:,} pixels, over the limit of {max_pixels:,}; raise "
            "max_pixels if the file is trusted",
        )
    need = math.prod(shape) * itemsize
    budget = max_pixels * BYTES_PER_PIXEL
    if need > budget:
        raise Rejected(
            "too_large",
            f"{name}: {what} would allocate {need:,} bytes (shape {tuple(shape)} of "
            f"{itemsize}-byte values), over the limit of {budget:,} bytes (max_pixels "
            f"{max_pixels:,} x {BYTES_PER_PIXEL}); raise max_pixels if the file is trusted",
        )


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _describe(e: BaseException) -> str:
    """An exception as text, without the repr of the in-memory buffer it was decoding (the
    caller names the file instead)."""
    text = _OBJECT_REPR.sub("the data", str(e)).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _open_pil(data: bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit: say ours
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found[1]):,} pixels" if found else "too many pixels"
        raise Rejected(
            "too_large",
            f"{name} is {size}, over the limit of {max_pixels:,}; raise max_pixels if the "
            "file is trusted",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise Rejected(
            "unreadable", f"{name} is not an image Pillow can read ({_describe(e)})"
        ) from None
    mode = ImageMode.getmode(img.mode)
    itemsize = np.dtype(mode.typestr).itemsize
    shape = (img.height, img.width, len(mode.bands))
    check_decode_size(name, (img.height, img.width), shape, itemsize, max_pixels)
    return img


def _orientation(img: Image.Image) -> int:
    try:
        o = int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not reject an otherwise fine image
        return 1
    return o if 1 <= o <= 8 else 1


def _transpose_for(img: Image.Image, orientation: int) -> Image.Image:
    op = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return img.transpose(op) if op is not None else img


def _pil_channels(img: Image.Image) -> int:
    if img.mode == "P":
        return 4 if "transparency" in img.info else 3
    return len(img.getbands())


def _to_canonical(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Any Pillow mode -> "L" or "RGB" uint8. Returns the quirk that names the conversion."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img, None
    if mode in ("1", "LA"):
        return img.convert("L"), f"mode_{mode}"
    if mode in ("P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB"), f"mode_{mode}"
    # 16/32-bit integer and float modes: go through numpy for a defined scaling
    return Image.fromarray(_to_uint8(np.asarray(img))), f"mode_{mode}"


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Defined scalings to uint8: uint16 by the full range (x/257); bool x255; other integer
    and float data by the image's own min..max (float in [0,1] by x255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    a = np.where(finite, a, np.nan)  # NaN/inf pixels become 0; they must not poison min/max
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if arr.dtype.kind == "f" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.nan_to_num(np.round((a - lo) / (hi - lo) * 255), nan=0.0).astype(np.uint8)


def _read_tiff_array(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """The first page of a TIFF as (H, W) or (H, W, C), its size checked before decoding."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            shape, dtype = tuple(page.shape), page.dtype
            if dtype is None or not shape:
                raise Rejected("unreadable", f"{name}: TIFF page with no decodable pixel type")
            hw = _tiff_hw(shape)
            check_decode_size(name, hw, shape, np.dtype(dtype).itemsize, max_pixels)
            if len(shape) > 3:
                raise Rejected(
                    "unreadable",
                    f"{name}: TIFF page of shape {shape} has {len(shape)} dimensions; expected "
                    "(H, W) or (H, W, channels)",
                )
            arr = page.asarray()
    except Rejected:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise Rejected(
            "unreadable", f"{name} is not a TIFF tifffile can read ({_describe(e)})"
        ) from None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _tiff_hw(shape: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of a page shape: (H, W), (H, W, C), planar (C, H, W), or a volume's last two
    axes (a 4-D page is refused after the size check)."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4):
        return shape[1], shape[2]
    if len(shape) == 3:
        return shape[0], shape[1]
    return shape[-3], shape[-2]


def _decode_tiff(data: bytes, name: str, max_pixels: int) -> Decoded:
    arr = _read_tiff_array(data, name, max_pixels)
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    if channels > 4:
        raise Rejected(
            "unreadable", f"{name}: TIFF of {channels} samples per pixel; expected 1 to 4"
        )
    quirks = [] if arr.dtype == np.uint8 else [f"dtype_{arr.dtype}"]
    arr = _to_uint8(arr)
    if arr.ndim == 3:
        arr = arr[..., 0] if channels == 2 else arr[..., :3]
    img = Image.fromarray(np.ascontiguousarray(arr))
    hw = (img.height, img.width)
    return Decoded(img, hw, hw, channels, 1, quirks)
