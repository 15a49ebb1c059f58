"""``make_crops()``: lesion crops from predicted masks.

For every predicted mask (``<predictions>/masks/``) the image it belongs to (``source``) is cut
to the box of the mask's **largest** 8-connected component, widened by ``margin`` (a fraction
of the box's size on each side) and clipped to the image. Modes: ``crop`` (the image in the
box), ``masked`` (the same, with pixels outside the component filled with ``background``),
``mask`` (the component mask in the box, 0/255 PNG) or ``all``.

Resumability: each image's output files are written first (atomically), then its done record
``_done/<id>.json``, which holds its manifest row and a key over the config and the input
fingerprints. A rerun skips every image whose record has the current key, so a run killed at
any point and rerun ends with the same files as an uninterrupted run. ``crops.csv`` and
``crops.json`` are rebuilt from the records at the end.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import posixpath
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field
from scipy import ndimage

from segflow import png
from segflow.cluster import cpu_count, dask_address
from segflow.config import StageConfig
from segflow.errors import InputError
from segflow.imaging import IMAGE_SUFFIXES, Rejected, decode_image, decode_mask
from segflow.storage import FileInfo, StorageError, Store, sha256_json

log = logging.getLogger("segflow.crops")

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
MODES = {"crop": ("crop",), "masked": ("masked",), "mask": ("mask",)}
MODES["all"] = ("crop", "masked", "mask")
DONE = "_done"
MANIFEST = "crops.csv"
SUMMARY = "crops.json"
MARKER = "crops"
COLUMNS = (
    "id",
    "status",
    "x0",
    "y0",
    "x1",
    "y1",
    "area",
    "n_components",
    "fraction",
    "height",
    "width",
    "outputs",
    "reason",
    "detail",
)
# Photo crops barely compress past deflate level 1, while level 6 (Pillow's default) costs ~5x
# the time of the JPEG decode that precedes it; PNG stays lossless either way.
PNG_LEVEL = 1
_EIGHT = np.ones((3, 3), dtype=bool)
_FILL = {"black": 0, "white": 255}


class CropsConfig(StageConfig):
    """Options of ``segflow crops``."""

    predictions: str
    source: str
    out: str
    layout: Literal["isic", "folder"] = "isic"
    mode: Literal["masked", "crop", "mask", "all"] = "masked"
    margin: float = Field(0.1, ge=0)
    background: Literal["black", "mean", "white"] = "black"
    format: Literal["png", "jpeg"] = "png"
    quality: int = Field(95, ge=1, le=100)
    min_area_frac: float = Field(0.001, ge=0, le=1)
    workers: int | None = Field(None, ge=1)
    dask_address: str | None = None
    max_pixels: int = Field(178_956_970, ge=1)


_NOT_IN_KEY = CropsConfig.runtime_fields | {"out"}


@dataclass
class CropsResult:
    """The ``--json`` summary of one crops run."""

    out: str
    n_images: int
    n_ok: int
    n_empty: int
    n_error: int
    n_skipped: int  # done by an earlier run, not redone
    errors_by_reason: dict[str, int]
    manifest: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- array operations ---------------------------------------------------------------------------
def largest_box(mask: np.ndarray, min_area: int = 1) -> tuple[Box | None, int, int, np.ndarray]:
    """``(bbox, area, n_components, component)`` of the largest 8-connected foreground
    component of an (H, W) mask. ``bbox`` is ``(x0, y0, x1, y1)`` (exclusive ends) or ``None``
    when the mask is empty or its largest component has fewer than ``min_area`` pixels;
    ``component`` is a uint8 {0, 1} (H, W) mask of that component (all 0 when ``None``). Ties go
    to the component whose first pixel comes first in raster order, as in
    :func:`segflow.predict.postprocess.largest_component`."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D (H, W) mask, got shape {mask.shape}")
    fg = mask if mask.dtype == bool else mask != 0
    component = np.zeros(mask.shape, dtype=np.uint8)
    # the sum over the component needs only the pixels of its bounding box
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return None, 0, 0, component
    # Label only the box around all foreground: lesions are a fraction of the image, and raster
    # order inside the box is the image's, so the tie rule is unchanged.
    r0, c0 = int(rows[0]), int(cols[0])
    sub = fg[r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1]
    labels, n = ndimage.label(sub, structure=_EIGHT)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = int(np.argmax(sizes))
    area = int(sizes[keep])
    if area < max(1, min_area):
        return None, area, n, component
    ys, xs = ndimage.find_objects(labels, max_label=keep)[keep - 1]
    inside = labels[ys, xs] == keep
    y0, x0 = r0 + ys.start, c0 + xs.start
    component[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]] = inside
    return (x0, y0, x0 + inside.shape[1], y0 + inside.shape[0]), area, n, component


