"""Score predicted masks against ground truth: per-image CSV plus a summary JSON.

Every prediction is scored at the ground truth's resolution (a prediction of another size is
resized with nearest neighbour and flagged), so the numbers match the official ISIC 2018 /
Kaggle evaluation. Images are scored in batches on Dask's local threaded scheduler: decoding
PNGs and counting pixels release the GIL, and only the masks of the running batches are ever
in memory.

``predictions`` is the output folder of ``segflow predict`` (or its ``masks/``, or a folder of
masks; :mod:`segflow.predict.outputs`): a predict run's masks are named as its record says.
The truth's naming is ``mask_template`` (``{stem}_lesion.bmp``), else ``layout``, else the
predictions' own; ``image_pattern`` + ``mask_template`` or ``pairs`` pair it as ingest does
(:mod:`segflow.pairing`). The outputs land beside the masks, in the predict output folder:
``evaluation.csv``, ``evaluation.json`` and, last, ``evaluate.complete.json``. When no
prediction matches any truth mask, nothing is scored: :class:`InputError` shows one name from
each side.
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from segflow.cluster import cpu_count
from segflow.errors import ConfigError, InputError, PairingError, SegflowError
from segflow.geometry import place
from segflow.imaging import IMAGE_SUFFIXES, Rejected, decode_mask, mask_to_frame
from segflow.pairing import (
    Dropped,
    Paired,
    Pairing,
    check_template,
    find_pairs,
    first_per_id,
    read_pairs,
)
from segflow.predict.outputs import MASK_LAYOUTS, open_predictions, template_pattern
from segflow.storage import StorageOptions, Store, iter_batches

LAYOUTS = tuple(MASK_LAYOUTS)
CSV_NAME = "evaluation.csv"
JSON_NAME = "evaluation.json"
MARKER = "evaluate"
CSV_COLUMNS = (
    "id",
    "dice",
    "jaccard",
    "thresholded_jaccard",
    "tp",
    "fp",
    "fn",
    "tn",
    "resized",
    "missing",
    "error",
)
_ISIC_MASK = re.compile(r"^(?P<id>.+)_segmentation$", re.IGNORECASE)
# What a bad file can raise while being read and decoded; anything else is a bug and propagates.
_READ_ERRORS = (Rejected, SegflowError, OSError)


@dataclass
class EvaluationResult:
    """Means are over the scored images (``n``); ``None`` when no image could be scored."""

    n: int
    mean_dice: float | None
    mean_jaccard: float | None
    mean_thresholded_jaccard: float | None
    confusion: dict[str, Any]
    missing_predictions: list[str]
    unmatched_predictions: list[str]
    per_image_csv: str
    summary_json: str
    errors: dict[str, str] = field(default_factory=dict)  # id -> why it was not scored

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_errors": self.n_errors}


@dataclass
class _Pair:
    id: str
    truth: str  # path in the truth store
    pred: str | None  # path in the predictions store; None: no prediction


@dataclass
class _Row:
    """One image's scores; a row with ``error`` set has no scores and stays out of the means."""

    id: str
    dice: float | None = None
    jaccard: float | None = None
    thresholded_jaccard: float | None = None
    tp: int | None = None
    fp: int | None = None
    fn: int | None = None
    tn: int | None = None
    resized: bool = False
    missing: bool = False
    error: str = ""


