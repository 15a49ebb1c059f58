"""The version's threshold and post-processing, chosen at the original mask resolution."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zarr

from segflow.dataset import Dataset
from segflow.predict.postprocess import choose_from_models, oof_choice
from segflow.storage import Store
from segflow.train.fullres import OofPairs, bounded_map, fold_scores
from tests.train.conftest import dataset_with_large_masks


def _blurry_oof(local, url: str, models: str) -> tuple[Dataset, np.ndarray, list[int]]:
    """OOF probabilities whose threshold matters, written as two folds would write them."""
    dataset = Dataset(Store(url, local.storage))
    rng = np.random.default_rng(1)
    probs = (rng.random((dataset.n, 32, 32)) * 140).astype(np.uint8)
    for i in range(dataset.n):
        probs[i] = np.clip(probs[i] + dataset.mask(i) * 110, 0, 255)
    m = Store(models, local.storage)
    g = zarr.open_group(m.zarr_store(), mode="a")
    g.create_array("oof.zarr/probs", data=probs, chunks=(1, 32, 32))
    rows = list(range(dataset.n))
    m.child("fold-0").write_json("oof.json", {"rows": rows[::2], "scale": 1 / 255})
    m.child("fold-1").write_json("oof.json", {"rows": rows[1::2], "scale": 1 / 255})
    return dataset, probs, rows


def test_choice_is_scored_at_the_original_resolution(local):
    """Each threshold's OOF score is the one `segflow evaluate` gives the masks a predictor
    would write (fold_scores equals evaluate: tests/train/test_plan.py), not the frame's."""
    url, _ = dataset_with_large_masks(local)
    models = f"{local.base}/m"
    dataset, probs, rows = _blurry_oof(local, url, models)
    c = choose_from_models(models, url, local.storage)
    assert c.resolution == "original" and c.n_images == dataset.n
    frame_differs = False
    for key in ("0.30", "0.50", "0.70"):
        full = fold_scores(dataset, rows, probs, float(key), local.storage)
        assert c.oof_by_threshold[key] == pytest.approx(full["thresholded_jaccard"], abs=1e-9)
        frame = OofPairs(dataset, rows, probs, local.storage)
        frame.has_source = [False] * len(rows)  # the same rows at the training resolution
        at_frame = np.mean([_tj(p >= np.ceil(float(key) * 255), t) for p, t in frame])
        frame_differs |= abs(at_frame - full["thresholded_jaccard"]) > 1e-3
    assert frame_differs  # the test would catch a choice made at the frame
    # the per-image Jaccard the review calibration uses is the chosen masks' own
    found = oof_choice(models, url, local.storage)
    assert found.rows == rows and len(found.jaccard) == dataset.n
    tj = np.where(found.jaccard < 0.65, 0.0, found.jaccard).mean()
    assert tj == pytest.approx(c.oof_thresholded_jaccard, abs=1e-9)


def _tj(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.count_nonzero(pred | truth)
    j = np.count_nonzero(pred & truth) / union if union else 1.0
    return 0.0 if j < 0.65 else j


def test_unreadable_source_falls_back_to_the_frame(local):
    url, raw = dataset_with_large_masks(local, n=4)
    models = f"{local.base}/m"
    dataset, probs, rows = _blurry_oof(local, url, models)
    raw.delete("ISIC_0000001_segmentation.png")
    pairs = OofPairs(dataset, rows, probs, local.storage)
    assert pairs.resolution == "original" and pairs.n_original == 4  # before any read
    shapes = [p.shape for p, _ in pairs]
    assert shapes == [(72, 96), (32, 32), (72, 96), (72, 96)]
    assert (pairs.resolution, pairs.n_original) == ("mixed", 3)
    c = choose_from_models(models, url, local.storage)  # said in the version's choice too
    assert (c.resolution, c.n_original, c.n_images) == ("mixed", 3, 4)


def test_train_makes_the_choice_and_survives_one_that_fails(local, monkeypatch):
    """`train()` leaves a models folder ready to predict (postprocess.json, chosen at the
    original resolution); a choice that breaks is logged, and the trained folds stand."""
    import segflow.predict.postprocess as pp
    from segflow.train import train
    from tests.train.conftest import small_config

    url, _ = dataset_with_large_masks(local)
    models = f"{local.base}/m"
    result = train(small_config(url, models, local.storage, epochs=1, fold_ids=[0]))
    assert result.choice is not None and result.choice["resolution"] == "original"
    saved = Store(models, local.storage).read_json("postprocess.json")
    assert saved["threshold"] == result.choice["threshold"]

    def broken(*a, **k):
        raise OSError("the object store went away")

    monkeypatch.setattr(pp, "choose_from_models", broken)
    again = train(small_config(url, models, local.storage, epochs=1, fold_ids=[1]))
    assert again.ok and again.choice is None and again.folds[0].status == "done"
    summary = Store(models, local.storage).read_json("train_summary.json")
    assert summary["folds"][0]["fold"] == 1 and summary["choice"] is None


def test_bounded_map_keeps_order_and_holds_few_results():
    done: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        time.sleep(0.001 * (i % 3))
        with lock:
            done.append(i)
        return i * i

    seen = []
    for i, out in enumerate(bounded_map(work, range(40), threads=2, ahead=3)):
        time.sleep(0.002)  # a slow consumer: producers must wait for it
        with lock:
            assert len(done) <= i + 1 + 3 + 2  # consumed + queued + running
        seen.append(out)
    assert seen == [i * i for i in range(40)]
