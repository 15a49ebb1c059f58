"""Out-of-fold evaluation: every labelled image scored by the one fold that never saw it.

Reads the probabilities that each fold wrote to ``models/oof.zarr`` (rows listed in
``fold-k/oof.json``) and the truth masks of the dataset; scores per image at ``threshold``,
then averages per fold and over all OOF images. Batches of rows are scored on Dask's local
threaded scheduler (reading chunks and counting pixels release the GIL).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segflow.cluster import cpu_count
from segflow.dataset import open_group
from segflow.errors import DatasetError
from segflow.metrics import per_image_scores
from segflow.storage import StorageOptions, Store, iter_batches

METRICS = ("dice", "jaccard", "thresholded_jaccard")


def oof_scores(
    models_url: str,
    dataset_url: str,
    storage: StorageOptions | None = None,
    threshold: float = 0.5,
    batch: int = 32,
) -> dict[str, Any]:
    """``{"threshold", "per_fold": [{fold, n, dice, jaccard, thresholded_jaccard}],
    "overall": {n, dice, ...}}``; means are over labelled OOF images."""
    import dask
    import zarr

    models = Store(models_url, storage)
    group = open_group(Store(dataset_url, storage), "r")
    if "masks" not in group:
        raise DatasetError(f"dataset {dataset_url} has no masks; OOF scoring needs them")
    probs = zarr.open_array(models.zarr_store(read_only=True), path="oof.zarr/probs", mode="r")
    labelled = group["has_mask"][:]
    folds = _fold_rows(models)
    tasks = {
        (k, i): dask.delayed(_score_rows)(probs, group["masks"], rows, threshold)
        for k, rows in folds.items()
        for i, rows in enumerate(iter_batches([r for r in rows if labelled[r]], batch))
    }
    scored = dask.compute(*tasks.values(), scheduler="threads", num_workers=cpu_count())
    results = dict(zip(tasks, scored, strict=True))
    per_fold = []
    every: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for k in sorted(folds):
        parts = [v for (f, _), v in sorted(results.items()) if f == k]
        scores = {m: _cat([p[m] for p in parts]) for m in METRICS}
        for m in METRICS:
            every[m].append(scores[m])
        per_fold.append({"fold": k, **_means(scores)})
    overall = _means({m: _cat(v) for m, v in every.items()})
    return {"threshold": threshold, "per_fold": per_fold, "overall": overall}


def _fold_rows(models: Store) -> dict[int, list[int]]:
    """Rows of each fold that finished its OOF write (``fold-k/oof.json``)."""
    out = {}
    for path in sorted(models.fs.glob(models.path("fold-*/oof.json"))):
        fold = int(path.rstrip("/").split("/")[-2].removeprefix("fold-"))
        out[fold] = [int(r) for r in models.read_json(f"fold-{fold}/oof.json")["rows"]]
    if not out:
        raise DatasetError(f"no fold under {models.url} has written its OOF rows; train first")
    return out


def _score_rows(probs, masks, rows: list[int], threshold: float) -> dict[str, np.ndarray]:
    # uint8 probabilities x255: p >= t  <=>  byte >= ceil(t * 255) avoids a float copy
    cut = int(np.ceil(threshold * 255))
    pred = np.stack([probs[r] >= cut for r in rows])
    truth = np.stack([masks[r] > 0 for r in rows])
    s = per_image_scores(torch.from_numpy(pred), torch.from_numpy(truth))
    return {m: s[m].numpy() for m in METRICS}


def _means(scores: dict[str, np.ndarray]) -> dict[str, Any]:
    n = len(scores["dice"])
    return {"n": n, **{m: round(float(scores[m].mean()), 6) if n else None for m in METRICS}}


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)
