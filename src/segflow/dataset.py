"""The dataset contract (docs/dataset.md) and its reader: a Zarr v3 group that every stage
after ingest reads. Every reader opens it through :func:`open_group` or :class:`Dataset`, so
the contract version is checked wherever a dataset is read.

Arrays (N = ``attrs["n"]``):

=================  ===============  ======  ==================================================
name               shape            dtype   meaning
=================  ===============  ======  ==================================================
images             (N, H, W, 3)     uint8   RGB; greyscale replicated; chunk = one image
masks              (N, H, W)        uint8   {0, 1}; chunk = one mask; absent if no mask at all
has_mask           (N,)             bool    whether row i has a mask
orig_size          (N, 2)           int32   (h, w) of the source, after EXIF orientation
pad_box            (N, 4)           int32   (top, left, bottom, right) of the content in H x W
orig_channels      (N,)             uint8   channels of the source file (1, 2, 3, 4)
ids                (N,)             str     image id (ISIC: ``ISIC_0000000``)
groups             (N,)             str     fold group (nerve subject, CT series); "" = none
sources            (N,)             str     URL of the image file
mask_sources       (N,)             str     URL of the mask file ("" if none or drawn)
content_hashes     (N,)             str     sha256 of the row's source bytes
fingerprints       (N,)             str     listing fingerprint (size+mtime / ETag), for resume
=================  ===============  ======  ==================================================

Attributes: ``contract`` (version), ``layout``, ``size`` [H, W], ``resize``, ``n``,
``segflow_version``, ``content_hash`` (of the sorted (id, content_hash) pairs and the geometry),
``mask_positive`` (the rule that made the masks binary).

The writer is :mod:`segflow.ingest.writer`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from segflow.errors import DatasetError
from segflow.storage import Store

CONTRACT_VERSION = 1
STR_ARRAYS = ("ids", "groups", "sources", "mask_sources", "content_hashes", "fingerprints")
INDEX_COLUMNS = (*STR_ARRAYS, "has_mask", "orig_size", "pad_box", "orig_channels")


def open_group(store: Store, mode: str = "r") -> zarr.Group:
    """The dataset's Zarr group, read-only, after checking that it follows this contract."""
    if mode != "r":
        raise ValueError(f"datasets are opened read-only here (mode 'r'), not {mode!r}")
    try:
        g = zarr.open_group(store.zarr_store(read_only=True), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise DatasetError(f"no segflow dataset at {store.url}; run `segflow ingest` first") from e
    check_contract(g, store.url)
    return g


def check_contract(g: zarr.Group, url: str) -> None:
    have = g.attrs.get("contract")
    if have != CONTRACT_VERSION:
        raise DatasetError(
            f"{url} has dataset contract {have!r}; this segflow reads contract "
            f"{CONTRACT_VERSION}. Re-ingest it with this version (`segflow ingest`) or read it "
            "with the segflow that wrote it"
        )


@dataclass
class Index:
    """The committed rows' metadata, as plain Python lists (index i = row i)."""

    columns: dict[str, list[Any]]

    @property
    def n(self) -> int:
        return len(self.columns["ids"])

    def row(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}


def read_index(g: zarr.Group, n: int | None = None) -> Index:
    """The first ``n`` rows of every index column (default: the committed ``attrs["n"]``)."""
    n = int(g.attrs.get("n", 0)) if n is None else n
    cols: dict[str, list[Any]] = {}
    for name in INDEX_COLUMNS:
        arr = g[name][:n] if n else np.empty((0,))
        cols[name] = [x.tolist() if isinstance(x, np.ndarray) else _py(x) for x in arr]
    return Index(cols)


def content_hash(attrs: dict[str, Any], index: Index) -> str:
    """sha256 over the geometry and the sorted ``(id, content_hash)`` pairs."""
    h = hashlib.sha256()
    h.update(repr((attrs.get("size"), attrs.get("resize"), attrs.get("layout"))).encode())
    for i, c in sorted(zip(index.columns["ids"], index.columns["content_hashes"], strict=True)):
        h.update(f"{i}\0{c}\n".encode())
    return h.hexdigest()


def _py(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


class Dataset:
    """Read access for later stages: one image or mask reads one chunk, never the array."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.group = open_group(store)
        self.n = int(self.group.attrs["n"])
        self.size = tuple(self.group.attrs["size"])
        self.resize = self.group.attrs["resize"]

    @classmethod
    def open(cls, url: str, storage=None) -> Dataset:
        return cls(Store(url, storage))

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def column(self, name: str) -> np.ndarray:
        return self.group[name][: self.n]

    @property
    def ids(self) -> list[str]:
        return [str(x) for x in self.column("ids")]

    def image(self, i: int) -> np.ndarray:
        self._check(i)
        return self.group["images"][i]

    def mask(self, i: int) -> np.ndarray | None:
        self._check(i)
        if "masks" not in self.group or not bool(self.group["has_mask"][i]):
            return None
        return self.group["masks"][i]

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"row {i} is outside this dataset's {self.n} rows")
