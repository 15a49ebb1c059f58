"""LUNA16-style CT: ``.mhd``/``.raw`` volumes plus ``annotations.csv``.

Each nodule (world-mm centre, diameter) becomes the axial slices whose centre plane cuts its
sphere. On each slice the mask is the sphere's cross-section: a filled circle of radius
``sqrt(r^2 - dz^2)`` mm, drawn in voxels through the volume's origin, spacing and direction.
The series uid is the group, so a series never lands in two folds.
"""

from __future__ import annotations

import csv
import io
import math
import os
import posixpath
import tempfile
from dataclasses import dataclass

import numpy as np

from segflow.imaging import Rejected, check_decode_size
from segflow.ingest.config import IngestConfig
from segflow.ingest.rows import Discovery, Listing, RowSpec, Skip, register, stem_ext
from segflow.storage import FileInfo, Store, sha256_json

# bytes per voxel of each MetaImage element type
_ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_FLOAT": 4,
    "MET_LONG": 8,
    "MET_ULONG": 8,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_DOUBLE": 8,
}


@dataclass(frozen=True)
class Header:
    """The parts of a MetaImage header that place voxels in the world (x, y, z order)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major
    data_file: str
    voxel_bytes: int = 2  # element size x channels
    compressed: bool = False  # zlib-compressed data (.zraw) is read whole, not slice by slice

    def check_size(self, name: str, max_pixels: int) -> None:
        """Refuse a volume whose read would allocate more than the limit allows: one slice
        of an uncompressed volume (ITK streams it), the whole of a compressed one."""
        nx, ny, nz = self.size
        shape = (nz, ny, nx) if self.compressed else (ny, nx)
        what = "the whole compressed volume" if self.compressed else "one slice"
        check_decode_size(name, (ny, nx), shape, self.voxel_bytes, max_pixels, what)

    def world_to_voxel(self, point: tuple[float, float, float]) -> np.ndarray:
        d = np.asarray(self.direction, float).reshape(3, 3)
        m = d @ np.diag(self.spacing)
        return np.linalg.solve(m, np.asarray(point, float) - np.asarray(self.origin, float))


def parse_mhd(text: str, name: str) -> Header:
    kv = {}
    for line in text.splitlines():
        if "=" in line:
            k, _, v = line.partition("=")
            kv[k.strip()] = v.strip()
    try:
        size = tuple(int(x) for x in kv["DimSize"].split())
        spacing = tuple(float(x) for x in kv.get("ElementSpacing", "1 1 1").split())
        origin_s = kv.get("Offset") or kv.get("Origin") or kv.get("Position") or "0 0 0"
        origin = tuple(float(x) for x in origin_s.split())
        dir_s = kv.get("TransformMatrix") or kv.get("Orientation") or "1 0 0 0 1 0 0 0 1"
        direction = tuple(float(x) for x in dir_s.split())
        data_file = kv["ElementDataFile"]
        channels = int(kv.get("ElementNumberOfChannels", "1"))
        voxel_bytes = _ELEMENT_BYTES[kv.get("ElementType", "MET_SHORT").upper()] * channels
        compressed = kv.get("CompressedData", "False").lower() == "true"
    except (KeyError, ValueError) as e:
        raise Rejected("unreadable", f"{name} is not a valid 3-D MetaImage header ({e})") from None
    if len(size) != 3 or len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
        raise Rejected("unreadable", f"{name}: expected a 3-D volume, got DimSize {size}")
    if min(size) < 1 or channels < 1:
        raise Rejected("unreadable", f"{name}: DimSize {size} has an empty axis")
    return Header(size, spacing, origin, direction, data_file, voxel_bytes, compressed)  # type: ignore[arg-type]


def slices_for(header: Header, nodules: list[tuple[float, float, float, float]]) -> dict[int, list]:
    """Axial slice index -> ellipses ``(cx, cy, rx, ry)`` in voxels to fill on that slice."""
    sx, sy, sz = header.spacing
    out: dict[int, list] = {}
    for x, y, z, diameter in nodules:
        cx, cy, cz = header.world_to_voxel((x, y, z))
        r = diameter / 2
        span = r / sz
        ks = range(math.ceil(cz - span), math.floor(cz + span) + 1)
        if not ks:  # a nodule thinner than a slice still gets its nearest slice
            ks = range(round(cz), round(cz) + 1)
        for k in ks:
            if not 0 <= k < header.size[2]:
                continue
            rk = math.sqrt(max(r * r - ((k - cz) * sz) ** 2, 0.0)) or r / 2
            out.setdefault(k, []).append((float(cx), float(cy), rk / sx, rk / sy))
    return out


@register("luna")
def discover_luna(listing: Listing) -> Discovery:
    cfg, source, files = listing.cfg, listing.source, listing.files
    ann_store, ann_rel = _annotations_location(cfg, source, files)
    ann_fp = ""
    try:
        ann_text = ann_store.read_bytes(ann_rel).decode("utf-8-sig")
    except Exception as e:
        from segflow.errors import InputError

        raise InputError(
            f"luna layout needs an annotations CSV; could not read {ann_store.uri(ann_rel)} ({e})."
            " Pass --annotations URL."
        ) from None
    nodules, rejected = _read_annotations(ann_text, ann_rel)
    by_rel = {f.rel: f for f in files}
    rows: list[RowSpec] = []
    seen = set()
    ignored = 0
    for f in files:
        stem, ext = stem_ext(f.rel)
        if ext != ".mhd":
            continue
        seen.add(stem)
        if stem not in nodules:
            ignored += 1  # a series without nodules yields no slices
            continue
        try:
            header = parse_mhd(source.read_bytes(f.rel).decode("latin-1"), f.rel)
            header.check_size(f.rel, cfg.max_pixels)
        except Rejected as r:
            rejected.append(Skip(f.rel, r.reason, r.detail, f.fingerprint))
            continue
        raw_rel = posixpath.join(posixpath.dirname(f.rel), header.data_file)
        raw = by_rel.get(raw_rel)
        if raw is None:
            rejected.append(
                Skip(f.rel, "unreadable", f"data file {raw_rel} is missing", f.fingerprint)
            )
            continue
        ann_fp = sha256_json(nodules[stem])[:16]
        fp = f"{f.fingerprint}|{raw.fingerprint}|ann:{ann_fp}"
        for k, ellipses in sorted(slices_for(header, nodules[stem]).items()):
            extra = {"z": k, "ellipses": ellipses, "raw": raw_rel}
            rows.append(RowSpec(f"{stem}_z{k:04d}", stem, stem, f.rel, None, fp, extra))
    for uid in sorted(set(nodules) - seen):
        rejected.append(Skip(f"{ann_rel}#{uid}", "missing_volume", f"no {uid}.mhd in the source"))
    return Discovery(rows, rejected, ignored)


def _annotations_location(cfg: IngestConfig, source: Store, files: list[FileInfo]):
    if cfg.annotations:
        parent, name = posixpath.split(cfg.annotations.rstrip("/"))
        return Store(parent, cfg.storage), name
    csvs = [f.rel for f in files if posixpath.basename(f.rel) == "annotations.csv"]
    return source, (csvs[0] if csvs else "annotations.csv")


def _read_annotations(text: str, name: str):
    nodules: dict[str, list[tuple[float, float, float, float]]] = {}
    rejected: list[Skip] = []
    reader = csv.DictReader(io.StringIO(text))
    needed = {"seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"}
    if not needed <= set(reader.fieldnames or []):
        from segflow.errors import InputError

        raise InputError(f"{name} must have columns {sorted(needed)}, found {reader.fieldnames}")
    for i, row in enumerate(reader, start=2):
        try:
            n = tuple(float(row[k]) for k in ("coordX", "coordY", "coordZ", "diameter_mm"))
            if n[3] <= 0:
                raise ValueError(f"diameter_mm must be > 0, got {n[3]}")
        except (TypeError, ValueError) as e:
            rejected.append(Skip(f"{name}:{i}", "unreadable", f"bad annotation row ({e})"))
            continue
        nodules.setdefault(row["seriesuid"].strip(), []).append(n)  # type: ignore[arg-type]
    return nodules, rejected


def read_slices(
    source: Store, mhd_rel: str, raw_rel: str, ks: list[int], max_pixels: int
) -> dict[int, np.ndarray]:
    """Read only the requested axial slices (ITK streams MetaImage), as HU int16 (y, x). The
    header is checked against the limit again here: it may have changed since discovery."""
    import SimpleITK as sitk

    header = parse_mhd(source.read_bytes(mhd_rel).decode("latin-1"), mhd_rel)
    header.check_size(mhd_rel, max_pixels)

    with tempfile.TemporaryDirectory() as tmp:
        if source.is_local:
            path = source.path(mhd_rel)
        else:  # ITK needs files: fetch header and data next to each other
            path = os.path.join(tmp, posixpath.basename(mhd_rel))
            source.fs.get(source.path(mhd_rel), path)
            source.fs.get(source.path(raw_rel), os.path.join(tmp, posixpath.basename(raw_rel)))
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
            nx, ny, _ = reader.GetSize()
            out = {}
            for k in ks:
                reader.SetExtractIndex([0, 0, k])
                reader.SetExtractSize([nx, ny, 0])
                out[k] = sitk.GetArrayFromImage(reader.Execute())
        except RuntimeError as e:
            raise Rejected("unreadable", f"{mhd_rel}: SimpleITK could not read it ({e})") from None
    return out


def window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.round(np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def draw_ellipses(shape: tuple[int, int], ellipses: list) -> np.ndarray:
    """Filled ellipses ``(cx, cy, rx, ry)`` (voxels) on a zero (h, w) mask. Each is evaluated
    on its own bounding box only, so a nodule costs its area, not the slice's."""
    mask = np.zeros(shape, np.uint8)
    h, w = shape
    for cx, cy, rx, ry in ellipses:
        y0, y1 = max(math.floor(cy - ry), 0), min(math.ceil(cy + ry) + 1, h)
        x0, x1 = max(math.floor(cx - rx), 0), min(math.ceil(cx + rx) + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = ((np.arange(y0, y1) - cy) / ry) ** 2
        xx = ((np.arange(x0, x1) - cx) / rx) ** 2
        mask[y0:y1, x0:x1] |= (yy[:, None] + xx[None, :] <= 1.0).astype(np.uint8)
    return mask
