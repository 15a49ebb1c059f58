"""Per-image uncertainty of the fold ensemble, and its review threshold calibrated out of fold.

The score is **view disagreement**: 1 - the mean pairwise soft Dice between the probability
maps of every view (each fold x each TTA view, mapped back to the frame):

    soft_dice(p, q) = 2 * sum(p * q) / (sum(p ** 2) + sum(q ** 2))   (1 when both are empty)

(the squared denominator of V-Net's soft Dice: a map agrees fully with itself, however soft it
is, so the score measures disagreement, not softness). 0 when every view draws the same map,
towards 1 when the views place the lesion in different places.

Why this score, not the boundary-band entropy of the mean: it measures disagreement itself
(entropy also rises on a confident but soft edge), it needs no threshold (so the calibration
holds whatever threshold a run applies), it weighs a wrong object by its area (a blob seen by
half of the views moves it far, a one-pixel rim barely), and it reduces on the device to one
(V, V) Gram matrix per image: the views never travel to host memory.

With fewer than two views (one fold and ``--tta none``) there is nothing to disagree: the
score is ``None`` (not 0, which would read as "sure").

**Calibration** (:func:`calibrate`): at training time each fold scores its own validation
images over its TTA views (:data:`OOF_TTA`; ``write_oof`` stores them in
``fold-<k>/oof.json``). An image *needs review* when its OOF thresholded Jaccard, at the
chosen threshold and post-processing, is below :data:`REVIEW_BELOW`; the review threshold is
the uncertainty cut that flags those images with the best F1, and its precision, recall and F1
on OOF are recorded with the post-processing choice (``postprocess.json``). The OOF score sees
one fold's TTA views; a predict run's score also sees the other folds, whose disagreement
only adds: at predict time the flag errs towards reviewing more.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from segflow.masks import largest_box
from segflow.metrics import TJ_THRESHOLD
from segflow.storage import Store

log = logging.getLogger("segflow.predict")

#: the TTA views each fold's OOF uncertainty is computed over (the default of ``segflow predict``)
OOF_TTA = "flips"
#: an image whose OOF thresholded Jaccard is below this should be reviewed (ISIC's TJ cut)
REVIEW_BELOW = TJ_THRESHOLD
_FOLD_DIR = re.compile(r"^fold-(\d+)$")


# -- the score (on the device) ---------------------------------------------------------------------
def view_disagreement(views: torch.Tensor) -> torch.Tensor | None:
    """(V, B, H, W) [or (V, B, 1, H, W)] probabilities of V views -> (B,) float32
    ``1 - mean pairwise soft Dice``, on the views' device; ``None`` when V < 2."""
    v = views.shape[0]
    if v < 2:
        return None
    flat = views.reshape(v, views.shape[1], -1).float()
    gram = torch.einsum("vbn,wbn->bvw", flat, flat)  # (B, V, V): sum(p_i * p_j)
    sq = torch.diagonal(gram, dim1=1, dim2=2)  # (B, V): sum(p_i ** 2)
    denom = sq[:, :, None] + sq[:, None, :]
    dice = torch.where(denom > 0, 2 * gram / denom.clamp_min(1e-12), torch.ones_like(gram))
    upper = torch.triu(torch.ones(v, v, dtype=torch.bool, device=flat.device), diagonal=1)
    return 1 - dice[:, upper].mean(-1)


