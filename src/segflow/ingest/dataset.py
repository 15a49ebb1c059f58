"""The dataset contract (docs/dataset.md): a Zarr v3 group that every later stage reads.

Arrays (N = ``attrs["n"]`` = len(ids)):

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
``segflow_version``, ``content_hash`` (of the sorted (id, content_hash) pairs and the geometry).

Writers: each image/mask chunk is written by exactly one task; the 1-D arrays and the attrs
are written only by the driver, at the end of a run. Rows [0, n) are committed; anything past
``n`` in ``images``/``masks`` belongs to an unfinished run and is not part of the dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec, ZstdCodec

from segflow import __version__
from segflow.errors import DatasetError
from segflow.storage import Store

CONTRACT_VERSION = 1
_IMAGE_CODEC = [ZstdCodec(level=1)]
_MASK_CODEC = [ZstdCodec(level=3)]  # binary masks shrink ~100x whatever the level
# chunk keys "c.<row>.0.0.0": one folder per array instead of three new folders per row, which
# cost more than the row's compression on a local disk
_FLAT_KEYS = {"name": "default", "separator": "."}
STR_ARRAYS = ("ids", "groups", "sources", "mask_sources", "content_hashes", "fingerprints")
# Rows per chunk of the 1-D arrays. zarr encodes a whole chunk even when few of its rows are
# set, and a string chunk of 65536 cost ~19 ms per column to write for a 32-image dataset.
INDEX_CHUNK = 4096


def open_group(store: Store, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(store.zarr_store(read_only=mode == "r"), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise DatasetError(f"no segflow dataset at {store.url}; run `segflow ingest` first") from e


def create_or_check(store: Store, size: tuple[int, int], resize: str, layout: str) -> zarr.Group:
    """Open the dataset for appending, creating it if absent. The geometry of an existing
    dataset can't change: appending 384x512 letterboxed rows to a 256x256 stretched dataset
    would silently mix two datasets."""
    g = zarr.open_group(store.zarr_store(), mode="a")
    if "images" in g:
        have = (tuple(g.attrs.get("size", ())), g.attrs.get("resize"), g.attrs.get("layout"))
        if have != (tuple(size), resize, layout):
            raise DatasetError(
                f"dataset {store.url} was built with size={list(have[0])} resize={have[1]} "
                f"layout={have[2]}, but this run asks for size={list(size)} resize={resize} "
                f"layout={layout}; use another --dataset URL or the same options"
            )
        return g
    h, w = size
    # zstd level 1: within 15% of level 3's size on photos, at half the encode time
    g.create_array(
        "images", shape=(0, h, w, 3), chunks=(1, h, w, 3), dtype="uint8",
        compressors=_IMAGE_CODEC, chunk_key_encoding=_FLAT_KEYS,
    )  # fmt: skip
    specs = {
        "has_mask": ((0,), (INDEX_CHUNK,), "bool"),
        "orig_size": ((0, 2), (INDEX_CHUNK, 2), "int32"),
        "pad_box": ((0, 4), (INDEX_CHUNK, 4), "int32"),
        "orig_channels": ((0,), (INDEX_CHUNK,), "uint8"),
    } | {name: ((0,), (INDEX_CHUNK,), str) for name in STR_ARRAYS}
    with ThreadPoolExecutor(len(specs)) as pool:
        list(pool.map(lambda kv: g.create_array(kv[0], shape=kv[1][0], chunks=kv[1][1],
                                                dtype=kv[1][2]), specs.items()))  # fmt: skip
    g.attrs.update(
        {
            "contract": CONTRACT_VERSION,
            "layout": layout,
            "size": [h, w],
            "resize": resize,
            "n": 0,
            "segflow_version": __version__,
        }
    )
    return g


def ensure_capacity(g: zarr.Group, n: int, with_masks: bool) -> None:
    """Grow the pixel arrays to at least ``n`` rows (a metadata-only change)."""
    images = g["images"]
    _, h, w, _ = images.shape
    if with_masks and "masks" not in g:
        g.create_array(
            "masks",
            shape=images.shape[:3],
            chunks=(1, h, w),
            dtype="uint8",
            compressors=_MASK_CODEC,
            chunk_key_encoding=_FLAT_KEYS,
        )
    for name in ("images", "masks"):
        if name in g and g[name].shape[0] < n:
            g[name].resize((n, *g[name].shape[1:]))


RowEncoder = Callable[[int, np.ndarray], tuple[str, bytes]]


def row_encoder(arr: zarr.Array) -> RowEncoder | None:
    """``encode(i, row) -> (key, bytes)``: row ``i``'s chunk, byte for byte as zarr would
    store it, under its key relative to the dataset root. For the layout this module creates
    (uint8, one row per chunk, bytes + zstd, no sharding), where it spares ingest workers
    zarr's per-chunk overhead (~4 ms, as much as the compression); ``None`` for any other
    layout, which is then written through zarr. Each row is still its chunk's only writer."""
    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    plain = (
        arr.metadata.zarr_format == 3
        and arr.dtype == np.uint8
        and tuple(arr.chunks) == (1, *arr.shape[1:])
        and len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and isinstance(codecs[1], ZstdCodec)
    )
    if not plain:
        return None
    zstd = Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
    row_shape, rest = tuple(arr.shape[1:]), (0,) * (arr.ndim - 1)

    def encode(i: int, row: np.ndarray) -> tuple[str, bytes]:
        if not 0 <= i < arr.shape[0]:
            raise IndexError(f"row {i} is outside {arr.path}'s {arr.shape[0]} rows")
        if row.shape != row_shape or row.dtype != np.uint8:
            raise ValueError(f"row of {row.dtype} {row.shape} for {arr.path} of uint8 {row_shape}")
        return f"{arr.path}/{meta.encode_chunk_key((i, *rest))}", zstd.encode(
            np.ascontiguousarray(row)
        )

    return encode


