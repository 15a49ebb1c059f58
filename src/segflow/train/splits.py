"""The K-fold split, written once as data (``splits.json``) and reused by every later run.

Folds are grouped: every image of a group (a nerve subject, a CT series) lands in the same
fold. Images without a group are their own group. The assignment is deterministic from the
seed: groups are shuffled, then placed largest first into the fold with the fewest images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segflow.errors import DatasetError
from segflow.storage import Store

SPLITS = "splits.json"


def make_splits(ids: list[str], groups: list[str], k: int, seed: int) -> dict[str, Any]:
    if len(ids) < k:
        raise DatasetError(f"{k} folds need at least {k} images; the dataset has {len(ids)}")
    members: dict[str, list[str]] = {}
    for image_id, group in zip(ids, groups, strict=True):
        members.setdefault(group or f"\0{image_id}", []).append(image_id)
    if len(members) < k:
        raise DatasetError(f"{k} folds need at least {k} groups; the dataset has {len(members)}")
    names = sorted(members)
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    # stable sort by size keeps the seeded order among equal sizes
    shuffled.sort(key=lambda g: -len(members[g]))
    folds: list[list[str]] = [[] for _ in range(k)]
    for g in shuffled:
        smallest = min(range(k), key=lambda f: (len(folds[f]), f))
        folds[smallest].extend(members[g])
    return {
        "k": k,
        "seed": seed,
        "grouped": any(groups),
        "n_images": len(ids),
        "folds": [{"fold": f, "val": sorted(v)} for f, v in enumerate(folds)],
    }


def load_or_create_splits(
    models: Store, ids: list[str], groups: list[str], k: int, seed: int
) -> dict[str, Any]:
    """The split in ``models/splits.json``, created on first use. An existing split that does
    not fit this dataset or ``k`` is an error, never silently replaced."""
    if models.exists(SPLITS):
        splits = models.read_json(SPLITS)
        split_ids = {i for f in splits["folds"] for i in f["val"]}
        if splits["k"] != k or split_ids != set(ids):
            extra, missing = len(set(ids) - split_ids), len(split_ids - set(ids))
            raise DatasetError(
                f"{models.uri(SPLITS)} was written for k={splits['k']} over "
                f"{splits['n_images']} images; this run asks for k={k} over {len(ids)} "
                f"({extra} ids not in the split, {missing} split ids not in the dataset). "
                "Use a new --models URL, or delete splits.json deliberately to re-split."
            )
        return splits
    splits = make_splits(ids, groups, k, seed)
    models.write_json(SPLITS, splits)
    return splits


def fold_indices(splits: dict[str, Any], fold: int, ids: list[str]) -> tuple[list[int], list[int]]:
    """(train rows, validation rows) of the dataset for ``fold``."""
    if not 0 <= fold < splits["k"]:
        raise DatasetError(f"fold {fold} does not exist; the split has folds 0..{splits['k'] - 1}")
    val = set(splits["folds"][fold]["val"])
    train_rows = [i for i, x in enumerate(ids) if x not in val]
    val_rows = [i for i, x in enumerate(ids) if x in val]
    return train_rows, val_rows
