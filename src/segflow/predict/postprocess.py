"""Post-processing of binary masks, and its choice on out-of-fold (OOF) probabilities.

The choice follows nnU-Net: first the probability threshold that maximises the mean OOF
thresholded Jaccard (ISIC 2018's metric, :mod:`segflow.metrics`) with no post-processing
(ties go to the threshold closest to 0.5), then a post-processing step is adopted only if it
improves that score at that threshold by more than :data:`MIN_GAIN`. Out-of-fold means every
image is scored by the fold that did not train on it, so the choice is not fitted to training
images.

A pixel is foreground when ``p >= threshold``, as in ``segflow.predict.run``, the stage that
applies the choice. The mask operations themselves (largest 8-connected component, hole fill)
live in :mod:`segflow.masks`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import zip_longest
from typing import Any

import numpy as np

from segflow.errors import DatasetError, InputError
from segflow.masks import POSTPROCESS, fill_holes, largest_component
from segflow.metrics import TJ_THRESHOLD
from segflow.predict.uncertainty import calibrate_oof, oof_records
from segflow.storage import StorageOptions, Store

log = logging.getLogger("segflow.predict")

THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.round(np.arange(0.1, 0.91, 0.05), 2))
MIN_GAIN = 1e-4  # a post-processing step must beat "none" by more than this to be adopted
CHUNK = 64  # images per read: 64 x 256 x 256 keeps every temporary array in the tens of MB
CHOICE_FILE = "postprocess.json"


# -- the choice -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    threshold: float
    postprocess: str
    oof_thresholded_jaccard: float  # with the chosen threshold and post-processing
    oof_by_threshold: dict[str, float]  # "0.30" -> mean thresholded Jaccard, postprocess none
    oof_by_postprocess: dict[str, float]  # method -> mean TJ at the chosen threshold
    n_images: int
    # needs_review = uncertainty >= review_threshold, calibrated on OOF (None: not calibrated)
    review_threshold: float | None = None
    review: dict[str, Any] | None = None  # segflow.predict.uncertainty.Calibration
    # where the OOF images were scored: "original" (each source mask's own resolution, as
    # the product's masks are judged), "training" (the dataset frame) or "mixed" (sources
    # that could not be read fell back to the frame); None: chosen before this was recorded
    resolution: str | None = None
    n_original: int | None = None  # of n_images, scored at the original resolution

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Choice:
        return cls(**d)


def choose(
    probs: np.ndarray | Iterable[np.ndarray],
    truths: np.ndarray | Iterable[np.ndarray],
    thresholds: Sequence[float] = THRESHOLDS,
) -> Choice:
    """Choose the threshold, then the post-processing, on OOF probabilities and truths.

    ``probs``: uint8 (x255, as in ``oof.zarr``) or float in [0, 1]. ``truths``: bool or
    {0, 1} (anything > 0.5 is foreground). Either an (N, H, W) array-like (numpy, zarr),
    read in chunks of :data:`CHUNK`, or iterables of (H, W) or (B, H, W) arrays in step with
    each other. A re-iterable input is read twice (all thresholds, then post-processing at
    the chosen one); a one-shot iterator is read once, scoring post-processing at every
    threshold (bounded memory, more labelling).
    """
    one_shot = _is_one_shot(probs) or _is_one_shot(truths)
    return _choose(lambda: _pairs(probs, truths), _thresholds(thresholds), one_shot)[0]


def choose_pairs(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], thresholds: Sequence[float] = THRESHOLDS
) -> tuple[Choice, np.ndarray]:
    """:func:`choose` on a re-iterable of ``(prob, truth)`` pairs, each of its own size (an
    image at its original resolution, see :mod:`segflow.train.fullres`), read twice; also
    each image's plain Jaccard at the chosen threshold and post-processing, in the pairs'
    order (what the review calibration is fitted to)."""
    if _is_one_shot(pairs):
        raise ValueError("choose_pairs reads its pairs twice: pass a re-iterable, not an iterator")
    choice, jaccard = _choose(
        lambda: (_pair(p, t) for p, t in pairs), _thresholds(thresholds), False
    )
    return choice, jaccard  # type: ignore[return-value]


def _choose(
    pairs: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], ts: np.ndarray, one_shot: bool
) -> tuple[Choice, np.ndarray | None]:
    methods = POSTPROCESS if one_shot else ("none",)
    sums, n = _tally(pairs(), ts, methods)
    if n == 0:
        raise ValueError("no images to choose a threshold on: probs and truths are empty")
    by_threshold = sums[0] / n
    best = _best_threshold(ts, by_threshold)
    jaccard = None
    if one_shot:
        at_best = sums[:, best] / n
    else:  # one more read, at the chosen threshold only: every step's per-image Jaccard
        jaccard = _jaccard_at(pairs(), ts[best])
        at_best = _thresholded(jaccard).mean(1)
    by_method = {m: float(s) for m, s in zip(POSTPROCESS, at_best, strict=True)}
    method = _best_method(by_method)
    choice = Choice(
        threshold=float(ts[best]),
        postprocess=method,
        oof_thresholded_jaccard=by_method[method],
        oof_by_threshold={_key(t): float(s) for t, s in zip(ts, by_threshold, strict=True)},
        oof_by_postprocess=by_method,
        n_images=n,
    )
    return choice, None if jaccard is None else jaccard[POSTPROCESS.index(method)]


def _thresholds(thresholds: Sequence[float]) -> np.ndarray:
    ts = np.unique(np.asarray(thresholds, dtype=np.float64))  # sorted: searchsorted needs it
    if ts.size == 0 or ts.ndim != 1 or not np.all((ts > 0) & (ts < 1)):
        raise ValueError(
            f"thresholds must be a non-empty list of numbers in (0, 1), got {list(thresholds)}"
        )
    return ts


def _key(t: float) -> str:
    """The report key: "0.30" on the usual two-decimal grid, more digits only if needed."""
    return f"{t:.2f}" if abs(t - round(t, 2)) < 1e-9 else f"{t:g}"


def _best_threshold(ts: np.ndarray, scores: np.ndarray) -> int:
    # near-ties (float noise) go to the threshold closest to 0.5, then to the lower one
    tied = np.flatnonzero(scores >= scores.max() - 1e-9)
    return int(min(tied, key=lambda i: (round(abs(ts[i] - 0.5), 9), ts[i])))


def _best_method(scores: dict[str, float]) -> str:
    # lcc before lcc_fill on a tie: the simpler step is enough
    best = max(POSTPROCESS[1:], key=lambda m: (scores[m], -POSTPROCESS.index(m)))
    return best if scores[best] - scores["none"] > MIN_GAIN else "none"


# -- scoring --------------------------------------------------------------------------------------
def _tally(
    pairs: Iterator[tuple[np.ndarray, np.ndarray]], ts: np.ndarray, methods: Sequence[str]
) -> tuple[np.ndarray, int]:
    """Sum of per-image thresholded Jaccard, (len(methods), len(ts)), and the image count;
    ``methods`` is ``("none",)`` or all of :data:`POSTPROCESS` (a one-shot input)."""
    sums = np.zeros((len(methods), len(ts)))
    n = 0
    for prob, truth in pairs:
        levels = _levels(prob, ts)
        sums[0] += _tj_all_thresholds(levels, truth, len(ts)).sum(0)
        if len(methods) > 1:  # every step at every threshold: a one-shot input is read once
            for j in range(len(ts)):
                sums[1:, j] += _thresholded(_step_jaccards(levels > j, truth)[1:]).sum(1)
        n += len(prob)
    return sums, n


def _levels(prob: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Per pixel, how many thresholds it reaches (p >= t): foreground at threshold j is
    ``levels > j``. uint8 goes through a 256-entry table, so x255 and float agree exactly."""
    dtype = np.uint8 if len(ts) < 256 else np.int32
    if prob.dtype == np.uint8:
        table = np.searchsorted(ts, np.arange(256) / 255, side="right").astype(dtype)
        return table[prob]
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(f"probabilities must be uint8 (x255) or float in [0, 1], got {prob.dtype}")
    # NaN fails both comparisons, so it is refused too
    if prob.size and not (prob.min() >= 0 and prob.max() <= 1):
        raise ValueError("float probabilities must lie in [0, 1] (no NaN); pass uint8 for x255")
    # one comparison per threshold in the probabilities' own precision, as the predictor's
    # `full >= threshold` makes it (float32), and ~5x faster than searchsorted on a 30 MP map
    levels = np.zeros(prob.shape, dtype=dtype)
    for t in ts.astype(prob.dtype):
        levels += prob >= t
    return levels


