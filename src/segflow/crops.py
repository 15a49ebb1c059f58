"""``make_crops()``: lesion crops from predicted masks.

For every predicted mask (``--predictions``: the output folder of ``segflow predict``, its
``masks/``, or a folder of masks; see :mod:`segflow.predict.outputs`) the image it belongs to
(``source``) is cut to the box of the mask's **largest** 8-connected component, widened by
``margin`` (a fraction of the box's size on each side) and clipped to the image. Modes:
``crop`` (the image in the box), ``masked`` (the same, with pixels outside the component
filled with ``background``), ``mask`` (the component mask in the box, 0/255 PNG) or ``all``.
The array operations are in :mod:`segflow.masks`. A file that cannot be decoded (whatever the
decoder raises) becomes that image's ``error`` row with its reason; the run goes on.

Which source image belongs to a mask: by default the file ``<id>.*`` at the top of ``source``.
With ``image_pattern`` or ``pairs`` the images and their ids are chosen as ``segflow predict``
chose them from the same options (:mod:`segflow.pairing`: one implementation), so the masks of
a predict run with ``--image-pattern`` / ``--pairs`` find their images by the same ids; masks
may then sit in sub-folders (an id may hold ``/``). Two images of one id: the first in path
order is used, the other is ``duplicate_id`` (as predict does).

Resumability: each image's output files are written first (atomically), then its done record
``_done/<id>.json``, which holds its manifest row and a key over the config and the input
fingerprints. A rerun skips every image whose record has the current key, so a run killed at
any point and rerun ends with the same files as an uninterrupted run. ``crops.csv`` and
``crops.json`` are rebuilt from the records at the end.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import logging
import math
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from segflow.cluster import cpu_count, dask_address
from segflow.config import StageConfig
from segflow.errors import InputError
from segflow.imaging import IMAGE_SUFFIXES, Decoded, MaskImage, Rejected, decode_image, decode_mask
from segflow.masks import (
    DEFAULT_BACKGROUND,
    DEFAULT_MARGIN,
    Box,
    apply_mask,
    background_value,
    encode,
    expand_box,
    largest_box,
)
from segflow.pairing import (
    IMAGE_PATTERN_HELP,
    PAIRS_HELP,
    Dropped,
    Pairing,
    first_per_id,
    pairing_option,
    select_images,
)
from segflow.predict.outputs import (
    LAYOUT_HELP,
    PREDICTIONS_HELP,
    MaskLayout,
    Predictions,
    mask_id,
    open_predictions,
)
from segflow.storage import FileInfo, StorageError, Store, sha256_json

log = logging.getLogger("segflow.crops")

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


class CropsConfig(StageConfig):
    """Options of ``segflow crops``."""

    predictions: str = Field(description=PREDICTIONS_HELP)
    source: str = Field(description="URL of the original images (<id>.jpg, .png, ...)")
    out: str = Field(description="URL to write crops to")
    layout: Literal["isic", "folder"] | None = Field(None, description=LAYOUT_HELP)
    # which source file is a mask's image: the same options, with the same meaning, as predict
    image_glob: str = Field("*", description="which source files are images (fnmatch of paths)")
    image_pattern: str | None = Field(None, description=IMAGE_PATTERN_HELP)
    pairs: str | None = Field(None, description=f"{PAIRS_HELP}; only its image column is read")
    mode: Literal["masked", "crop", "mask", "all"] = Field(
        "masked", description="masked | crop | mask | all"
    )
    margin: float = Field(DEFAULT_MARGIN, ge=0, description="margin, fraction of the box")
    background: Literal["black", "mean", "white"] = Field(
        DEFAULT_BACKGROUND, description="black | mean | white"
    )
    format: Literal["png", "jpeg"] = Field("png", description="png | jpeg")
    quality: int = Field(95, ge=1, le=100, description="JPEG quality")
    min_area_frac: float = Field(
        0.001, ge=0, le=1, description="smallest lesion kept, a fraction of the image area"
    )
    workers: int | None = Field(None, ge=1, description="local Dask workers")
    dask_address: str | None = Field(None, description="Dask scheduler address")
    max_pixels: int = Field(178_956_970, ge=1)

    @model_validator(mode="after")
    def _one_pairing(self) -> CropsConfig:
        if self.image_pattern and self.pairs:
            raise ValueError("give --image-pattern (pairing by name) or --pairs (a CSV), not both")
        return self

    @property
    def pairing(self) -> Pairing | None:
        """How the images are chosen, when not by ``<id>.*`` at the top of the source: a
        pattern, a pairs CSV, or a glob alone (ids are then paths without the extension,
        sub-folders included, as ``segflow predict --layout folder --image-glob`` names them)."""
        if not (self.image_pattern or self.pairs or self.image_glob != "*"):
            return None
        return Pairing(self.image_glob, self.image_pattern, None, self.pairs)


_NOT_IN_KEY = CropsConfig.runtime_fields | {"out"}
#: left out of the key at their defaults, so the records of runs made before the options
#: existed stay valid (which image a mask gets is in the key anyway: its fingerprint, and with
#: a pairing its path)
_PAIRING_FIELDS = ("image_glob", "image_pattern", "pairs")


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

    predictions: Store  # the folder holding the masks
    source: Store
    out: Store
    kinds: tuple[str, ...]
    margin: float
    background: str
    format: str
    quality: int
    min_area_frac: float
    max_pixels: int

    @classmethod
    def of(cls, cfg: CropsConfig, predictions: Store, source: Store, out: Store) -> Context:
        return cls(
            predictions=predictions,
            source=source,
            out=out,
            kinds=MODES[cfg.mode],
            margin=cfg.margin,
            background=cfg.background,
            format=cfg.format,
            quality=cfg.quality,
            min_area_frac=cfg.min_area_frac,
            max_pixels=cfg.max_pixels,
        )


def make_crops(cfg: CropsConfig) -> CropsResult:
    t0 = time.perf_counter()
    predictions = open_predictions(cfg.predictions, cfg.storage, cfg.layout)
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
    ctx = Context.of(cfg, predictions.masks_store, source, out)
    for row in _run(todo, ctx, cfg):
        rows[row["id"]] = row
    return _finish(cfg, out, [rows[i.id] for i in items], len(items) - len(todo), t0)


def discover(cfg: CropsConfig, predictions: Predictions, source: Store) -> list[Item]:
    """The masks of ``predictions`` paired with their source images, by id."""
    store, layout = predictions.masks_store, predictions.layout
    masks = _mask_files(store.list(), layout, nested=cfg.pairing is not None)
    if not masks:
        want = "<id>_segmentation.png" if layout == "isic" else "<id>.png"
        raise InputError(
            f"no {want} masks at {store.url} (layout {layout}); --predictions must be "
            f"{PREDICTIONS_HELP}"
        )
    # where the outputs go does not change them: two out folders get the same records; the
    # layout is the one in effect (the predict run's), not the option as given
    public = {**cfg.public_dict(), "layout": layout}
    config_key = sha256_json(
        {
            k: v
            for k, v in public.items()
            if k not in _NOT_IN_KEY
            and not (k in _PAIRING_FIELDS and v == CropsConfig.model_fields[k].default)
        }
    )
    pick = _image_picker(cfg, source, layout)
    items = []
    for image_id, mask in sorted(masks.items()):
        image, problem = pick(image_id)
        fp: list[Any] = [mask.fingerprint, image.fingerprint if image else None, problem]
        if cfg.pairing is not None:  # a pairing may give an id another file of the same size
            fp.append(image.rel if image else None)
        key = sha256_json([config_key, fp])
        items.append(Item(image_id, mask.rel, image.rel if image else None, key, problem))
    return items


def _mask_files(files: list[FileInfo], layout: MaskLayout, nested: bool) -> dict[str, FileInfo]:
    """id -> mask file; ``nested``: masks in sub-folders too (a pairing's ids may hold ``/``,
    and predict writes ``masks/<id>.png``)."""
    found = {}
    for f in files:
        image_id = None if "/" in f.rel and not nested else mask_id(f.rel, layout)
        if image_id is not None:
            found[image_id] = f
    return found


def _image_files(files: list[FileInfo], image_glob: str) -> dict[str, list[FileInfo]]:
    by_stem: dict[str, list[FileInfo]] = {}
    for f in files:
        stem, ext = posixpath.splitext(f.rel)
        if "/" in f.rel or ext.lower() not in IMAGE_SUFFIXES:
            continue
        if fnmatch.fnmatch(f.rel, image_glob):
            by_stem.setdefault(stem, []).append(f)
    return by_stem


#: id -> (its image, or None and the problem)
Picker = Callable[[str], tuple[FileInfo | None, tuple[str, str] | None]]


def _image_picker(cfg: CropsConfig, source: Store, layout: str) -> Picker:
    if cfg.pairing is not None:
        return _paired_images(cfg.pairing, source)
    images = _image_files(source.list(), cfg.image_glob)
    return lambda image_id: _pick_image(image_id, images.get(image_id, []), layout, source)


def _paired_images(spec: Pairing, source: Store) -> Picker:
    """id -> (image, problem) as ``segflow predict`` chose the images from the same options;
    an id whose image pairing left out gets pairing's reason (a bad id, a CSV row naming a
    missing file)."""
    paired = first_per_id(select_images(source, spec, "crop"), source, "cropped")
    chosen = {c.id: c.image for c in paired.candidates}
    left_out: dict[str, Dropped] = {}
    for d in paired.dropped:
        left_out.setdefault(d.id, d)
    for d in paired.dropped[:_LOGGED]:
        log.warning("crops: %s not used: %s", d.file, d.detail)
    how = pairing_option(spec)

    def pick(image_id: str) -> tuple[FileInfo | None, tuple[str, str] | None]:
        if image_id in chosen:
            return chosen[image_id], None
        d = left_out.get(image_id)
        if d is not None:
            return None, (d.reason, d.detail)
        return None, ("missing_image", f"no image of id {image_id} in {source.uri()} by {how}")

    return pick


_LOGGED = 20  # left-out images logged one by one; the rest are in their masks' rows


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
    mask_img = _decode_mask(ctx.predictions.read_bytes(item.mask), item.mask, ctx.max_pixels)
    w, h = mask_img.size
    # the rule of mask_to_frame (labels as they are, else >= 128 is foreground) without its
    # value census: at full resolution that census costs as much as the PNG decode
    raw = np.asarray(mask_img.image)
    mask = raw if mask_img.labels else raw >= 128
    decoded = _decode_image(ctx.source.read_bytes(item.image), item.image, ctx.max_pixels)
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


def _decode_mask(data: bytes, name: str, max_pixels: int) -> MaskImage:
    try:
        return decode_mask(data, name, max_pixels)[0]
    except Rejected:
        raise
    except Exception as e:  # a decoder's own failure on a bad file is that file's problem
        raise Rejected("bad_mask", _decode_failure(name, e)) from None


def _decode_image(data: bytes, name: str, max_pixels: int) -> Decoded:
    try:
        return decode_image(data, name, max_pixels)
    except Rejected:
        raise
    except Exception as e:  # a decoder's own failure on a bad file is that file's problem
        raise Rejected("unreadable", _decode_failure(name, e)) from None


def _decode_failure(name: str, e: Exception) -> str:
    return f"{name} cannot be decoded ({type(e).__name__}: {e}); replace or remove the file"


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