# -- per-image statistics of a final mask ----------------------------------------------------------
def mask_stats(mask: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """The QA table's shape columns of one final (H, W) bool mask and its probabilities at the
    same size: foreground fraction, area, component count, the largest component's box
    (x0, y0, x1, y1; exclusive ends) and the mean probability inside the mask."""
    area = int(np.count_nonzero(mask))
    found = largest_box(mask)
    x0, y0, x1, y1 = found.bbox if found.bbox else (None, None, None, None)
    return {
        "foreground_fraction": area / max(mask.size, 1),
        "area_px": area,
        "n_components": int(found.n_components),
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
        "mean_prob_fg": float(prob[mask].mean()) if area else None,
    }


# -- calibration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """The review threshold chosen on OOF images, and how it did there."""

    threshold: float  # needs_review = uncertainty >= threshold
    precision: float
    recall: float
    f1: float
    n_images: int
    n_bad: int  # OOF images with thresholded Jaccard < below
    n_flagged: int
    below: float = REVIEW_BELOW

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(
    scores: np.ndarray, jaccard: np.ndarray, below: float = REVIEW_BELOW
) -> Calibration | None:
    """The cut on ``scores`` (flag ``score >= cut``) that best separates the images with
    ``jaccard < below`` by F1; ties go to the higher cut (fewer images to review). ``None``
    when no image is bad or none is scored (nothing to calibrate on)."""
    s = np.asarray(scores, dtype=np.float64)
    j = np.asarray(jaccard, dtype=np.float64)
    if s.shape != j.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and jaccard {j.shape} must be equal-length 1-D arrays")
    ok = np.isfinite(s) & np.isfinite(j)
    s, bad = s[ok], j[ok] < below
    n_bad = int(bad.sum())
    if s.size == 0 or n_bad == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s_sorted, bad_sorted = s[order], bad[order]
    tp = np.cumsum(bad_sorted)  # flag the top k+1 scores
    flagged = np.arange(1, s.size + 1)
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # a cut must take all equal scores
    tp, flagged, cuts = tp[last], flagged[last], s_sorted[last]
    precision = tp / flagged
    recall = tp / n_bad
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.flatnonzero(f1 >= f1.max() - 1e-12)[0])  # the first: the highest cut
    return Calibration(
        threshold=float(cuts[best]),
        precision=float(precision[best]),
        recall=float(recall[best]),
        f1=float(f1[best]),
        n_images=int(s.size),
        n_bad=n_bad,
        n_flagged=int(flagged[best]),
        below=below,
    )


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def needs_review(uncertainty: float | None, threshold: float | None) -> bool | None:
    """The flag of one image: ``None`` when the version has no calibration or the image no
    score."""
    if threshold is None or uncertainty is None or not np.isfinite(uncertainty):
        return None
    return bool(uncertainty >= threshold)


def calibrate_oof(
    records: Mapping[int, dict[str, Any]], rows: list[int], jaccard: np.ndarray
) -> Calibration | None:
    """:func:`calibrate` on the OOF images ``rows`` (their per-image Jaccard at the chosen
    threshold and post-processing, in step with ``rows``), with the per-image scores the folds
    stored in ``fold-<k>/oof.json`` (``records``: :func:`oof_records`). ``None``, with a
    logged note, for folds trained before the score was stored."""
    stored = oof_uncertainty(records)
    missing = [r for r in rows if r not in stored]
    if missing:
        log.warning(
            "no OOF uncertainty for %d of %d OOF images (folds trained before it was stored): "
            "needs_review stays empty for this version; retrain to calibrate it",
            len(missing),
            len(rows),
        )
        return None
    found = calibrate(np.array([stored[r] for r in rows]), jaccard)
    if found is None:
        log.warning("no OOF image has a Jaccard below %.2f: no review threshold", REVIEW_BELOW)
    return found


def oof_records(models: Store) -> dict[int, dict[str, Any]]:
    """Fold -> its ``fold-<k>/oof.json`` (rows, scale, TTA views, uncertainty), for every fold
    that has written one: read once, for the choice, its checks and the calibration."""
    found: dict[int, dict[str, Any]] = {}
    for path in models.fs.glob(models.path("fold-*/oof.json")):
        m = _FOLD_DIR.match(posixpath.basename(posixpath.dirname(str(path))))
        if m:
            found[int(m.group(1))] = json.loads(models.fs.cat_file(path))
    return dict(sorted(found.items()))


def oof_uncertainty(records: Mapping[int, dict[str, Any]]) -> dict[int, float]:
    """Row -> the OOF uncertainty its fold stored (folds without scores are left out)."""
    scores: dict[int, float] = {}
    for rec in records.values():
        values = rec.get("uncertainty")
        if values is not None and len(values) == len(rec.get("rows", [])):
            scores.update(zip((int(r) for r in rec["rows"]), map(float, values), strict=True))
    return scores
