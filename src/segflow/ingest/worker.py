"""The per-batch work of ingest, run on Dask workers.

A batch owns its rows' slots: it writes each row's image and mask chunk, then the row's record
``_staging/rows/<slot>.json``. The record is written last, so it means "this slot is done";
a killed run redoes exactly the slots without a record.
"""

from __future__ import annotations

import hashlib
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from segflow.geometry import Placement, place, to_frame
from segflow.imaging import (
    MaskPositive,
    Rejected,
    align_mask,
    decode_image,
    decode_mask,
    image_to_frame,
    mask_to_frame,
)
from segflow.ingest.writer import row_encoder
from segflow.storage import StorageError, Store, sha256_bytes

STAGING = "_staging"


@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker needs; small and picklable (Stores rebuild their fs lazily)."""

    source: Store
    masks: Store
    dataset: Store
    size: tuple[int, int]
    resize: str
    max_pixels: int
    hu_window: tuple[float, float]
    layout: str
    mask_positive: MaskPositive = "auto"


@dataclass(frozen=True)
class Slot:
    """A planned row: which dataset index it goes to, and where its inputs are."""

    index: int  # the scratch row its pixels are written to (at or past the committed n)
    row: int | None  # the committed row it replaces; None for a new row
    id: str
    group: str
    unit: str
    image: str
    mask: str | None
    fingerprint: str
    extra: dict[str, Any]


def record_name(s: Slot) -> str:
    """Record file of a slot; the name carries a hash of what was planned for it, so a record
    left by an older plan for the same slot is never mistaken for this one."""
    h = hashlib.sha256(f"{s.id}\0{s.fingerprint}".encode()).hexdigest()[:12]
    return f"{STAGING}/rows/{s.index:09d}-{h}.json"


def process_batch(slots: list[Slot], ctx: WorkerContext) -> int:
    """Decode, write and record every slot of the batch; returns how many were written."""
    decoded = []
    for unit_slots in _by_unit(slots):
        try:
            rows = _decode_unit(unit_slots, ctx)
        except Rejected as r:
            for s in unit_slots:
                _write_record(ctx, s, _rejection(ctx, s, r.reason, r.detail))
            continue
        except Exception as e:  # never lose a batch to one bad file: quarantine with the cause
            detail = f"{type(e).__name__}: {e} ({traceback.format_exc(limit=2).splitlines()[-1]})"
            for s in unit_slots:
                _write_record(ctx, s, _rejection(ctx, s, "error", detail))
            continue
        decoded += [(s, *row) for s, row in zip(unit_slots, rows, strict=True)]
    _write_pixels(ctx, decoded)
    for s, _, _, meta in decoded:  # records last: a record means the pixels are in place
        _write_record(ctx, s, meta)
    return len(decoded)


def _write_pixels(ctx: WorkerContext, decoded: list) -> None:
    """Store this batch's image and mask rows. The chunks are the batch's own, so each still
    has one writer."""
    if not decoded:
        return
    zs = ctx.dataset.zarr_store()
    images = zarr.open_array(zs, path="images", mode="r+")
    _store_rows(ctx, images, [(s.index, image) for s, image, _, _ in decoded])
    if _has_masks(zs):
        masks = zarr.open_array(zs, path="masks", mode="r+")
        _store_rows(ctx, masks, [(s.index, m) for s, _, m, _ in decoded if m is not None])


def _store_rows(ctx: WorkerContext, arr: zarr.Array, rows: list[tuple[int, np.ndarray]]) -> None:
    if (encode := row_encoder(arr)) is not None:  # the dataset's own layout: chunk by chunk
        for index, row in rows:
            ctx.dataset.write_bytes(*encode(index, row), durable=False)
        return
    for run in _runs(rows):  # any other layout: one zarr call per run of consecutive rows
        arr[run[0][0] : run[-1][0] + 1] = np.stack([a for _, a in run])


def _runs(items: list[tuple[int, np.ndarray]]) -> list[list[tuple[int, np.ndarray]]]:
    runs: list[list[tuple[int, np.ndarray]]] = []
    for index, arr in sorted(items, key=lambda t: t[0]):
        if runs and runs[-1][-1][0] == index - 1:
            runs[-1].append((index, arr))
        else:
            runs.append([(index, arr)])
    return runs


def _has_masks(zs) -> bool:
    try:
        zarr.open_array(zs, path="masks", mode="r")
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, KeyError):
        return False
    return True


def _by_unit(slots: list[Slot]) -> list[list[Slot]]:
    units: dict[str, list[Slot]] = {}
    for s in slots:
        units.setdefault(s.unit, []).append(s)
    return list(units.values())


def _decode_unit(slots: list[Slot], ctx: WorkerContext):
    if ctx.layout == "luna":
        return _decode_luna(slots, ctx)
    return [_decode_2d(s, ctx) for s in slots]


def _read(store: Store, rel: str, reason: str) -> bytes:
    """A file's bytes; one that cannot be read (gone since the listing, a link to nowhere, no
    permission) is a rejection of the row, not an error of the run."""
    try:
        return store.read_bytes(rel)
    except (StorageError, OSError) as e:
        raise Rejected(reason, f"{store.uri(rel)} cannot be read ({e})") from None


def _decode_2d(s: Slot, ctx: WorkerContext):
    data = _read(ctx.source, s.image, "unreadable")
    img = decode_image(data, s.image, ctx.max_pixels, ctx.size, ctx.resize)  # type: ignore[arg-type]
    placement = place(img.orig_size, ctx.size, ctx.resize)  # type: ignore[arg-type]
    quirks = list(img.quirks)
    mask_frame, mask_bytes = None, b""
    if s.mask is not None:
        mask_bytes = _read(ctx.masks, s.mask, "bad_mask")
        mask, mq = decode_mask(mask_bytes, s.mask, ctx.max_pixels, ctx.mask_positive)
        mask, aq = align_mask(mask, img, s.mask)
        quirks += mq + aq
        mask_frame = mask_to_frame(mask, placement, quirks)
    meta = _meta(ctx, s, placement, img.channels, sha256_bytes(data, mask_bytes), quirks)
    meta["mask_source"] = ctx.masks.uri(s.mask) if s.mask else ""
    return image_to_frame(img, placement), mask_frame, meta


def _decode_luna(slots: list[Slot], ctx: WorkerContext):
    from PIL import Image

    from segflow.ingest.luna import draw_ellipses, read_slices, window

    ks = [s.extra["z"] for s in slots]
    hu = read_slices(ctx.source, slots[0].image, slots[0].extra["raw"], ks, ctx.max_pixels)
    out = []
    for s in slots:
        plane = hu[s.extra["z"]]
        mask = draw_ellipses(plane.shape, s.extra["ellipses"])
        placement = place(plane.shape, ctx.size, ctx.resize)  # type: ignore[arg-type]
        image = to_frame(Image.fromarray(window(plane, *ctx.hu_window)), placement)
        image = np.repeat(image[..., None], 3, axis=-1)
        meta = _meta(ctx, s, placement, 1, sha256_bytes(plane.tobytes(), mask.tobytes()), [])
        meta["mask_source"] = ""
        out.append((image, mask_to_frame(mask, placement), meta))
    return out


def _meta(ctx, s: Slot, p: Placement, channels: int, chash: str, quirks: list[str]):
    return {
        "status": "ok",
        "index": s.index,
        "id": s.id,
        "group": s.group,
        "source": ctx.source.uri(s.image),
        "fingerprint": s.fingerprint,
        "content_hash": chash,
        "has_mask": s.mask is not None or ctx.layout == "luna",
        "orig_size": list(p.orig_size),
        "pad_box": list(p.pad_box),
        "orig_channels": channels,
        "quirks": quirks,
    }


def _rejection(ctx: WorkerContext, s: Slot, reason: str, detail: str) -> dict[str, Any]:
    return {
        "status": "rejected",
        "index": s.index,
        "id": s.id,
        "source": ctx.source.uri(s.image),
        "fingerprint": s.fingerprint,
        "reason": reason,
        "detail": detail,
    }


def _write_record(ctx: WorkerContext, s: Slot, record: dict[str, Any]) -> None:
    # No fsync per record: a killed process loses nothing (the rename is atomic), and a power
    # cut at worst redoes a few rows; an fsync per image would cost more than its decode.
    ctx.dataset.write_json(record_name(s), record, durable=False)