def expand_box(bbox: Box, margin: float, shape: tuple[int, ...]) -> Box:
    """``bbox`` widened by ``margin`` x its width (left and right) and x its height (top and
    bottom), rounded up to whole pixels, then clipped to an image of ``shape`` (H, W, ...)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = bbox
    h, w = shape[0], shape[1]
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box {bbox} is empty or outside an image of shape {tuple(shape)}")
    # the epsilon keeps 0.1 * 30 = 3.0000000000000004 from rounding up to 4
    dx = math.ceil(margin * (x1 - x0) - 1e-9)
    dy = math.ceil(margin * (y1 - y0) - 1e-9)
    return max(0, x0 - dx), max(0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy)


def paste_back(
    crop: np.ndarray, bbox: Box, shape: tuple[int, ...], fill: int | float = 0
) -> np.ndarray:
    """A canvas of ``shape`` filled with ``fill``, with ``crop`` placed at ``bbox``: the exact
    inverse of ``image[y0:y1, x0:x1]`` inside the box."""
    crop = np.asarray(crop)
    x0, y0, x1, y1 = bbox
    if not (0 <= x0 <= x1 <= shape[1] and 0 <= y0 <= y1 <= shape[0]):
        raise ValueError(f"box {bbox} does not fit in shape {tuple(shape)}")
    want = (y1 - y0, x1 - x0, *shape[2:])
    if crop.shape != want:
        raise ValueError(f"crop of shape {crop.shape} does not match box {bbox}: expected {want}")
    canvas = np.full(shape, fill, dtype=crop.dtype)
    canvas[y0:y1, x0:x1] = crop
    return canvas


def masked_crop(
    image: np.ndarray, component: np.ndarray, box: Box, background: str, area: int | None = None
) -> np.ndarray:
    """``image`` in ``box`` with the pixels outside ``component`` set to ``background``:
    black, white, or the mean (rounded) of the image's pixels outside the component."""
    x0, y0, x1, y1 = box
    fill = background_value(background, image, component, area)
    return apply_mask(image[y0:y1, x0:x1], component[y0:y1, x0:x1], fill)


