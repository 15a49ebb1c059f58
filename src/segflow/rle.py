"""Run-length encoding of binary masks in the Kaggle format, and the submission CSV.

Kaggle's format (Ultrasound Nerve Segmentation and most segmentation contests since): pixels
are numbered 1..H*W down the columns first (column-major, Fortran order) and a mask is written
as ``"start length start length ..."``, runs sorted and non-overlapping; an empty mask is ``""``.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from segflow.errors import InputError, SegflowError
from segflow.geometry import place
from segflow.imaging import Rejected, decode_mask, mask_to_frame
from segflow.storage import StorageOptions, Store, split_url

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit


def rle_encode(mask: np.ndarray) -> str:
    """(H, W) mask -> Kaggle RLE. Any nonzero pixel is foreground."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D (H, W) mask, got shape {arr.shape}")
    flat = (arr.ravel(order="F") != 0).view(np.int8)
    # Padding with a background pixel at both ends makes every run start and end on a change.
    padded = np.concatenate(([0], flat, [0]))
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-indexed run starts and run ends+1
    edges[1::2] -= edges[::2]  # ends -> lengths
    return " ".join(map(str, edges.tolist()))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Kaggle RLE -> (H, W) uint8 {0, 1}. Malformed strings raise ``ValueError`` saying what
    is wrong and where, never a silently wrong mask."""
    h, w = _check_shape(shape)
    total = h * w
    starts, lengths = _parse_runs(rle, total, (h, w))
    ends = starts + lengths - 1  # 1-indexed, inclusive
    # +1 at each run's first pixel, -1 just after its last: the running sum is the mask.
    delta = np.bincount(starts - 1, minlength=total + 1) - np.bincount(ends, minlength=total + 1)
    flat = np.cumsum(delta[:total]).astype(np.uint8)
    return flat.reshape((h, w), order="F")


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (height, width), got {shape!r}") from None
    if h < 0 or w < 0:
        raise ValueError(f"shape must be non-negative, got {shape!r}")
    return h, w


def _parse_runs(rle: str, total: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validated (starts, lengths) as int64 arrays; the loops run over tokens, not pixels."""
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    for i, tok in enumerate(tokens):
        if not (tok.isascii() and tok.isdigit()):
            raise ValueError(f"RLE value {i + 1} ({tok!r}) is not a non-negative integer")
    if len(tokens) % 2:
        raise ValueError(
            f"RLE has an odd number of values ({len(tokens)}); expected 'start length' pairs"
        )
    # Values beyond total+1 are clipped only for int64 safety: they fail the range check below.
    values = np.array([min(int(t), total + 1) for t in tokens], dtype=np.int64)
    starts, lengths = values[0::2], values[1::2]
    _check_runs(starts, lengths, tokens, total, hw)
    return starts, lengths


def _check_runs(
    starts: np.ndarray, lengths: np.ndarray, tokens: list[str], total: int, hw: tuple[int, int]
) -> None:
    def run(k: int) -> str:
        return f"run {k + 1} (start {tokens[2 * k]}, length {tokens[2 * k + 1]})"

    if (bad := np.flatnonzero(starts < 1)).size:
        raise ValueError(f"RLE {run(bad[0])}: starts are 1-indexed, 0 is not a pixel")
    if (bad := np.flatnonzero(lengths < 1)).size:
        raise ValueError(f"RLE {run(bad[0])}: a run must be at least 1 pixel long")
    ends = starts + lengths - 1
    if (bad := np.flatnonzero(ends > total)).size:
        raise ValueError(
            f"RLE {run(bad[0])} runs past the end of a {hw[0]}x{hw[1]} mask ({total} pixels)"
        )
    if (bad := np.flatnonzero(starts[1:] <= ends[:-1])).size:
        k = int(bad[0]) + 1
        raise ValueError(
            f"RLE {run(k)} starts at or before the end of {run(k - 1)}: runs must be sorted "
            "and must not overlap"
        )


# -- submission CSV ------------------------------------------------------------------------------
def export_rle(
    predictions: str,
    out: str,
    storage: StorageOptions | None = None,
    layout: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
) -> dict:
    """Write a Kaggle submission CSV (``img,pixels``) with one row per predicted mask.

    ``predictions`` is the output folder of ``segflow predict`` (its masks are named as its
    record says), its ``masks/``, or a folder of masks named by ``layout`` (default folder).
    ``img`` is the mask's id (folder layout: the file name without its suffix, "1" for 1.png;
    isic: without "_segmentation" too), rows sorted numerically when every id is an integer.
    A mask that cannot be read fails the export: a submission missing a row is worthless.
    Returns ``{"out": url, "n": rows, "empty": rows with an empty mask}``."""
    from segflow.evaluate import list_masks, sort_ids
    from segflow.predict.outputs import open_predictions

    preds = open_predictions(predictions, storage, layout)
    store = preds.masks_store
    files = list_masks(store, preds.layout)
    if not files:
        raise InputError(
            f"no predicted masks at {store.url!r} for layout {preds.layout!r}; check "
            "--predictions and --layout"
        )
    ids = sort_ids(files)
    with ThreadPoolExecutor(workers or min(32, (os.cpu_count() or 1) * 2)) as pool:
        # map keeps the order; each thread holds one decoded mask at a time.
        results = list(pool.map(lambda i: _encode_file(store, files[i], max_pixels), ids))
    bad = [f"{store.uri(files[i])}: {err}" for i, (_, err) in zip(ids, results, strict=True) if err]
    if bad:
        raise InputError(f"{len(bad)} predicted mask(s) cannot be read: " + "; ".join(bad[:5]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["img", "pixels"])
    writer.writerows((i, rle) for i, (rle, _) in zip(ids, results, strict=True))
    target, name = _parent_store(out, storage)
    url = target.write_bytes(name, buf.getvalue().encode())
    return {"out": url, "n": len(ids), "empty": sum(1 for rle, _ in results if not rle)}


def _encode_file(store: Store, rel: str, max_pixels: int) -> tuple[str, str]:
    """(rle, "") or ("", error message)."""
    try:
        data = store.read_bytes(rel)
    except (SegflowError, OSError) as e:  # collected, so all bad files are named
        return "", str(e) or type(e).__name__
    try:
        mask, quirks = decode_mask(data, rel, max_pixels)
    except Rejected as e:
        return "", str(e)
    except Exception as e:  # whatever a decoder raises on a bad file: named, like the others
        return "", f"cannot be decoded ({type(e).__name__}: {e})"
    w, h = mask.size
    return rle_encode(mask_to_frame(mask, place((h, w), (h, w), "stretch"), quirks)), ""


def _parent_store(url: str, storage: StorageOptions | None) -> tuple[Store, str]:
    """The folder store holding file ``url``, and the file's name in it."""
    protocol, path = split_url(url)
    parent, name = posixpath.split(path) if protocol != "file" else os.path.split(path)
    if not name or (protocol != "file" and not parent):
        raise InputError(f"--out {url!r} must name a file, e.g. submission.csv")
    return Store(parent if protocol == "file" else f"{protocol}://{parent}", storage), name
