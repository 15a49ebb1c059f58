"""Fold scores at the original mask resolution, as the product is judged.

A dataset's frame (``masks``) is a resize of each source mask; the source itself is named by
the row's ``mask_sources`` URL (docs/dataset.md). ISIC 2017's training images were published
at 256x256 while their masks are at the photo's resolution (up to 30 MP), so a score on the
frame is not the score a user of the masks gets. Here each validation row's OOF probability
frame goes through the same inverse resize as prediction
(:func:`segflow.predict.postprocess.full_size_mask`: crop the content box, bilinear to the
original size, then threshold) onto the source mask's own size, and is scored there by the
same function as ``segflow evaluate``: so a fold's original-resolution scores equal
``segflow evaluate`` on the same masks.

It runs once per fold, on the best checkpoint's OOF probabilities (decoding multi-megapixel
masks every epoch would cost more than the epoch); the per-epoch validation that picks the
best checkpoint stays at the training resolution and is labelled so.

The version's threshold and post-processing are chosen on the same footing: :class:`OofPairs`
gives :func:`segflow.predict.postprocess.choose_pairs` every OOF image at its source mask's
resolution, the probabilities resized back before the threshold exactly as a predictor does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import posixpath
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from segflow.cluster import cpu_count
from segflow.dataset import Dataset
from segflow.errors import SegflowError
from segflow.evaluate import _score
from segflow.geometry import Placement, place
from segflow.imaging import decode_mask, mask_to_frame
from segflow.masks import full_size_mask, full_size_probs
from segflow.storage import StorageOptions, Store

log = logging.getLogger("segflow.train")

MAX_PIXELS = 178_956_970  # the decoders' limit (ingest's default --max-pixels)
MAX_THREADS = 4  # each holds a decoded source (up to MAX_PIXELS) and its float32 full-size map
#: what reading or decoding one source mask may raise (missing: StorageError, a SegflowError;
#: bad bytes: Rejected; odd sizes: ValueError): the row is unreadable, the fold goes on
UNREADABLE = (SegflowError, ValueError, OSError)
RESOLUTION_ORIGINAL = "original"
RESOLUTION_FRAME = "training"
RESOLUTION_MIXED = "mixed"  # some rows at the original resolution, the others at the frame
METRICS = ("dice", "jaccard", "thresholded_jaccard")


def source_truth(dataset: Dataset, row: int, storage: StorageOptions | None) -> np.ndarray | None:
    """Row ``row``'s source mask at its own resolution, (h, w) uint8 {0, 1}, binarised by the
    dataset's rule; ``None`` when the row has no source mask (drawn masks, unlabelled rows)."""
    url = str(dataset.group["mask_sources"][row])
    return read_source(dataset, url, storage) if url else None


def read_source(dataset: Dataset, url: str, storage: StorageOptions | None) -> np.ndarray:
    """The source mask at ``url``, (h, w) uint8 {0, 1}, binarised by the dataset's rule."""
    folder, name = posixpath.split(url)
    data = Store(folder, storage).read_bytes(name)
    mask, quirks = decode_mask(data, name, MAX_PIXELS, dataset.attrs.get("mask_positive", "auto"))
    w, h = mask.size
    return mask_to_frame(mask, place((h, w), (h, w), "stretch"), quirks)


def original_placement(dataset: Dataset, row: int, orig: Sequence[int]) -> Placement:
    """The frame's content box mapped onto an original of size ``orig``: the source mask
    covers what the image covers, at its own resolution."""
    box = tuple(int(v) for v in dataset.group["pad_box"][row])
    return Placement(tuple(dataset.size), (int(orig[0]), int(orig[1])), box)  # type: ignore[arg-type]


def prediction(
    dataset: Dataset, row: int, prob: np.ndarray, orig: Sequence[int], threshold: float
) -> np.ndarray:
    """The bool mask a predictor would write for ``prob`` (uint8 x255 or float, frame size),
    at size ``orig``."""
    p = prob.astype(np.float32) / 255 if prob.dtype == np.uint8 else prob.astype(np.float32)
    return full_size_mask(p, original_placement(dataset, row, orig), threshold, "none")