def apply_mask(crop: np.ndarray, inside: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """``crop`` where ``inside`` is set, ``fill`` elsewhere (uint8)."""
    inside = inside.astype(bool)
    out = np.where(inside[..., None] if crop.ndim == 3 else inside, crop, fill)
    return out if out.dtype == np.uint8 else out.astype(np.uint8)


def background_value(
    background: str,
    image: np.ndarray | None = None,
    component: np.ndarray | None = None,
    area: int | None = None,
) -> np.ndarray:
    """The fill colour; ``mean`` (of the image's pixels outside the component) needs both
    arrays, black and white neither."""
    if background in _FILL:
        return np.array(_FILL[background], dtype=np.uint8)
    if background != "mean":
        raise ValueError(f"unknown background {background!r}; allowed: black, mean, white")
    if image is None or component is None:
        raise ValueError("the mean background needs the image and the component mask")
    channels = image.shape[2:]
    flat = image.reshape(-1, *channels)
    area = int(component.sum()) if area is None else area
    outside = flat.shape[0] - area
    if outside == 0:  # the component covers the image: nothing gets filled
        return np.zeros(channels, dtype=np.uint8)
    total = flat.sum(axis=0, dtype=np.float64)
    return np.rint((total - _sum_inside(image, component)) / outside).astype(np.uint8)


def _sum_inside(image: np.ndarray, component: np.ndarray) -> np.ndarray:
    # the sum over the component needs only the pixels of its bounding box
    rows, cols = np.flatnonzero(component.any(axis=1)), np.flatnonzero(component.any(axis=0))
    if rows.size == 0:
        return np.zeros(image.shape[2:], dtype=np.float64)
    ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    return image[ys, xs][component[ys, xs].astype(bool)].sum(axis=0, dtype=np.float64)


# -- the stage ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One predicted mask and what is known about it before any pixel is read."""

    id: str
    mask: str  # relative to the predictions store
    image: str | None  # relative to the source store; None when missing or ambiguous
    key: str  # changes whenever the config or either input changes
    problem: tuple[str, str] | None = None  # (reason, detail) found by discovery
    old_outputs: tuple[str, ...] = ()  # files of an outdated record, removed once replaced


@dataclass(frozen=True)
class Context:
    """What a worker needs; picklable, so it travels to a Dask cluster."""

    predictions: Store
    source: Store
    out: Store
    kinds: tuple[str, ...]
    margin: float
    background: str
    format: str
    quality: int
    min_area_frac: float
    max_pixels: int


def make_crops(cfg: CropsConfig) -> CropsResult:
    t0 = time.perf_counter()
    predictions = Store(cfg.predictions, cfg.storage)
    source = Store(cfg.source, cfg.storage)
    out = Store(cfg.out, cfg.storage)
    _remove_orphan_temps(out)
    items = discover(cfg, predictions, source)
    done = _read_records(out)
    rows: dict[str, dict[str, Any]] = {}
    todo: list[Item] = []
    for item in items:
        rec = done.get(item.id)
        if rec is not None and rec.get("key") == item.key:
            rows[item.id] = rec["row"]
        else:
            old = tuple(_outputs(rec["row"])) if rec is not None else ()
            todo.append(Item(**{**asdict(item), "old_outputs": old}))
    log.info("crops: %d masks, %d to do, %d done before", len(items), len(todo), len(rows))
    ctx = Context(
        predictions,
        source,
        out,
        MODES[cfg.mode],
        cfg.margin,
        cfg.background,
        cfg.format,
        cfg.quality,
        cfg.min_area_frac,
        cfg.max_pixels,
    )
    for row in _run(todo, ctx, cfg):
        rows[row["id"]] = row
    return _finish(cfg, out, [rows[i.id] for i in items], len(items) - len(todo), t0)


def discover(cfg: CropsConfig, predictions: Store, source: Store) -> list[Item]:
    """The masks under ``<predictions>/masks/`` paired with their source images, by id."""
    if not predictions.exists("masks"):
        raise InputError(
            f"no masks folder at {predictions.uri('masks')}; --predictions must be the output "
            "of `segflow predict` (masks under <predictions>/masks/)"
        )
    masks = _mask_files(predictions.list("masks"), cfg.layout)
    if not masks:
        want = "<id>_segmentation.png" if cfg.layout == "isic" else "<id>.png"
        raise InputError(f"no {want} masks under {predictions.uri('masks')} (layout {cfg.layout})")
    images = _image_files(source.list())
    # where the outputs go does not change them: two out folders get the same records
    config_key = sha256_json({k: v for k, v in cfg.public_dict().items() if k not in _NOT_IN_KEY})
    items = []
    for image_id, mask in sorted(masks.items()):
        image, problem = _pick_image(image_id, images.get(image_id, []), cfg.layout, source)
        fp = (mask.fingerprint, image.fingerprint if image else None, problem)
        key = sha256_json([config_key, fp])
        items.append(Item(image_id, mask.rel, image.rel if image else None, key, problem))
    return items


def _mask_files(files: list[FileInfo], layout: str) -> dict[str, FileInfo]:
    found = {}
    for f in files:
        name = posixpath.relpath(f.rel, "masks")
        if "/" in name or not name.lower().endswith(".png"):
            continue
        stem = name[: -len(".png")]
        if layout == "isic":
            if not stem.endswith("_segmentation"):
                continue
            stem = stem[: -len("_segmentation")]
        found[stem] = f
    return found


def _image_files(files: list[FileInfo]) -> dict[str, list[FileInfo]]:
    by_stem: dict[str, list[FileInfo]] = {}
    for f in files:
        stem, ext = posixpath.splitext(f.rel)
        if "/" not in f.rel and ext.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(stem, []).append(f)
    return by_stem


def _pick_image(
    image_id: str, found: list[FileInfo], layout: str, source: Store
) -> tuple[FileInfo | None, tuple[str, str] | None]:
    if layout == "isic":  # the ISIC naming is <id>.jpg: prefer it over look-alikes
        jpg = [f for f in found if f.rel.lower().endswith(".jpg")]
        found = jpg or found
    if len(found) == 1:
        return found[0], None
    if not found:
        return None, ("missing_image", f"no image {image_id}.* in {source.uri()}")
    names = ", ".join(f.rel for f in found)
    return None, ("ambiguous_image", f"several images for {image_id} in {source.uri()}: {names}")


def _remove_orphan_temps(out: Store) -> None:
    """Temporary files left by a killed local write are garbage; S3 writes leave none."""
    if not out.is_local or not os.path.isdir(out.root):
        return
    for folder, _, names in os.walk(out.root):
        for name in names:
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(folder, name))