@dataclass
class Index:
    """The committed rows' metadata, as plain Python lists (index i = row i)."""

    columns: dict[str, list[Any]]

    @property
    def n(self) -> int:
        return len(self.columns["ids"])

    def truncate(self, n: int) -> Index:
        return Index({k: v[:n] for k, v in self.columns.items()})

    def row(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}


INDEX_COLUMNS = (*STR_ARRAYS, "has_mask", "orig_size", "pad_box", "orig_channels")


def read_index(g: zarr.Group) -> Index:
    n = int(g.attrs.get("n", 0))
    cols: dict[str, list[Any]] = {}
    for name in INDEX_COLUMNS:
        arr = g[name][:n] if n else np.empty((0,))
        cols[name] = [x.tolist() if isinstance(x, np.ndarray) else _py(x) for x in arr]
    return Index(cols)


def write_index(g: zarr.Group, index: Index) -> None:
    """Rewrite every 1-D array from ``index`` (driver only) and shrink the pixel arrays."""
    n = index.n

    def write(name: str) -> None:
        arr = g[name]
        values = index.columns[name]
        if name in STR_ARRAYS:
            data = np.array(values, dtype=np.dtypes.StringDType()) if n else None
        else:
            data = np.asarray(values, dtype=arr.dtype).reshape((n, *arr.shape[1:]))
        arr.resize((n, *arr.shape[1:]))
        if n:
            arr[:] = data

    with ThreadPoolExecutor(len(INDEX_COLUMNS)) as pool:  # each column has its own writer
        list(pool.map(write, INDEX_COLUMNS))
    for name in ("images", "masks"):
        if name in g and g[name].shape[0] != n:
            g[name].resize((n, *g[name].shape[1:]))
    g.attrs.update({"n": n, "segflow_version": __version__, "content_hash": content_hash(g, index)})


def content_hash(g: zarr.Group, index: Index) -> str:
    h = hashlib.sha256()
    h.update(repr((g.attrs.get("size"), g.attrs.get("resize"), g.attrs.get("layout"))).encode())
    for i, c in sorted(zip(index.columns["ids"], index.columns["content_hashes"], strict=True)):
        h.update(f"{i}\0{c}\n".encode())
    return h.hexdigest()


def _py(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


class Dataset:
    """Read access for later stages: one image or mask reads one chunk, never the array."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.group = open_group(store, "r")
        if self.group.attrs.get("contract") != CONTRACT_VERSION:
            raise DatasetError(
                f"{store.url} has dataset contract {self.group.attrs.get('contract')!r}; this "
                f"segflow reads contract {CONTRACT_VERSION}"
            )
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
