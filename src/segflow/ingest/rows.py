"""What discovery produces (rows to ingest, files skipped), and the registry of layouts.

Each layout module registers its discovery function with :func:`register`; the dispatcher in
:mod:`segflow.ingest.layouts` looks it up, so layout modules never import one another.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segflow.ingest.config import IngestConfig
    from segflow.storage import FileInfo, Store


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


@dataclass(frozen=True)
class Listing:
    """The input of a layout's discovery: the listed files of the source and of the masks
    location (the same list when masks sit beside the images)."""

    cfg: IngestConfig
    source: Store
    files: list[FileInfo]
    mask_files: list[FileInfo]
    separate_masks: bool


Discover = Callable[[Listing], Discovery]
_LAYOUTS: dict[str, Discover] = {}


def register(layout: str) -> Callable[[Discover], Discover]:
    def add(fn: Discover) -> Discover:
        _LAYOUTS[layout] = fn
        return fn

    return add


def discoverer(layout: str) -> Discover:
    try:
        return _LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"no discovery registered for layout {layout!r}") from None


def stem_ext(rel: str) -> tuple[str, str]:
    """File name without extension, and the extension in lower case."""
    stem, ext = posixpath.splitext(posixpath.basename(rel))
    return stem, ext.lower()