def evaluate(
    predictions: str,
    truth: str,
    layout: str | None = None,
    storage: StorageOptions | None = None,
    max_pixels: int = 178_956_970,
    workers: int | None = None,
    mask_template: str | None = None,
    image_pattern: str | None = None,
    pairs: str | None = None,
) -> EvaluationResult:
    """Score every ground-truth mask at ``truth`` against its prediction at ``predictions``.

    Naming (``layout``): ``isic`` is ``<id>_segmentation.<ext>``, ``folder`` the file name
    without its suffix (``a.png`` pairs with ``a.png`` or ``a.tif``). The predictions follow
    their predict run's record when they have one, else ``layout`` (default ``folder``); the
    truth follows ``mask_template`` (e.g. ``{stem}_lesion.bmp``), else ``layout``, else the
    predictions' naming. A truth mask with no prediction is scored as an empty prediction and
    listed in ``missing_predictions``; when no prediction matches any truth mask at all, it is
    an :class:`InputError` (a wrong folder or naming, not a model that found nothing).

    ``image_pattern`` (with ``mask_template``) or ``pairs`` pair the truth as ``segflow
    ingest`` does (:mod:`segflow.pairing`): ``truth`` is then the archive that holds the
    images (the pattern) or the masks the CSV names (its image cells only name the rows: no
    image is read, so they may be anywhere); a CSV row whose mask is missing, an id that
    cannot name a row, and a second image of one id are reported in ``errors``, with the
    reasons ingest gives them."""
    preds = open_predictions(predictions, storage, layout)
    pred_store, truth_store = preds.masks_store, Store(truth, storage)
    truth_naming = mask_template or layout or preds.layout
    if pairs or image_pattern:
        truth_files, dropped, truth_naming = _paired_truth(
            truth_store, image_pattern, mask_template, pairs
        )
    else:
        truth_files, dropped = list_masks(truth_store, truth_naming), []
    if not truth_files:
        why = f"; e.g. {dropped[0].detail}" if dropped else ""
        raise InputError(
            f"no ground-truth masks at {truth_store.url!r} for {_naming(truth_naming)}{why}"
        )
    pred_files = list_masks(pred_store, preds.layout)
    if not pred_files:
        # Most likely a wrong URL or layout: scoring everything as empty would hide that.
        raise InputError(f"no predicted masks at {pred_store.url!r} for {_naming(preds.layout)}")
    if not set(truth_files) & set(pred_files):
        raise InputError(_no_match(pred_store, pred_files, preds.layout, truth_files, truth_naming))
    todo = [_Pair(i, truth_files[i], pred_files.get(i)) for i in sort_ids(truth_files)]
    rows = _score_all(todo, pred_store, truth_store, max_pixels, workers)
    rows += [_Row(d.id, error=f"{d.reason}: {d.detail}") for d in dropped]
    out = preds.root  # beside the masks, in the predict output folder
    csv_url = out.write_bytes(CSV_NAME, _csv_bytes(rows))
    result = _summarise(rows, csv_url, out.uri(JSON_NAME))
    result.missing_predictions = [p.id for p in todo if p.pred is None]
    result.unmatched_predictions = sort_ids(set(pred_files) - set(truth_files))
    summary = {
        **result.to_dict(),
        "layout": preds.layout,
        "truth_naming": truth_naming,
        "predictions": pred_store.url,
        "truth": truth_store.url,
    }
    out.write_json(JSON_NAME, summary)  # its presence means the CSV is complete
    out.mark_complete(MARKER, {k: summary[k] for k in ("n", "n_errors", "predictions", "truth")})
    return result


def _no_match(
    pred_store: Store,
    pred_files: dict[str, str],
    pred_naming: str,
    truth_files: dict[str, str],
    truth_naming: str,
) -> str:
    pred_id, truth_id = sort_ids(pred_files)[0], sort_ids(truth_files)[0]
    return (
        f"no prediction matches any ground-truth mask: e.g. prediction {pred_files[pred_id]!r} "
        f"(id {pred_id!r}, {_naming(pred_naming)}) vs truth {truth_files[truth_id]!r} "
        f"(id {truth_id!r}, {_naming(truth_naming)}). Name the truth's files with "
        "--mask-template (e.g. '{stem}_lesion.bmp'), --image-pattern with --mask-template, "
        "--pairs, or --layout; --predictions is the output "
        f"folder of `segflow predict` ({pred_store.url})"
    )


# -- discovery ----------------------------------------------------------------------------------
def _paired_truth(
    store: Store, image_pattern: str | None, mask_template: str | None, pairs: str | None
) -> tuple[dict[str, str], list[Dropped], str]:
    """id -> truth mask path by ``--image-pattern`` + ``--mask-template`` over the images in
    ``store``, or by a pairs CSV; the rows left out (a bad id, a CSV row without its mask, a
    second image of one id: the same rules as ingest); the naming, as the summary says it."""
    files = store.list()
    listed = {f.rel: f for f in files}
    if pairs:
        # evaluate reads no image: the image cell only names the row, so it may be anywhere
        # (relative to the CSV's folder, or absolute); the masks, which are read, must be
        # inside --truth, as ingest reads them from inside --masks
        found = read_pairs(pairs, store.options, None, None, store, listed)
        image_root, naming = None, f"pairs {pairs}"
    elif mask_template is None:
        raise PairingError(
            f"--image-pattern {image_pattern!r} finds the images; give --mask-template too, "
            "to name each image's truth mask (e.g. '../1st_manual/{id}_manual1.gif')"
        )
    else:
        spec = Pairing(image_pattern=image_pattern, mask_template=mask_template)
        found = find_pairs(spec, store, files, store, files)
        # an image whose mask is not there is not part of the truth (not an error)
        found = Paired([c for c in found.candidates if c.mask in listed], found.dropped)
        image_root, naming = store, f"pattern {image_pattern!r} -> {mask_template!r}"
    found = first_per_id(
        Paired([c for c in found.candidates if c.mask is not None], found.dropped),
        image_root,
        "scored",
    )
    truth = {c.id: str(c.mask) for c in found.candidates}
    return truth, found.dropped, naming


