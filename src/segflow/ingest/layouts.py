"""Discovery: turn a source listing into the rows to ingest, per layout.

Discovery only lists and reads small text (CSV, .mhd headers); it never decodes pixels, so a
rerun on an unchanged source decides "nothing to do" in seconds.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field, replace
from typing import Any

from segflow.errors import ConfigError
from segflow.imaging import IMAGE_SUFFIXES
from segflow.ingest.config import IngestConfig
from segflow.storage import FileInfo, Store

_ISIC_MASK = re.compile(r"^(?P<id>.+)_segmentation$", re.IGNORECASE)
_ISIC_SKIP = re.compile(r"_(superpixels|segmentation)$", re.IGNORECASE)
_NERVE_TRAIN = re.compile(r"^(?P<subject>\d+)_(?P<n>\d+)$")
_NERVE_MASK = re.compile(r"^(?P<id>\d+_\d+)_mask$")


@dataclass(frozen=True)
class RowSpec:
    """One output row of the dataset, before its pixels are decoded."""

    id: str
    group: str
    unit: str  # rows of one unit are decoded together (a CT series); else the row's own id
    image: str  # path relative to the source store
    mask: str | None  # path relative to the masks store; None: no mask file
    fingerprint: str  # changes whenever any input of this row may have changed
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Skip:
    """A file that is not ingested, and why (a reason from imaging.REASONS)."""

    source: str
    reason: str
    detail: str
    fingerprint: str = ""


@dataclass
class Discovery:
    rows: list[RowSpec]
    rejected: list[Skip]
    ignored: int = 0  # files that are not part of the layout at all (README, superpixels...)


def discover(cfg: IngestConfig, source: Store, masks: Store) -> Discovery:
    files = source.list()
    if not files:
        raise ConfigError(
            f"source {source.url!r} holds no files; check the --source URL (and credentials)"
        )
    mask_files = files if masks.url == source.url else masks.list()
    if cfg.layout == "isic":
        d = _discover_isic(cfg, files, mask_files, masks.url != source.url)
    elif cfg.layout == "nerve":
        d = _discover_nerve(cfg, files)
    elif cfg.layout == "folder":
        d = _discover_folder(cfg, files, mask_files, masks.url != source.url)
    else:
        from segflow.ingest.luna import discover_luna

        d = discover_luna(cfg, source, files)
    d = _drop_duplicates(d)
    d.rejected = [
        replace(s, source=(masks if s.reason == "orphan_mask" else source).uri(s.source))
        for s in d.rejected
    ]
    return d


# -- isic -----------------------------------------------------------------------------------------
def _discover_isic(
    cfg: IngestConfig, files: list[FileInfo], mask_files: list[FileInfo], separate: bool
) -> Discovery:
    masks: dict[str, FileInfo] = {}
    for f in mask_files:
        stem, ext = _stem_ext(f.rel)
        m = _ISIC_MASK.match(stem)
        if m and ext in IMAGE_SUFFIXES:
            masks.setdefault(m["id"], f)
    images, ignored = [], 0
    for f in files:
        stem, ext = _stem_ext(f.rel)
        if ext not in IMAGE_SUFFIXES or _ISIC_SKIP.search(stem):
            ignored += 0 if _ISIC_MASK.match(stem) else 1
            continue
        if not stem.upper().startswith("ISIC_"):
            ignored += 1
            continue
        images.append((stem, f))
    require = cfg.require_masks if cfg.require_masks is not None else bool(masks) or separate
    return _pair(images, masks, require, ignored, group_of=lambda _id: "")


# -- nerve ----------------------------------------------------------------------------------------
def _discover_nerve(cfg: IngestConfig, files: list[FileInfo]) -> Discovery:
    masks: dict[str, FileInfo] = {}
    images, ignored = [], 0
    for f in files:
        stem, ext = _stem_ext(f.rel)
        if ext not in (".tif", ".tiff"):
            ignored += 1
        elif m := _NERVE_MASK.match(stem):
            masks.setdefault(m["id"], f)
        elif _NERVE_TRAIN.match(stem) or stem.isdigit():
            images.append((stem, f))
        else:
            ignored += 1
    rows, rejected = [], []
    for stem, f in images:
        train = _NERVE_TRAIN.match(stem)
        group = train["subject"] if train else ""
        mask = masks.pop(stem, None)
        # Test images (<n>.tif) never have masks; train images (<subject>_<n>) must.
        require = cfg.require_masks if cfg.require_masks is not None else bool(train)
        if mask is None and require:
            rejected.append(Skip(f.rel, "missing_mask", f"no {stem}_mask.tif", f.fingerprint))
            continue
        rows.append(_row(stem, group, f, mask))
    rejected += [
        Skip(m.rel, "orphan_mask", f"no image {i}.tif", m.fingerprint) for i, m in masks.items()
    ]
    return Discovery(rows, rejected, ignored)


# -- folder ---------------------------------------------------------------------------------------
def _discover_folder(
    cfg: IngestConfig, files: list[FileInfo], mask_files: list[FileInfo], separate: bool
) -> Discovery:
    import fnmatch

    by_rel = {f.rel: f for f in mask_files}
    candidates = [
        f
        for f in files
        if _stem_ext(f.rel)[1] in IMAGE_SUFFIXES and fnmatch.fnmatch(f.rel, cfg.image_glob)
    ]
    mask_of = {f.rel: _folder_mask_rel(cfg.mask_template, f.rel) for f in candidates}
    claimed = set(mask_of.values())
    if not separate:  # a mask that also matches the image glob is not an image
        candidates = [f for f in candidates if f.rel not in claimed]
    images = [(posixpath.splitext(f.rel)[0], f) for f in candidates]
    masks = {
        posixpath.splitext(f.rel)[0]: by_rel[mask_of[f.rel]]
        for f in candidates
        if mask_of[f.rel] in by_rel
    }
    require = cfg.require_masks if cfg.require_masks is not None else bool(masks) or separate
    d = _pair(images, masks, require, 0, group_of=lambda _id: "")
    if separate:
        used = {m.rel for m in masks.values()}
        d.rejected += [
            Skip(f.rel, "orphan_mask", "no image uses this mask", f.fingerprint)
            for f in mask_files
            if f.rel not in used and _stem_ext(f.rel)[1] in IMAGE_SUFFIXES
        ]
    return d


def _folder_mask_rel(template: str, rel: str) -> str:
    folder, name = posixpath.split(rel)
    stem, ext = posixpath.splitext(name)
    try:
        mask_name = template.format(stem=stem, name=name, ext=ext)
    except (KeyError, IndexError) as e:
        raise ConfigError(
            f"mask_template {template!r} uses an unknown field {e}; allowed: {{stem}}, {{name}}, "
            "{ext}"
        ) from None
    return posixpath.join(folder, mask_name)


# -- shared ---------------------------------------------------------------------------------------
def _pair(images, masks: dict[str, FileInfo], require: bool, ignored: int, group_of) -> Discovery:
    rows, rejected, used = [], [], set()
    for image_id, f in images:
        mask = masks.get(image_id)
        if mask is None and require:
            rejected.append(Skip(f.rel, "missing_mask", f"no mask for {image_id}", f.fingerprint))
            continue
        if mask is not None:
            used.add(image_id)
        rows.append(_row(image_id, group_of(image_id), f, mask))
    image_ids = {i for i, _ in images}
    rejected += [
        Skip(m.rel, "orphan_mask", f"no image with id {i}", m.fingerprint)
        for i, m in masks.items()
        if i not in image_ids
    ]
    return Discovery(rows, rejected, ignored)


def _row(image_id: str, group: str, image: FileInfo, mask: FileInfo | None) -> RowSpec:
    fp = image.fingerprint + ("|" + mask.fingerprint if mask else "")
    return RowSpec(image_id, group, image_id, image.rel, mask.rel if mask else None, fp)


def _drop_duplicates(d: Discovery) -> Discovery:
    seen: dict[str, RowSpec] = {}
    rows, rejected = [], list(d.rejected)
    for r in sorted(d.rows, key=lambda r: (r.id, r.image)):
        first = seen.get(r.id)
        if first is not None:
            rejected.append(
                Skip(r.image, "duplicate_id", f"id {r.id} is also {first.image}", r.fingerprint)
            )
            continue
        seen[r.id] = r
        rows.append(r)
    return Discovery(rows, rejected, d.ignored)


def _stem_ext(rel: str) -> tuple[str, str]:
    stem, ext = posixpath.splitext(posixpath.basename(rel))
    return stem, ext.lower()