def score_row(
    dataset: Dataset, row: int, prob: np.ndarray, threshold: float, storage: StorageOptions | None
) -> dict[str, float] | None:
    truth = source_truth(dataset, row, storage)
    if truth is None:
        return None
    pred = prediction(dataset, row, prob, truth.shape, threshold)
    r = _score(str(row), pred, truth, resized=False, missing=False)
    return {m: getattr(r, m) for m in METRICS}


def fold_scores(
    dataset: Dataset,
    rows: Sequence[int],
    probs: Any,
    threshold: float,
    storage: StorageOptions | None = None,
) -> dict[str, Any] | None:
    """Mean Dice, Jaccard and thresholded Jaccard of ``rows`` at the original resolution
    (``probs[row]``: the OOF frame); ``None`` when no row has a source mask or none could be
    read (the caller then reports the training-resolution scores, labelled so). A row whose
    source cannot be read is counted in ``n_unreadable`` and left out of the means."""
    unreadable: list[int] = []

    def one(row: int) -> dict[str, float] | None:
        try:
            return score_row(dataset, row, np.asarray(probs[row]), threshold, storage)
        except UNREADABLE as e:
            log.warning("row %d: source mask not scored at full resolution: %s", row, e)
            unreadable.append(row)
            return None

    # PIL decodes and resizes off the GIL; few threads, as each may hold a huge source
    threads = max(1, min(cpu_count(), MAX_THREADS))
    scored = [s for s in bounded_map(one, [int(r) for r in rows], threads) if s is not None]
    if not scored:
        if unreadable:
            log.warning(
                "no source mask of %d row(s) could be read: training-resolution scores only",
                len(unreadable),
            )
        return None
    return {
        "resolution": RESOLUTION_ORIGINAL,
        "n": len(scored),
        "n_unreadable": len(unreadable),
        # the same mean as segflow evaluate's: math.fsum over the scored images
        **{m: math.fsum(s[m] for s in scored) / len(scored) for m in METRICS},
    }


def sample_rows(dataset: Dataset, sample: int) -> list[int]:
    """Up to ``sample`` labelled rows with a source mask, spread evenly over the dataset."""
    if "mask_sources" not in dataset.group:
        return []
    sources, labelled = dataset.column("mask_sources"), dataset.column("has_mask")
    have = [i for i in range(dataset.n) if sources[i] and labelled[i]]
    picks = np.linspace(0, len(have) - 1, min(sample, len(have))) if have else []
    return sorted({have[int(k)] for k in picks})


def seconds_per_image(dataset: Dataset, storage: StorageOptions | None, sample: int = 8) -> float:
    """Wall seconds per image of one full-resolution read (decode the source mask, resize the
    probabilities back, score), as :func:`fold_scores` and :class:`OofPairs` run it: on their
    threads, over ``sample`` labelled rows spread over the dataset (source sizes vary 50-fold
    on ISIC, so the first few rows alone can mislead), after one untimed warm-up read. The
    planner keeps this much time per image and read; 0 without source masks."""
    rows = sample_rows(dataset, sample)
    if not rows:
        return 0.0
    empty = np.zeros(tuple(dataset.size), dtype=np.uint8)

    def read(r: int) -> None:
        with contextlib.suppress(*UNREADABLE):
            score_row(dataset, r, empty, 0.5, storage)

    read(rows[0])  # first-use costs (imports, allocator, file cache) are not per image
    t0 = time.perf_counter()
    for _ in bounded_map(read, rows, max(1, min(cpu_count(), MAX_THREADS))):
        pass
    return per_mean_image(dataset, rows, time.perf_counter() - t0, storage)


#: rows whose source sizes are read (headers only) to scale a timing to the mean source
SIZE_SAMPLE = 64


def per_mean_image(
    dataset: Dataset, rows: Sequence[int], seconds: float, storage: StorageOptions | None
) -> float:
    """``seconds`` spent on ``rows``, as seconds per image of the dataset's mean source size.

    The cost of a full-resolution read is about linear in the source's pixels, and source
    sizes are heavy-tailed (0.4 to 30 MP on ISIC): a few timed rows give the rate per pixel
    well, but their mean size badly. So the rate comes from the timed rows and the mean size
    from :data:`SIZE_SAMPLE` rows' headers (nothing decoded)."""
    timed = sum(source_pixels(dataset, rows, storage))
    sizes = source_pixels(dataset, sample_rows(dataset, SIZE_SAMPLE), storage)
    if not timed or not sizes:
        return seconds / max(len(rows), 1)
    return seconds / timed * (sum(sizes) / len(sizes))


