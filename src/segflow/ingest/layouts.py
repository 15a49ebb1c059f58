"""Discovery: turn a source listing into the rows to ingest, per layout.

Discovery only lists and reads small text (CSV, .mhd headers); it never decodes pixels, so a
rerun on an unchanged source decides "nothing to do" in seconds.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

from segflow.errors import ConfigError
from segflow.imaging import IMAGE_SUFFIXES
from segflow.ingest import luna  # noqa: F401  (registers the luna layout)
from segflow.ingest.config import IngestConfig
from segflow.ingest.rows import Discovery, Listing, RowSpec, Skip, discoverer, register, stem_ext
from segflow.pairing import Pairing, find_pairs
from segflow.storage import FileInfo, Store, ref_uri

_ISIC_MASK = re.compile(r"^(?P<id>.+)_segmentation$", re.IGNORECASE)
_ISIC_SKIP = re.compile(r"_(superpixels|segmentation)$", re.IGNORECASE)
_NERVE_TRAIN = re.compile(r"^(?P<subject>\d+)_(?P<n>\d+)$")
_NERVE_MASK = re.compile(r"^(?P<id>\d+_\d+)_mask$")


def discover(cfg: IngestConfig, source: Store, masks: Store) -> Discovery:
    files = source.list()
    if not files:
        raise ConfigError(
            f"source {source.url!r} holds no files; check the --source URL (and credentials)"
        )
    separate = masks.url != source.url
    mask_files = masks.list() if separate else files
    d = discoverer(cfg.layout)(Listing(cfg, source, files, mask_files, separate))
    d = _drop_duplicates(d)
    d.rejected = [
        replace(s, source=ref_uri(masks if s.reason == "orphan_mask" else source, s.source))
        for s in d.rejected
    ]
    external = cfg.allow_external_links
    return _drop_bad_links(d, source, masks, files, mask_files, external)


def _drop_bad_links(
    d: Discovery,
    source: Store,
    masks: Store,
    files: list[FileInfo],
    mask_files: list[FileInfo],
    external: bool,
) -> Discovery:
    """Rows whose image, mask or data file is a refused link become ``unreadable`` rejections
    (their mask is not an orphan: it has an image, which cannot be read)."""
    bad = {("s", rel): why for rel, why in _bad_links(source, files, external).items()}
    if masks.url != source.url:
        bad |= {("m", rel): why for rel, why in _bad_links(masks, mask_files, external).items()}
    else:
        bad |= {("m", k[1]): why for k, why in bad.items()}
    if not bad:
        return d
    rows = []
    for r in d.rows:
        inputs = [("s", r.image), ("m", r.mask), ("s", r.extra.get("raw"))]
        hit = next((k for k in inputs if k in bad), None)
        if hit is None:
            rows.append(r)
            continue
        where = (source if hit[0] == "s" else masks).uri(hit[1])
        d.rejected.append(Skip(where, "unreadable", bad[hit], r.fingerprint))
    return Discovery(rows, _dedupe_skips(d.rejected), d.ignored)


def _bad_links(store: Store, files: list[FileInfo], external: bool) -> dict[str, str]:
    """Symbolic links of a local store that are refused, and why: one that points nowhere,
    and, unless ``external``, one that resolves outside the store, so that a source folder
    can never pull a file from elsewhere on the machine (a key, another user's data) into a
    dataset by default. Links inside the store are followed. Object stores have no links."""
    if not store.is_local:
        return {}
    root = os.path.realpath(store.root)
    bad = {}
    for f in files:
        path = store.path(f.rel)
        if not os.path.islink(path):
            continue
        target = os.path.realpath(path)
        if not os.path.exists(target):
            bad[f.rel] = f"dangling symbolic link to {os.readlink(path)} (no such file)"
        elif not external and os.path.commonpath([root, target]) != root:
            bad[f.rel] = (
                f"symbolic link to {target}, outside the source {root}; links out of the "
                "source are refused unless allowed (--allow-external-links), or copy the file "
                "in, or use the folder that holds it as the source"
            )
    return bad


def _dedupe_skips(skips: list[Skip]) -> list[Skip]:
    seen: set[tuple[str, str]] = set()
    out = []
    for s in skips:
        if (s.source, s.reason) not in seen:
            seen.add((s.source, s.reason))
            out.append(s)
    return out


# -- isic -----------------------------------------------------------------------------------------
@register("isic")
def _discover_isic(listing: Listing) -> Discovery:
    cfg, files, mask_files = listing.cfg, listing.files, listing.mask_files
    masks: dict[str, FileInfo] = {}
    for f in mask_files:
        stem, ext = stem_ext(f.rel)
        m = _ISIC_MASK.match(stem)
        if m and ext in IMAGE_SUFFIXES:
            masks.setdefault(m["id"], f)
    images, ignored = [], 0
    for f in files:
        stem, ext = stem_ext(f.rel)
        if ext not in IMAGE_SUFFIXES or _ISIC_SKIP.search(stem):
            ignored += 0 if _ISIC_MASK.match(stem) else 1
            continue
        if not stem.upper().startswith("ISIC_"):
            ignored += 1
            continue
        images.append((stem, f))
    require = (
        cfg.require_masks
        if cfg.require_masks is not None
        else (bool(masks) or listing.separate_masks)
    )
    return _pair(images, masks, require, ignored, group_of=lambda _id: "")


# -- nerve ----------------------------------------------------------------------------------------
@register("nerve")
def _discover_nerve(listing: Listing) -> Discovery:
    cfg = listing.cfg
    masks: dict[str, FileInfo] = {}
    images, rejected, ignored = [], [], 0
    for f in listing.files:
        stem, ext = stem_ext(f.rel)
        if ext not in (".tif", ".tiff"):
            ignored += 1
        elif m := _NERVE_MASK.match(stem):
            if (first := masks.setdefault(m["id"], f)) is not f:  # x_mask.tif and x_mask.tiff
                why = f"mask of {m['id']} is also {first.rel}"
                rejected.append(Skip(f.rel, "duplicate_id", why, f.fingerprint))
        elif _NERVE_TRAIN.match(stem) or stem.isdigit():
            images.append((stem, f))
        else:
            ignored += 1
    rows, paired = [], set()
    for stem, f in images:
        train = _NERVE_TRAIN.match(stem)
        group = train["subject"] if train else ""
        mask = masks.get(stem)  # x.tif and x.tiff both find it: _drop_duplicates keeps one
        # Test images (<n>.tif) never have masks; train images (<subject>_<n>) must.
        require = cfg.require_masks if cfg.require_masks is not None else bool(train)
        if mask is None and require:
            rejected.append(Skip(f.rel, "missing_mask", f"no {stem}_mask.tif", f.fingerprint))
            continue
        paired.add(stem)
        rows.append(_row(stem, group, f, mask))
    rejected += [
        Skip(m.rel, "orphan_mask", f"no image {i}.tif", m.fingerprint)
        for i, m in masks.items()
        if i not in paired
    ]
    return Discovery(rows, rejected, ignored)


# -- folder ---------------------------------------------------------------------------------------
@register("folder")
def _discover_folder(listing: Listing) -> Discovery:
    """Images and masks paired by name (glob, regex pattern, template) or by a pairs CSV: one
    implementation with predict and evaluate (:mod:`segflow.pairing`)."""
    cfg, separate = listing.cfg, listing.separate_masks
    spec = Pairing(cfg.image_glob, cfg.image_pattern, cfg.mask_template, cfg.pairs)
    mask_store = Store(cfg.masks, cfg.storage) if separate and cfg.masks else listing.source
    found = find_pairs(spec, listing.source, listing.files, mask_store, listing.mask_files)
    by_rel = {f.rel: f for f in listing.mask_files}
    images = [(c.id, c.image) for c in found.candidates]
    masks = {c.id: by_rel[c.mask] for c in found.candidates if c.mask in by_rel}
    groups = {c.id: c.group for c in found.candidates}
    require = cfg.require_masks if cfg.require_masks is not None else bool(masks) or separate
    d = _pair(images, masks, require, 0, group_of=lambda i: groups.get(i, ""))
    # a group set by the pattern or the CSV is part of the row: a regrouping re-ingests it
    d.rows = [
        replace(r, fingerprint=f"{r.fingerprint}|group={r.group}") if r.group else r for r in d.rows
    ]
    d.rejected += [Skip(x.file, x.reason, x.detail) for x in found.dropped]
    if separate and not cfg.pairs:  # a CSV names its masks: the others are not orphans
        used = {m.rel for m in masks.values()}
        d.rejected += [
            Skip(f.rel, "orphan_mask", "no image uses this mask", f.fingerprint)
            for f in listing.mask_files
            if f.rel not in used and stem_ext(f.rel)[1] in IMAGE_SUFFIXES
        ]
    return d


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