def list_masks(store: Store, naming: str) -> dict[str, str]:
    """id -> path of every mask file in ``store`` under ``naming``: a layout (``isic``,
    ``folder``) or a template with ``{stem}`` or ``{id}`` (``{stem}_lesion.bmp``;
    ``masks/{id}.gif`` matches whole paths under ``store``). Ids keep their sub-folder
    (``sub/a``) unless the template names a folder; when two files share an id (``a.png``,
    ``a.tif``) the first in sorted order is used."""
    template = _reverse_template(naming) if "{" in naming else None
    whole_path = template is not None and "/" in naming
    if template is None and naming not in LAYOUTS:
        raise ConfigError(
            f"unknown layout {naming!r}; allowed: {', '.join(LAYOUTS)}, or a --mask-template "
            "such as '{stem}_lesion.bmp'"
        )
    found: dict[str, str] = {}
    for f in sorted(store.list(), key=lambda f: f.rel):
        folder, name = posixpath.split(f.rel)
        stem, ext = posixpath.splitext(name)
        if ext.lower() not in IMAGE_SUFFIXES:
            continue
        if template is not None:
            m = template.match(f.rel if whole_path else name)
            if not m:
                continue
            stem = m["id"]
            if whole_path:
                folder = ""
        elif naming == "isic":
            m = _ISIC_MASK.match(stem)
            if not m:
                continue
            stem = m["id"]
        found.setdefault(posixpath.join(folder, stem), f.rel)
    return found


def _reverse_template(template: str) -> re.Pattern[str]:
    """A mask template read backwards (file name -> id), for truth folders that hold only
    masks: it can use the id alone; a template that leaves the image's folder needs the
    images (``--image-pattern``)."""
    check_template(template, ("id", "stem"))
    if template.startswith("../") or "/../" in template:
        raise PairingError(
            f"--mask-template {template!r} leaves the image's folder: give --image-pattern "
            "too, with --truth the folder that holds the images, to find each image's mask"
        )
    return template_pattern(template.lstrip("/"))


def sort_ids(ids: Iterable[str]) -> list[str]:
    """Numerically when every id is an integer (Kaggle nerve: 1, 2, ..., 10), else as text."""
    ids = list(ids)
    if ids and all(i.isascii() and i.isdigit() for i in ids):
        return sorted(ids, key=int)
    return sorted(ids)


def _naming(naming: str) -> str:
    if naming.startswith(("pairs ", "pattern ")):
        return naming
    if "{" in naming:
        return f"mask template {naming!r}"
    if naming == "isic":
        return "layout isic (<id>_segmentation.png)"
    return f"layout {naming} (<id>.png; image files: {', '.join(IMAGE_SUFFIXES)})"