def _read_records(out: Store) -> dict[str, dict[str, Any]]:
    rels = [f.rel for f in out.list(DONE) if f.rel.endswith(".json")]
    with ThreadPoolExecutor(16) as pool:  # S3 reads are latency-bound
        records = list(pool.map(out.read_json, rels))
    return {r["row"]["id"]: r for r in records}


def _outputs(row: dict[str, Any]) -> list[str]:
    return [p for p in str(row.get("outputs") or "").split(";") if p]


def _run(todo: list[Item], ctx: Context, cfg: CropsConfig) -> list[dict[str, Any]]:
    if not todo:
        return []
    import dask

    # Decoding and encoding release the GIL and workers also wait on storage: 2 threads per
    # core keep the cores busy while some threads wait on reads and writes.
    workers = cfg.workers or 2 * cpu_count()
    size = max(1, min(16, -(-len(todo) // (4 * workers))))  # ~4 tasks per worker
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    tasks = [dask.delayed(process_batch, pure=False)(b, ctx) for b in batches]
    if address := dask_address(cfg.dask_address):
        from distributed import Client

        with Client(address) as client:
            results = client.compute(tasks, sync=True)
    else:
        results = dask.compute(*tasks, scheduler="threads", num_workers=workers)
    return [row for batch in results for row in batch]


def process_batch(items: list[Item], ctx: Context) -> list[dict[str, Any]]:
    return [process_one(item, ctx) for item in items]


def process_one(item: Item, ctx: Context) -> dict[str, Any]:
    """Crop one image; write its files, then its done record. Storage failures are reported
    but not recorded, so a rerun tries again; bad inputs are recorded, as a rerun would fail
    the same way."""
    try:
        row = _crop(item, ctx)
    except Rejected as r:
        row = _row(item.id, "error", reason=r.reason, detail=r.detail)
    except (StorageError, OSError) as e:
        log.warning("crops: %s failed on storage: %s", item.id, e)
        return _row(item.id, "error", reason="io_error", detail=str(e))
    ctx.out.write_json(f"{DONE}/{item.id}.json", {"key": item.key, "row": row})
    for rel in set(item.old_outputs) - set(_outputs(row)):
        ctx.out.delete(rel)
    return row


def _crop(item: Item, ctx: Context) -> dict[str, Any]:
    if item.problem is not None or item.image is None:
        reason, detail = item.problem or ("missing_image", item.id)
        return _row(item.id, "error", reason=reason, detail=detail)
    mask_img, _ = decode_mask(ctx.predictions.read_bytes(item.mask), item.mask, ctx.max_pixels)
    w, h = mask_img.size
    # the rule of mask_to_frame (labels as they are, else >= 128 is foreground) without its
    # value census: at full resolution that census costs as much as the PNG decode
    raw = np.asarray(mask_img.image)
    mask = raw if mask_img.labels else raw >= 128
    decoded = decode_image(ctx.source.read_bytes(item.image), item.image, ctx.max_pixels)
    if decoded.orig_size != (h, w):
        ih, iw = decoded.orig_size
        detail = f"mask {item.mask} is {w}x{h} but image {item.image} is {iw}x{ih} (W x H)"
        return _row(item.id, "error", reason="size_mismatch", detail=detail, height=ih, width=iw)
    min_area = max(1, math.ceil(ctx.min_area_frac * h * w - 1e-9))
    bbox, area, n, component = largest_box(mask, min_area)
    stats = {"area": area, "n_components": n, "fraction": round(area / (h * w), 6)}
    if bbox is None:
        return _row(item.id, "empty", height=h, width=w, **stats)
    box = expand_box(bbox, ctx.margin, (h, w))
    outputs = _write_outputs(item.id, decoded.image, component, box, area, ctx)
    x0, y0, x1, y1 = box
    return _row(
        item.id,
        "ok",
        x0=x0,
        y0=y0,
        x1=x1,
        y1=y1,
        height=h,
        width=w,
        outputs=";".join(outputs),
        **stats,
    )


def _write_outputs(
    image_id: str, image: Image.Image, component: np.ndarray, box: Box, area: int, ctx: Context
) -> list[str]:
    x0, y0, x1, y1 = box
    inside = component[y0:y1, x0:x1]
    crop = np.asarray(image.crop(box))  # copies only the box, not the whole image
    outputs = []
    for kind in ctx.kinds:
        if kind == "mask":  # always PNG: a mask must come back exactly as written
            arr, fmt = inside * np.uint8(255), "png"
        elif kind == "crop":
            arr, fmt = crop, ctx.format
        else:
            full = np.asarray(image) if ctx.background == "mean" else None
            fill = background_value(ctx.background, full, component, area)
            arr, fmt = apply_mask(crop, inside, fill), ctx.format
        rel = f"{kind}/{image_id}.{'png' if fmt == 'png' else 'jpg'}"
        ctx.out.write_bytes(rel, encode(arr, fmt, ctx.quality))
        outputs.append(rel)
    return outputs


def encode(arr: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    if fmt == "png":
        return png.encode(arr, PNG_LEVEL)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _row(image_id: str, status: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    row.update(id=image_id, status=status, **fields)
    return row


def _finish(
    cfg: CropsConfig, out: Store, rows: list[dict[str, Any]], skipped: int, t0: float
) -> CropsResult:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest = out.write_bytes(MANIFEST, buf.getvalue().encode())
    counts = Counter(r["status"] for r in rows)
    reasons = Counter(r["reason"] for r in rows if r["status"] == "error")
    result = CropsResult(
        out=out.url,
        n_images=len(rows),
        n_ok=counts["ok"],
        n_empty=counts["empty"],
        n_error=counts["error"],
        n_skipped=skipped,
        errors_by_reason=dict(sorted(reasons.items())),
        manifest=manifest,
        seconds=round(time.perf_counter() - t0, 3),
    )
    out.write_json(SUMMARY, {**result.to_dict(), "config": cfg.public_dict()})
    out.mark_complete(MARKER, result.to_dict())
    return result
