"""Post-processing and its choice on out-of-fold probabilities, on hand-worked arrays."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from segflow.errors import InputError
from segflow.masks import fill_holes, largest_component, postprocess
from segflow.metrics import per_image_scores
from segflow.predict.postprocess import (
    POSTPROCESS,
    THRESHOLDS,
    Choice,
    choose,
    choose_from_models,
)
from segflow.storage import Store


def grid(text: str) -> np.ndarray:
    """A mask drawn as rows of '#' (foreground) and '.' (background)."""
    return np.array([[c == "#" for c in row] for row in text.split()], dtype=np.uint8)


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[top : top + side, left : left + side] = True
    return m


# -- mask operations ------------------------------------------------------------------------------
def test_largest_component_keeps_exactly_the_bigger_blob():
    mask = grid("""
        ##.....
        ##.....
        .......
        ...###.
        ...###.
        .......
    """)
    expected = grid("""
        .......
        .......
        .......
        ...###.
        ...###.
        .......
    """)
    out = largest_component(mask)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(largest_component(mask.astype(bool)), expected.astype(bool))


def test_diagonal_neighbours_are_one_component():
    # the 3-pixel diagonal is one 8-connected object, bigger than the 2-pixel bar
    mask = grid("""
        #.....
        .#....
        ..#...
        ......
        ....##
    """)
    expected = grid("""
        #.....
        .#....
        ..#...
        ......
        ......
    """)
    np.testing.assert_array_equal(largest_component(mask), expected)


def test_largest_component_tie_keeps_the_first_in_raster_order_and_values():
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[0, 3:5] = 255
    mask[3, 0:2] = 255
    out = largest_component(mask)
    assert out[0, 3:5].tolist() == [255, 255] and out.sum() == 2 * 255


def test_empty_stays_empty():
    for dtype in (bool, np.uint8):
        empty = np.zeros((5, 5), dtype=dtype)
        for method in POSTPROCESS:
            out = postprocess(empty, method)
            assert out.dtype == dtype and not out.any()


def test_fill_holes_fills_a_ring():
    ring = grid("""
        .....
        .###.
        .#.#.
        .###.
        .....
    """)
    filled = fill_holes(ring)
    np.testing.assert_array_equal(filled, square(5, 1, 1, 3).astype(np.uint8))
    # a notch open to the border is not a hole
    cup = grid("""
        #.#
        #.#
        ###
    """)
    np.testing.assert_array_equal(fill_holes(cup), cup)


def test_fill_holes_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = ndimage.gaussian_filter(rng.random((40, 50)), 2) > 0.5
        np.testing.assert_array_equal(fill_holes(m), ndimage.binary_fill_holes(m))


def test_postprocess_lcc_fill_and_bad_method():
    mask = np.zeros((9, 9), dtype=bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a hole in the big blob
    mask[8, 8] = True  # a speck
    assert postprocess(mask, "none") is mask
    lcc = postprocess(mask, "lcc")
    assert not lcc[8, 8] and not lcc[3, 3] and lcc.sum() == 24
    np.testing.assert_array_equal(postprocess(mask, "lcc_fill"), square(9, 1, 1, 5))
    with pytest.raises(ValueError, match="none, lcc, lcc_fill"):
        postprocess(mask, "open")


# -- choose ---------------------------------------------------------------------------------------
def test_spurious_blobs_pick_lcc():
    # truth: an 8x8 square; prediction adds a 3x3 speck far away -> J = 64 / 73
    truth = np.stack([square(32, 4, 4, 8)] * 3)
    probs = np.where(truth, 0.9, 0.05)
    probs[:, 25:28, 25:28] = 0.9
    c = choose(probs, truth)
    assert c.postprocess in ("lcc", "lcc_fill")
    assert c.oof_by_postprocess["none"] == pytest.approx(64 / 73)
    assert c.oof_thresholded_jaccard == pytest.approx(1.0)
    assert c.oof_by_postprocess[c.postprocess] > c.oof_by_postprocess["none"]
    assert c.threshold == 0.5  # every threshold ties: the one closest to 0.5
    assert c.n_images == 3


def test_clean_probabilities_keep_none():
    # a single blob equal to the truth with soft edges: 0.95 inside, 0.6 on its inner rim,
    # 0.3 on a halo around it -> perfect for 0.30 < t <= 0.60 (p >= t), so 0.5
    truth = square(24, 6, 6, 10)
    probs = np.full(truth.shape, 0.02)
    probs[ndimage.binary_dilation(truth)] = 0.3
    probs[truth] = 0.6
    probs[ndimage.binary_erosion(truth)] = 0.95
    c = choose(probs[None], truth[None])
    assert (c.threshold, c.postprocess, c.oof_thresholded_jaccard) == (0.5, "none", 1.0)
    assert c.oof_by_threshold["0.35"] == 1.0 and c.oof_by_threshold["0.30"] == 100 / 140
    assert c.oof_by_threshold["0.65"] == 0.0  # rim lost: J = 64 / 100 < 0.65 counts 0
    assert set(c.oof_by_postprocess) == set(POSTPROCESS)


def test_threshold_between_background_noise_and_object():
    # object 0.7; background cycles 0.3 / 0.4 / 0.52: only 0.55..0.70 separate them
    truth = np.stack([square(30, 8, 8, 12), square(30, 2, 10, 9)])
    ii, jj = np.indices(truth.shape[1:])
    background = np.array([0.3, 0.4, 0.52])[(ii + jj) % 3]
    probs = np.where(truth, 0.7, background[None])
    c = choose(probs, truth)
    assert 0.4 < c.threshold < 0.7
    assert c.threshold == 0.55  # the perfect threshold closest to 0.5
    assert c.oof_thresholded_jaccard == 1.0 and c.oof_by_threshold["0.50"] == 0.0
    # the same probabilities stored as uint8 x255 (as in oof.zarr) give the same choice
    c8 = choose(np.round(probs * 255).astype(np.uint8), truth.astype(np.uint8))
    assert (c8.threshold, c8.postprocess, c8.oof_thresholded_jaccard) == (0.55, "none", 1.0)


def test_ring_prediction_picks_lcc_fill():
    # truth: filled 10x10 square; prediction: the same with a 4x4 hole -> J = 84 / 100
    truth = square(20, 5, 5, 10)
    probs = np.where(truth, 0.9, 0.1)
    probs[8:12, 8:12] = 0.1
    c = choose(probs[None], truth[None])
    assert c.postprocess == "lcc_fill"
    assert c.oof_by_postprocess == pytest.approx({"none": 0.84, "lcc": 0.84, "lcc_fill": 1.0})


def test_threshold_scores_match_the_metric_at_every_threshold():
    rng = np.random.default_rng(1)
    truth = ndimage.gaussian_filter(rng.random((70, 24, 24)), (0, 3, 3)) > 0.5
    truth[:5] = False  # empty truths: an empty prediction scores 1
    probs = np.clip(truth * 0.6 + rng.random(truth.shape) * 0.5, 0, 1)
    probs[:3] = 0.0
    for p in (probs, np.round(probs * 255).astype(np.uint8)):
        c = choose(p, truth)  # 70 images: two chunks of at most 64
        real = p / 255 if p.dtype == np.uint8 else p
        for t in THRESHOLDS:
            tj = per_image_scores(torch.from_numpy(real >= t), torch.from_numpy(truth))
            want = float(tj["thresholded_jaccard"].mean())
            assert c.oof_by_threshold[f"{t:.2f}"] == pytest.approx(want, abs=1e-12)


def test_iterables_match_arrays():
    truth = np.stack([square(16, 2, 2, 6), square(16, 8, 8, 5), square(16, 0, 9, 7)])
    probs = np.where(truth, 0.8, 0.2)
    probs[0, 12:14, 12:14] = 0.8
    c = choose(probs, truth)
    assert choose(list(probs), list(truth)) == c
    assert choose(iter(probs), (t for t in truth)) == c  # one-shot: scored in a single pass


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        choose(np.zeros((2, 8, 8)), np.zeros((2, 8, 9), dtype=bool))
    with pytest.raises(ValueError, match="different numbers"):
        choose([np.zeros((8, 8))] * 2, [np.zeros((8, 8), dtype=bool)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        choose(np.full((1, 4, 4), 2.0), np.zeros((1, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="uint8"):
        choose(np.zeros((1, 4, 4), dtype=np.int64), np.zeros((1, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="thresholds"):
        choose(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), dtype=bool), thresholds=[0.5, 1.5])
    with pytest.raises(ValueError, match="no images"):
        choose([], [])


# -- from a models folder -------------------------------------------------------------------------
def _write_dataset(url: str, masks: np.ndarray, has_mask: np.ndarray) -> None:
    g = zarr.open_group(Store(url).zarr_store(), mode="w")
    g.create_array("masks", data=masks, chunks=(1, *masks.shape[1:]))
    g.create_array("has_mask", data=has_mask)
    g.attrs.update(
        {"n": len(masks), "contract": 1, "size": list(masks.shape[1:]), "resize": "stretch"}
    )


def _write_oof(url: str, probs: np.ndarray, folds: dict[int, list[int]]) -> None:
    g = zarr.open_group(Store(url).zarr_store(), mode="a")
    g.create_array("oof.zarr/probs", data=probs, chunks=(1, *probs.shape[1:]))
    for k, rows in folds.items():
        Store(url).child(f"fold-{k}").write_json("oof.json", {"rows": rows, "scale": 1 / 255})


def test_choose_from_models_end_to_end(tmp_path):
    n, size = 6, 16
    masks = np.stack([square(size, 2 + i, 3, 7) for i in range(n)]).astype(np.uint8)
    has_mask = np.array([True] * 5 + [False])
    probs = np.where(masks > 0, 230, 10).astype(np.uint8)
    probs[:, 13:15, 13:15] = 230  # a speck on every image: lcc removes it
    probs[4] = 0  # row 4 is in no fold: were it scored, "none" would lose a full point
    ds, models = str(tmp_path / "ds.zarr"), str(tmp_path / "models")
    _write_dataset(ds, masks, has_mask)
    _write_oof(models, probs, {0: [0, 2], 1: [1, 3, 5]})  # row 5 has no mask: not scored
    Store(models).child("fold-x").write_json("oof.json", {"rows": [4]})  # not a fold folder

    c = choose_from_models(models, ds)
    assert c.n_images == 4 and c.resolution == "training"  # no source masks: the frame
    assert c.postprocess == "lcc" and c.oof_thresholded_jaccard == 1.0
    assert c.oof_by_postprocess["none"] == pytest.approx(49 / 53)
    saved = Store(models).read_json("postprocess.json")
    assert saved == asdict(c) and Choice.from_dict(saved) == c


def test_choose_from_models_without_folds(tmp_path):
    ds, models = str(tmp_path / "ds.zarr"), str(tmp_path / "models")
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    _write_dataset(ds, masks, np.array([True, True]))
    with pytest.raises(InputError, match="train"):
        choose_from_models(models, ds)
    _write_oof(models, masks, {0: []})  # a fold with no rows is no better
    with pytest.raises(InputError, match="train"):
        choose_from_models(models, ds)
    assert not Store(models).exists("postprocess.json")


def test_choose_from_models_shape_mismatch(tmp_path):
    ds, models = str(tmp_path / "ds.zarr"), str(tmp_path / "models")
    _write_dataset(ds, np.zeros((2, 8, 8), dtype=np.uint8), np.array([True, True]))
    _write_oof(models, np.zeros((2, 8, 10), dtype=np.uint8), {0: [0, 1]})
    with pytest.raises(InputError, match=r"\(8, 10\) frames .* \(8, 8\) masks"):
        choose_from_models(models, ds)