def source_pixels(
    dataset: Dataset, rows: Sequence[int], storage: StorageOptions | None
) -> list[int]:
    """The pixel count of each row's source mask, from its header; unreadable rows left out."""
    from PIL import Image, UnidentifiedImageError

    sources = dataset.column("mask_sources")
    out = []
    for r in rows:
        folder, name = posixpath.split(str(sources[r]))
        try:
            with Image.open(io.BytesIO(Store(folder, storage).read_bytes(name))) as im:
                out.append(im.size[0] * im.size[1])
        except (*UNREADABLE, UnidentifiedImageError):
            continue
    return out


class OofPairs:
    """Re-iterable ``(prob, truth)`` pairs of OOF ``rows``, one image at a time, for choosing
    a version's threshold and post-processing: at the original mask resolution where the row
    names its source mask (float probabilities through the predictor's inverse resize, before
    any threshold; the source binarised by the dataset's rule), else at the dataset frame. A
    source that cannot be read is logged and its row stays at the frame on every later read
    (the choice's two reads then score the same pixels); one that fails only on a later read
    (a passing storage error) is at the frame in that read alone, also logged.

    After a read, :attr:`resolution` says where the set was scored: "original" (every row),
    "training" (none) or "mixed", and :attr:`n_original` how many rows were at the original.

    Sources are decoded and resized on a few threads, a few images ahead of the consumer
    (:func:`bounded_map`): the memory held is a few original-size images (~5 bytes per source
    pixel each, plus the consumer's counting), whatever the number of rows."""

    def __init__(
        self,
        dataset: Dataset,
        rows: Sequence[int],
        probs: Any,
        storage: StorageOptions | None = None,
        threads: int | None = None,
    ) -> None:
        self.dataset, self.rows, self.probs, self.storage = dataset, list(rows), probs, storage
        sources = dataset.column("mask_sources") if "mask_sources" in dataset.group else None
        self.sources = [str(sources[r]) if sources is not None else "" for r in self.rows]
        self.at_frame: set[int] = set()  # positions whose source could not be read
        self.threads = max(1, min(threads or cpu_count(), MAX_THREADS))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_original(self) -> int:
        return sum(1 for i, url in enumerate(self.sources) if url and i not in self.at_frame)

    @property
    def resolution(self) -> str:
        n = self.n_original
        if n == len(self.rows) and n:
            return RESOLUTION_ORIGINAL
        return RESOLUTION_FRAME if n == 0 else RESOLUTION_MIXED

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return bounded_map(self.pair, range(len(self.rows)), self.threads)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        row, url = self.rows[i], self.sources[i]
        prob = np.asarray(self.probs[row])
        if url and i not in self.at_frame:
            try:
                truth = read_source(self.dataset, url, self.storage)
            except UNREADABLE as e:
                log.warning("row %d: source mask unreadable, scored at the frame: %s", row, e)
                self.at_frame.add(i)  # and on every later read: both reads see the same pixels
            else:
                p = prob.astype(np.float32) / 255 if prob.dtype == np.uint8 else prob
                full = full_size_probs(p, original_placement(self.dataset, row, truth.shape))
                return np.clip(full, 0.0, 1.0, out=full), truth > 0
        mask = self.dataset.mask(row)
        if mask is None:  # _scorable keeps labelled rows only
            raise ValueError(f"row {row} has no truth mask")
        return prob, mask > 0


def bounded_map(
    fn: Callable[[int], Any], items: Iterable[int], threads: int, ahead: int | None = None
) -> Iterator[Any]:
    """``map(fn, items)`` on ``threads`` threads, in order, with at most ``ahead + 1`` (default
    ``ahead``: ``threads + 1``) calls submitted and not yet consumed: unlike ``Executor.map``,
    which submits everything at once, the memory held stays bounded."""
    ahead = ahead or threads + 1
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
