"""The output folder of ``segflow predict``, as the later stages read it.

``segflow predict --out P`` writes the masks under ``P/masks/`` and its record
``P/predictions.json`` (last), which says how the masks are named (its ``layout``):

* ``isic``: ``<id>_segmentation.png``;
* ``folder``: ``<id>.png``.

``--predictions`` in ``crops``, ``evaluate`` and ``export-rle`` means that folder ``P``; its
``masks/`` folder and a plain folder of mask files are accepted too. With a record, the
masks' naming is the record's; otherwise ``--layout`` (default :data:`DEFAULT_LAYOUT`, the
same default as ``segflow predict``) says it. Files derived from the predictions (the
evaluation) are written into ``P``, beside ``masks/``.
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Literal

from segflow.errors import ConfigError
from segflow.imaging import IMAGE_SUFFIXES
from segflow.storage import StorageOptions, Store

log = logging.getLogger("segflow.predict")

RECORD = "predictions.json"
MASKS = "masks"
MaskLayout = Literal["isic", "folder"]
#: mask naming schemes: layout -> (prefix-free) suffix after the id
MASK_LAYOUTS: dict[str, str] = {"isic": "_segmentation.png", "folder": ".png"}
#: the layout every command assumes when nothing says otherwise (``segflow predict``'s default)
DEFAULT_LAYOUT: MaskLayout = "folder"
PREDICTIONS_HELP = (
    "the output folder of `segflow predict` (holding masks/ and predictions.json), its masks/ "
    "folder, or a folder of mask files named <id>.png (layout folder) or "
    "<id>_segmentation.png (layout isic)"
)
LAYOUT_HELP = (
    "naming of the masks: isic (<id>_segmentation.png) | folder (<id>.png); default: the "
    f"predict run's own record, else {DEFAULT_LAYOUT}"
)


def mask_layout(layout: str) -> MaskLayout:
    """The mask naming of a ``segflow predict`` layout: isic names ``_segmentation``, every
    other layout (folder, nerve) plain ``<id>.png``."""
    return "isic" if layout == "isic" else "folder"


def mask_name(image_id: str, layout: str) -> str:
    return f"{image_id}{MASK_LAYOUTS[mask_layout(layout)]}"


def mask_id(name: str, layout: str) -> str | None:
    """The id of a mask file name under ``layout``; ``None`` when the name does not follow it."""
    suffix = MASK_LAYOUTS[mask_layout(layout)]
    if not name.lower().endswith(suffix) or len(name) == len(suffix):
        return None
    return name[: -len(suffix)]


@dataclass(frozen=True)
class Predictions:
    """Where the masks of ``--predictions`` are and how they are named."""

    root: Store  # the predict output folder (or the plain folder of masks): derived files go here
    masks: str  # the masks' folder relative to root ("masks", or "" for a plain folder)
    layout: MaskLayout
    record: dict | None  # predictions.json, when the masks come from `segflow predict`

    @property
    def masks_store(self) -> Store:
        return Store(self.root.uri(self.masks), self.root.options) if self.masks else self.root


def open_predictions(
    url: str, storage: StorageOptions | None = None, layout: str | None = None
) -> Predictions:
    """Resolve ``--predictions``: a predict output folder, its ``masks/``, or a folder of
    masks. ``layout`` applies only where no predict record says the naming."""
    if layout is not None and layout not in MASK_LAYOUTS:
        raise ConfigError(
            f"unknown layout {layout!r} for predicted masks; allowed: {', '.join(MASK_LAYOUTS)}"
        )
    store = Store(url, storage)
    if store.exists(RECORD):
        return _from_record(store, MASKS, layout)
    parent = _parent(store)
    is_masks = posixpath.basename(url.rstrip("/")) == MASKS
    if is_masks and parent is not None and parent.exists(RECORD):
        return _from_record(parent, MASKS, layout)
    top = (f.rel for f in store.list() if "/" not in f.rel)
    if store.exists(MASKS) and not any(_is_image(rel) for rel in top):
        return Predictions(store, MASKS, _given(layout), None)  # a predict run without record
    return Predictions(store, "", _given(layout), None)


def _from_record(root: Store, masks: str, layout: str | None) -> Predictions:
    record = root.read_json(RECORD)
    # records before "layout" was written: the naming followed the config's layout
    recorded = record.get("layout") or mask_layout((record.get("config") or {}).get("layout", ""))
    if layout is not None and layout != recorded:
        log.warning(
            "the masks at %s are named as their `segflow predict` run says (layout %s); "
            "--layout %s does not rename them",
            root.uri(masks),
            recorded,
            layout,
        )
    return Predictions(root, masks, mask_layout(recorded), record)


def _given(layout: str | None) -> MaskLayout:
    return mask_layout(layout or DEFAULT_LAYOUT)


def _is_image(rel: str) -> bool:
    return posixpath.splitext(rel)[1].lower() in IMAGE_SUFFIXES


def _parent(store: Store) -> Store | None:
    url = store.url.rstrip("/")
    if "/" not in url.split("://", 1)[-1]:
        return None
    return Store(url.rsplit("/", 1)[0], store.options)


def template_pattern(template: str) -> re.Pattern[str]:
    """A regex matching the file names of ``template`` (e.g. ``{stem}_lesion.bmp``), with the
    id in group ``id``; ``{stem}`` and ``{id}`` both stand for the id."""
    parts = re.split(r"(\{stem\}|\{id\})", template)
    literal = "".join(parts[0::2])
    if len(parts) != 3 or "{" in literal or "}" in literal:
        raise ConfigError(
            f"mask template {template!r} must hold {{stem}} exactly once and no other field, "
            "e.g. '{stem}_lesion.bmp'"
        )
    before, after = re.escape(parts[0]), re.escape(parts[2])
    return re.compile(f"^{before}(?P<id>.+?){after}$", re.IGNORECASE)