def _tj_all_thresholds(levels: np.ndarray, truth: np.ndarray, n_t: int) -> np.ndarray:
    """(B, T) thresholded Jaccard at every threshold from two per-image histograms of the
    levels (all pixels, truth pixels): their tail sums are the predicted-pixel and
    intersection counts of each threshold, so no (T, B, H, W) stack is ever built."""
    b = len(levels)
    bins = n_t + 1
    idx = (np.arange(b, dtype=np.int64)[:, None] * bins + levels.reshape(b, -1)).ravel()
    every = np.bincount(idx, minlength=b * bins).reshape(b, bins)
    inside = np.bincount(idx[truth.reshape(-1)], minlength=b * bins).reshape(b, bins)
    pred = np.cumsum(every[:, ::-1], 1)[:, ::-1][:, 1:]  # pixels with level > j
    inter = np.cumsum(inside[:, ::-1], 1)[:, ::-1][:, 1:]
    return _tj(inter, pred, truth.reshape(b, -1).sum(1)[:, None])


def _tj(inter: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """segflow.metrics.per_image_scores' thresholded Jaccard, from pixel counts."""
    return _thresholded(_jaccard(inter, pred, truth))


def _jaccard(inter: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Plain Jaccard from pixel counts; empty against empty is 1, as in segflow.metrics."""
    union = pred + truth - inter
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def _thresholded(jaccard: np.ndarray) -> np.ndarray:
    return np.where(jaccard < TJ_THRESHOLD, 0.0, jaccard)


def _jaccard_at(pairs: Iterator[tuple[np.ndarray, np.ndarray]], t: float) -> np.ndarray:
    """(len(POSTPROCESS), N) plain Jaccard of every image after each step at threshold ``t``."""
    out = [_step_jaccards(_levels(prob, np.array([t])) > 0, truth) for prob, truth in pairs]
    return np.concatenate(out, axis=1) if out else np.zeros((len(POSTPROCESS), 0))


def _step_jaccards(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(len(POSTPROCESS), B) plain Jaccard of each step of a (B, H, W) prediction, in the
    order of :data:`POSTPROCESS`; the largest component is found once and shared by "lcc"
    and "lcc_fill"."""
    kept = np.stack([largest_component(p) for p in pred])
    filled = np.stack([fill_holes(k) for k in kept])
    # count_nonzero, not torch's bool sum: the same numbers, ~10x faster on CPU
    count = np.count_nonzero
    b = len(pred)
    t = truth.reshape(b, -1)
    n_t = count(t, axis=1)
    scores = []
    for m in (pred, kept, filled):
        p = m.reshape(b, -1)
        scores.append(_jaccard(count(p & t, axis=1), count(p, axis=1), n_t))
    return np.stack(scores)


# -- inputs ---------------------------------------------------------------------------------------
def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "__getitem__")


def _is_one_shot(x: Any) -> bool:
    return not _is_array(x) and iter(x) is x


def _chunks(x: Any) -> Iterator[np.ndarray]:
    if _is_array(x):
        if len(x.shape) == 2:
            yield np.asarray(x[:])
            return
        for i in range(0, x.shape[0], CHUNK):
            yield np.asarray(x[i : i + CHUNK])
    else:
        yield from (np.asarray(item) for item in x)


def _pairs(probs: Any, truths: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(B, H, W) probabilities and bool truths, in step; shapes checked up front for arrays
    and per item for iterables."""
    if _is_array(probs) and _is_array(truths) and tuple(probs.shape) != tuple(truths.shape):
        _mismatch(probs.shape, truths.shape)
    end = object()
    for prob, truth in zip_longest(_chunks(probs), _chunks(truths), fillvalue=end):
        if prob is end or truth is end:
            raise ValueError("probabilities and truth masks have different numbers of images")
        yield _pair(prob, truth)


def _pair(prob: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    """One item as (B, H, W) probabilities and bool truths, shapes checked."""
    prob, truth = np.asarray(prob), np.asarray(truth)
    if prob.shape != truth.shape:
        _mismatch(prob.shape, truth.shape)
    if prob.ndim == 2:
        prob, truth = prob[None], truth[None]
    if prob.ndim != 3:
        raise ValueError(f"expected (H, W) or (B, H, W) arrays, got shape {prob.shape}")
    return prob, (truth if truth.dtype == bool else truth > 0.5)


def _mismatch(prob_shape: Sequence[int], truth_shape: Sequence[int]) -> None:
    raise ValueError(
        f"probabilities of shape {tuple(prob_shape)} don't match truth masks of shape "
        f"{tuple(truth_shape)}"
    )


# -- from a models folder -------------------------------------------------------------------------
def choose_from_models(models_url: str, dataset_url: str, storage=None) -> Choice:
    """:func:`oof_choice`, written to ``models/postprocess.json``."""
    return save_choice(models_url, oof_choice(models_url, dataset_url, storage).choice, storage)


def save_choice(models_url: str, choice: Choice, storage: StorageOptions | None = None) -> Choice:
    """Write ``choice`` to ``models/postprocess.json``, where predict and serve read it."""
    Store(models_url, storage).write_json(CHOICE_FILE, choice.to_dict())
    log.info(
        "post-processing chosen on %d OOF images at the %s resolution: threshold %.2f, %s "
        "(OOF TJ %.4f)",
        choice.n_images,
        choice.resolution,
        choice.threshold,
        choice.postprocess,
        choice.oof_thresholded_jaccard,
    )
    return choice


@dataclass(frozen=True)
class OofChoice:
    """The choice, and what it was made on: the OOF rows and their per-image Jaccard at it."""

    choice: Choice
    rows: list[int]
    jaccard: np.ndarray


def oof_choice(models_url: str, dataset_url: str, storage=None) -> OofChoice:
    """:func:`choose_pairs` on the OOF rows of every finished fold (a fold is finished once it
    has written ``fold-<k>/oof.json``, which ``train`` does after its OOF probabilities), at
    the original mask resolution wherever the dataset names the source masks (else the
    dataset frame; see :class:`segflow.train.fullres.OofPairs`), then the ``needs_review``
    cut calibrated on the same images (:func:`segflow.predict.uncertainty.calibrate_oof`)."""
    from segflow.dataset import Dataset
    from segflow.train.fullres import OofPairs

    models = Store(models_url, storage)
    records = oof_records(models)  # every fold's oof.json, read once
    rows = _oof_rows(records, models)
    probs = _open_probs(models)
    dataset = Dataset(Store(dataset_url, storage))
    if "masks" not in dataset.group:
        raise DatasetError(f"dataset {dataset_url} has no masks; OOF scoring needs them")
    rows = _scorable(rows, dataset.group, probs.shape[0], models_url, dataset_url)
    masks = dataset.group["masks"]
    if tuple(probs.shape[1:]) != tuple(masks.shape[1:]):
        raise InputError(
            f"the OOF probabilities of {models_url} are {tuple(probs.shape[1:])} frames but "
            f"dataset {dataset_url} has {tuple(masks.shape[1:])} masks: were these models "
            f"trained on another dataset (or another --size)? Choose with the dataset they "
            f"were trained on"
        )
    _warn_mixed_views(records)
    pairs = OofPairs(dataset, rows, probs, storage)
    choice, jaccard = choose_pairs(pairs)
    choice = replace(choice, resolution=pairs.resolution, n_original=pairs.n_original)
    if pairs.at_frame:
        log.warning(
            "%d of %d OOF source masks could not be read: those images were scored at the "
            "training resolution (resolution %r)",
            len(pairs.at_frame),
            len(rows),
            pairs.resolution,
        )
    review = calibrate_oof(records, rows, jaccard)
    if review is not None:
        choice = replace(choice, review_threshold=review.threshold, review=review.to_dict())
    return OofChoice(choice, rows, jaccard)


def seconds_per_choice_image(
    dataset: Any, storage: StorageOptions | None, sample: int = 8
) -> float:
    """Wall seconds per OOF image of :func:`choose_pairs` here, measured on a real choice over
    ``sample`` source masks spread over ``dataset`` (each row's own frame mask standing in for
    its probabilities): both reads, the threshold sweep and the post-processing, on the
    threads :class:`~segflow.train.fullres.OofPairs` uses, scaled to the mean source size
    (:func:`~segflow.train.fullres.per_mean_image`). 0 without source masks (the choice then
    reads the frames, a small cost)."""
    import time

    from segflow.train.fullres import OofPairs, per_mean_image, sample_rows

    rows = sample_rows(dataset, sample)
    if not rows:
        return 0.0
    probs = {r: dataset.mask(r) * np.uint8(255) for r in rows}
    OofPairs(dataset, rows[:1], probs, storage).pair(0)  # first-use costs are not per image
    t0 = time.perf_counter()
    choose_pairs(OofPairs(dataset, rows, probs, storage))
    return per_mean_image(dataset, rows, time.perf_counter() - t0, storage)


def resolve_choice(
    models_url: str,
    storage: StorageOptions | None = None,
    threshold: float | str = "auto",
    method: str = "auto",
) -> tuple[float, str]:
    """The threshold and post-processing to apply: ``threshold`` and ``method`` as given,
    each ``"auto"`` one from ``models/postprocess.json``, which is chosen on the out-of-fold
    probabilities (and written) on first use."""
    if threshold == "auto" or method == "auto":
        models = Store(models_url, storage)
        if models.exists(CHOICE_FILE):
            choice = models.read_json(CHOICE_FILE)
        else:
            dataset = models.read_json("train_config.json")["dataset"]
            choice = choose_from_models(models_url, dataset, storage).to_dict()
        threshold = choice["threshold"] if threshold == "auto" else threshold
        method = choice["postprocess"] if method == "auto" else method
    return float(threshold), str(method)


def review_threshold(models_url: str, storage: StorageOptions | None = None) -> float | None:
    """The version's calibrated ``needs_review`` cut on uncertainty; ``None`` (logged) for a
    version chosen before the calibration existed, or with no choice at all."""
    models = Store(models_url, storage)
    found = (
        models.read_json(CHOICE_FILE).get("review_threshold")
        if models.exists(CHOICE_FILE)
        else None
    )
    if found is None:
        log.info(
            "models %s have no calibrated review threshold (trained before it existed): "
            "needs_review stays empty; retrain to calibrate it",
            models.url,
        )
    return None if found is None else float(found)


def _oof_rows(records: Mapping[int, dict[str, Any]], models: Store) -> list[int]:
    """The union of the finished folds' OOF rows (``records``: their ``oof.json``)."""
    seen: set[int] = set()
    for k, rec in records.items():
        rows = [int(r) for r in rec.get("rows", [])]
        if seen.intersection(rows):
            # K-fold validation sets are disjoint; an overlap means the split changed between
            # runs, and the shared rows hold whichever fold wrote last
            log.warning("fold %d's OOF rows overlap earlier folds' rows", k)
        seen.update(rows)
    if not seen:
        raise InputError(
            f"no finished folds with out-of-fold predictions under {models.url} (no "
            f"fold-<k>/oof.json with rows); run `segflow train` first"
        )
    return sorted(seen)


def _warn_mixed_views(records: Mapping[int, dict[str, Any]]) -> None:
    """Folds trained before the OOF probabilities were the mean of the TTA views (no ``tta``
    in their ``oof.json``) hold the identity view only: mixed with newer folds, the choice
    still runs, but on probabilities of two kinds."""
    views = {k: rec.get("tta") for k, rec in records.items()}
    if len(set(views.values())) > 1:
        log.warning(
            "the folds' OOF probabilities come from different TTA views (%s): retrain the "
            "older folds (into a new --models) for a choice on one kind",
            ", ".join(f"fold-{k}: {v or 'identity only'}" for k, v in views.items()),
        )


def _open_probs(models: Store) -> Any:
    import zarr

    try:
        return zarr.open_array(models.zarr_store(read_only=True), path="oof.zarr/probs", mode="r")
    except (
        FileNotFoundError,
        zarr.errors.NodeNotFoundError,
        zarr.errors.NodeTypeValidationError,
    ) as e:
        raise InputError(
            f"{models.uri('oof.zarr/probs')} is missing although folds wrote oof.json; "
            f"run `segflow train` again for those folds"
        ) from e


def _scorable(
    rows: list[int], group: Any, n_probs: int, models_url: str, dataset_url: str
) -> list[int]:
    """Rows that exist on both sides and have a truth mask."""
    n = min(int(group.attrs["n"]), n_probs)
    outside = [r for r in rows if not 0 <= r < n]
    if outside:
        raise InputError(
            f"OOF rows {outside[:5]} of {models_url} are outside dataset {dataset_url} "
            f"({group.attrs['n']} rows); were these models trained on another dataset?"
        )
    has_mask = np.asarray(group["has_mask"][:n], dtype=bool)
    kept = [r for r in rows if has_mask[r]]
    if len(kept) < len(rows):
        log.warning("%d OOF rows have no truth mask and are not scored", len(rows) - len(kept))
    if not kept:
        raise InputError(f"none of the OOF rows of {models_url} has a truth mask in {dataset_url}")
    return kept