# -- scoring ------------------------------------------------------------------------------------
def _score_all(
    pairs: list[_Pair], pred_store: Store, truth_store: Store, max_pixels: int, workers: int | None
) -> list[_Row]:
    import dask

    workers = workers or cpu_count()
    # ~4 batches per worker balances mixed image sizes; a cap of 32 keeps memory per task small.
    size = max(1, min(32, -(-len(pairs) // (4 * workers))))
    tasks = [
        dask.delayed(_score_batch, pure=False)(batch, pred_store, truth_store, max_pixels)
        for batch in iter_batches(pairs, size)
    ]
    batches = dask.compute(*tasks, scheduler="threads", num_workers=workers)
    return [row for batch in batches for row in batch]


def _score_batch(
    pairs: list[_Pair], pred_store: Store, truth_store: Store, max_pixels: int
) -> list[_Row]:
    return [_score_pair(p, pred_store, truth_store, max_pixels) for p in pairs]


def _score_pair(pair: _Pair, pred_store: Store, truth_store: Store, max_pixels: int) -> _Row:
    missing = pair.pred is None
    try:
        truth, _ = _read_mask(truth_store, pair.truth, max_pixels)
    except _READ_ERRORS as e:
        return _Row(pair.id, missing=missing, error=f"truth {truth_store.uri(pair.truth)}: {e}")
    if pair.pred is None:
        return _score(pair.id, np.zeros_like(truth), truth, resized=False, missing=True)
    try:
        pred, resized = _read_mask(pred_store, pair.pred, max_pixels, size=truth.shape)
    except _READ_ERRORS as e:
        return _Row(pair.id, error=f"prediction {pred_store.uri(pair.pred)}: {e}")
    return _score(pair.id, pred, truth, resized=resized, missing=False)


def _read_mask(
    store: Store, rel: str, max_pixels: int, size: tuple[int, ...] | None = None
) -> tuple[np.ndarray, bool]:
    """(H, W) uint8 {0,1} at ``size`` (default: the file's own), and whether it was resized."""
    data = store.read_bytes(rel)
    try:
        mask, quirks = decode_mask(data, rel, max_pixels)
    except Rejected:
        raise
    except Exception as e:  # whatever a decoder raises on a bad file is that file's error
        raise Rejected("bad_mask", f"{rel} cannot be decoded ({type(e).__name__}: {e})") from None
    w, h = mask.size
    target = (int(size[0]), int(size[1])) if size is not None else (h, w)
    # "stretch" onto the truth's frame: a nearest-neighbour resize, or the identity.
    return mask_to_frame(mask, place((h, w), target, "stretch"), quirks), target != (h, w)


def _score(id_: str, pred: np.ndarray, truth: np.ndarray, resized: bool, missing: bool) -> _Row:
    import torch

    from segflow.metrics import per_image_scores

    p, t = pred.astype(bool), truth.astype(bool)
    # Dice and Jaccard never look at true negatives, so scoring only the pixels where either
    # mask is set gives the same numbers; torch's reductions are ~100x slower than numpy's
    # count_nonzero per pixel, and a lesion is a fraction of the image.
    union = p | t
    scores = per_image_scores(torch.from_numpy(p[union])[None], torch.from_numpy(t[union])[None])
    tp = int(np.count_nonzero(p & t))
    fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp
    return _Row(
        id_,
        dice=float(scores["dice"][0]),
        jaccard=float(scores["jaccard"][0]),
        thresholded_jaccard=float(scores["thresholded_jaccard"][0]),
        tp=tp,
        fp=fp,
        fn=fn,
        tn=t.size - tp - fp - fn,
        resized=resized,
        missing=missing,
    )


# -- outputs ------------------------------------------------------------------------------------
def _summarise(rows: list[_Row], csv_url: str, json_url: str) -> EvaluationResult:
    scored = [r for r in rows if not r.error]
    return EvaluationResult(
        n=len(scored),
        mean_dice=_mean(r.dice for r in scored),
        mean_jaccard=_mean(r.jaccard for r in scored),
        mean_thresholded_jaccard=_mean(r.thresholded_jaccard for r in scored),
        confusion=_confusion(scored),
        missing_predictions=[],
        unmatched_predictions=[],
        per_image_csv=csv_url,
        summary_json=json_url,
        errors={r.id: r.error for r in rows if r.error},
    )


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return math.fsum(vals) / len(vals) if vals else None


def _confusion(rows: list[_Row]) -> dict[str, Any]:
    """Pixel counts over all scored images, their share of all pixels, and recall per class."""
    counts = {k: sum(getattr(r, k) or 0 for r in rows) for k in ("tp", "fp", "fn", "tn")}
    total = sum(counts.values())
    percent = {k: (100.0 * v / total if total else None) for k, v in counts.items()}
    fg, bg = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    return {
        **counts,
        "total": total,
        "percent": percent,
        "recall_foreground": counts["tp"] / fg if fg else None,
        "recall_background": counts["tn"] / bg if bg else None,
    }


def _csv_bytes(rows: list[_Row]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow(_csv_cell(getattr(r, c)) for c in CSV_COLUMNS)
    return buf.getvalue().encode()


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)
