"""The writing side of the dataset contract (:mod:`segflow.dataset`): creating the arrays,
encoding one row's chunk, copying a row, and committing the index.

Writers: each image/mask chunk is written by exactly one task; the 1-D arrays and the attrs
only by the driver, when a run commits. Rows [0, n) are committed; anything past ``n`` in
``images``/``masks`` belongs to an unfinished run and is not part of the dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec, ZstdCodec

from segflow import __version__
from segflow.dataset import (
    CONTRACT_VERSION,
    INDEX_COLUMNS,
    STR_ARRAYS,
    Index,
    check_contract,
    content_hash,
)
from segflow.errors import DatasetError
from segflow.ingest.crash import crash_point
from segflow.storage import Store

_IMAGE_CODEC = [ZstdCodec(level=1)]
_MASK_CODEC = [ZstdCodec(level=3)]  # binary masks shrink ~100x whatever the level
# chunk keys "c.<row>.0.0.0": one folder per array instead of three new folders per row, which
# cost more than the row's compression on a local disk
_FLAT_KEYS = {"name": "default", "separator": "."}
# Rows per chunk of the 1-D arrays. zarr encodes a whole chunk even when few of its rows are
# set, and a string chunk of 65536 cost ~19 ms per column to write for a 32-image dataset.
INDEX_CHUNK = 4096
_INDEX_SPECS: dict[str, tuple[tuple[int, ...], Any]] = {
    "has_mask": ((), "bool"),
    "orig_size": ((2,), "int32"),
    "pad_box": ((4,), "int32"),
    "orig_channels": ((), "uint8"),
} | {name: ((), str) for name in STR_ARRAYS}
# what a run must match to append to an existing dataset; mask_positive is absent from
# datasets made before the option existed, which then take the run's rule
_GEOMETRY = ("size", "resize", "layout", "mask_positive")


def create_or_check(store: Store, want: dict[str, Any]) -> zarr.Group:
    """Open the dataset for appending, creating it if absent. ``want``: the run's ``size``,
    ``resize``, ``layout`` and ``mask_positive``, which an existing dataset must share:
    appending 384x512 letterboxed rows to a 256x256 stretched dataset would silently mix two
    datasets."""
    g = zarr.open_group(store.zarr_store(), mode="a")
    want = {**want, "size": list(want["size"])}
    if "images" in g:
        check_contract(g, store.url)
        have = {k: g.attrs.get(k) for k in _GEOMETRY}
        if have.get("mask_positive") is None:
            have["mask_positive"] = want["mask_positive"]
        if have != want:
            diff = [k for k in _GEOMETRY if have[k] != want[k]]
            raise DatasetError(
                f"dataset {store.url} was built with "
                + " ".join(f"{k}={have[k]}" for k in diff)
                + ", but this run asks for "
                + " ".join(f"{k}={want[k]}" for k in diff)
                + "; use another --dataset URL or the same options"
            )
        if "mask_positive" not in g.attrs:
            g.attrs["mask_positive"] = want["mask_positive"]
        return g
    h, w = want["size"]
    # zstd level 1: within 15% of level 3's size on photos, at half the encode time
    g.create_array(
        "images",
        shape=(0, h, w, 3),
        chunks=(1, h, w, 3),
        dtype="uint8",
        compressors=_IMAGE_CODEC,
        chunk_key_encoding=_FLAT_KEYS,
    )

    def create(name: str) -> None:
        tail, dtype = _INDEX_SPECS[name]
        g.create_array(name, shape=(0, *tail), chunks=(INDEX_CHUNK, *tail), dtype=dtype)

    with ThreadPoolExecutor(len(_INDEX_SPECS)) as pool:
        list(pool.map(create, _INDEX_SPECS))
    g.attrs.update({**want, "contract": CONTRACT_VERSION, "n": 0, "segflow_version": __version__})
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


def trim_pixels(g: zarr.Group, n: int) -> None:
    """Cut the pixel arrays back to the ``n`` committed rows, which deletes every chunk past
    them: a new plan must never find a chunk left by a plan that was given up."""
    for name in ("images", "masks"):
        if name in g and g[name].shape[0] != n:
            g[name].resize((n, *g[name].shape[1:]))


RowEncoder = Callable[[int, np.ndarray], tuple[str, bytes]]


def _one_row_chunks(arr: zarr.Array) -> bool:
    """Each chunk is one whole row and its bytes do not depend on where it lies (no sharding)."""
    codecs = getattr(arr.metadata, "codecs", ())
    return (
        arr.metadata.zarr_format == 3
        and tuple(arr.chunks) == (1, *arr.shape[1:])
        and bool(codecs)
        and isinstance(codecs[0], BytesCodec)
    )


def _chunk_key(arr: zarr.Array, i: int) -> str:
    return f"{arr.path}/{arr.metadata.encode_chunk_key((i, *(0,) * (arr.ndim - 1)))}"


def row_encoder(arr: zarr.Array) -> RowEncoder | None:
    """``encode(i, row) -> (key, bytes)``: row ``i``'s chunk, byte for byte as zarr would
    store it, under its key relative to the dataset root. For the layout this module creates
    (uint8, one row per chunk, bytes + zstd, no sharding), where it spares ingest workers
    zarr's per-chunk overhead (~4 ms, as much as the compression); ``None`` for any other
    layout, which is then written through zarr. Each row is still its chunk's only writer."""
    codecs = getattr(arr.metadata, "codecs", ())
    plain = (
        _one_row_chunks(arr)
        and arr.dtype == np.uint8
        and len(codecs) == 2
        and isinstance(codecs[1], ZstdCodec)
    )
    if not plain:
        return None
    zstd = Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
    row_shape = tuple(arr.shape[1:])

    def encode(i: int, row: np.ndarray) -> tuple[str, bytes]:
        if not 0 <= i < arr.shape[0]:
            raise IndexError(f"row {i} is outside {arr.path}'s {arr.shape[0]} rows")
        if row.shape != row_shape or row.dtype != np.uint8:
            raise ValueError(f"row of {row.dtype} {row.shape} for {arr.path} of uint8 {row_shape}")
        return _chunk_key(arr, i), zstd.encode(np.ascontiguousarray(row))

    return encode


def copy_rows(store: Store, g: zarr.Group, moves: list[tuple[int, int]]) -> None:
    """Copy pixel rows ``src -> dst`` (images and masks). Where a chunk is one row, its stored
    bytes are copied as they are (no decode or re-encode), and a missing source chunk (a row
    that reads as zeros) removes the destination's. Sources and destinations must be disjoint,
    so that doing the copies twice gives the same result (a resumed commit does)."""
    if not moves:
        return
    for name in ("images", "masks"):
        if name not in g:
            continue
        arr = g[name]
        if not _one_row_chunks(arr):
            for src, dst in moves:
                arr[dst] = arr[src]
            continue

        def copy(move: tuple[int, int], arr: zarr.Array = arr) -> None:
            src, dst = (_chunk_key(arr, i) for i in move)
            if store.exists(src):
                store.write_bytes(dst, store.read_bytes(src), durable=False)
            else:
                store.delete(dst)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(copy, moves))


def write_index(g: zarr.Group, index: Index) -> None:
    """Commit ``index``: every 1-D array, the pixel arrays' length, then ``attrs["n"]``.

    ``fingerprints`` is written after the other columns, so a write cut short can never
    leave a row whose fingerprint says "unchanged" over stale metadata; the ingest journal
    (ingest/run.py) redoes the whole commit anyway when a run is cut short."""
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

    first = [c for c in INDEX_COLUMNS if c != "fingerprints"]
    with ThreadPoolExecutor(len(first)) as pool:  # each column has its own writer
        list(pool.map(write, first))
    crash_point("columns")
    write("fingerprints")
    crash_point("fingerprints")
    trim_pixels(g, n)
    attrs = dict(g.attrs)
    g.attrs.update(
        {"n": n, "segflow_version": __version__, "content_hash": content_hash(attrs, index)}
    )
