"""Kaggle RLE: hand-worked encodings, round trips, malformed strings, the submission CSV."""

from __future__ import annotations

import numpy as np
import pytest

from segflow.errors import InputError
from segflow.rle import export_rle, rle_decode, rle_encode
from tests.makers import png_bytes

# (mask, RLE) worked by hand: flatten down the columns, number pixels from 1.
CASES = [
    # columns: [0,0,0] [1,1,0] [0,0,1] -> pixels 4,5 and 9
    ([[0, 1, 0], [0, 1, 0], [0, 0, 1]], "4 2 9 1"),
    # columns: [1,1] [0,0] [1,0] -> pixels 1,2 and 5
    ([[1, 0, 1], [1, 0, 0]], "1 2 5 1"),
    ([[1, 1], [1, 1]], "1 4"),
    ([[0, 0], [0, 0]], ""),
    ([[0, 0], [0, 1]], "4 1"),  # the very last pixel
    ([[1, 1, 0, 1]], "1 2 4 1"),  # 1xN: column order is row order
    ([[1], [0], [1], [1]], "1 1 3 2"),  # Nx1
    # a run that wraps from the bottom of one column to the top of the next: pixels 2,3
    ([[0, 1], [1, 0]], "2 2"),
]


@pytest.mark.parametrize(("mask", "rle"), CASES)
def test_encode_hand_worked(mask, rle):
    assert rle_encode(np.array(mask, np.uint8)) == rle


@pytest.mark.parametrize(("mask", "rle"), CASES)
def test_decode_hand_worked(mask, rle):
    arr = np.array(mask, np.uint8)
    out = rle_decode(rle, arr.shape)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_encode_treats_any_nonzero_as_foreground():
    assert rle_encode(np.array([[0, 255], [True, 0]])) == "2 2"
    assert rle_encode(np.array([[False, True]])) == "2 1"


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((2, 2, 3), np.uint8))


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (23, 1), (7, 5), (64, 48), (420, 580)])
def test_round_trip_random(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.05, 0.5, 0.95):
        mask = (rng.random(shape) < density).astype(np.uint8)
        rle = rle_encode(mask)
        np.testing.assert_array_equal(rle_decode(rle, shape), mask)
        # canonical: the encoder never emits touching runs, so it re-encodes identically
        assert rle_encode(rle_decode(rle, shape)) == rle


def test_decode_empty_and_whitespace():
    np.testing.assert_array_equal(rle_decode("", (2, 3)), np.zeros((2, 3), np.uint8))
    np.testing.assert_array_equal(rle_decode("  \n", (2, 3)), np.zeros((2, 3), np.uint8))


def test_decode_accepts_touching_runs():
    # not canonical (the encoder would write "1 3"), but unambiguous
    np.testing.assert_array_equal(rle_decode("1 2 3 1", (2, 2)), [[1, 1], [1, 0]])


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", "odd number of values"),
        ("1 x", r"value 2 \('x'\) is not a non-negative integer"),
        ("1.5 2", "not a non-negative integer"),
        ("-1 2", "not a non-negative integer"),
        ("0 2", "1-indexed"),
        ("1 0", "at least 1 pixel"),
        ("9 2", "past the end of a 3x3 mask"),
        ("10 1", "past the end"),
        ("99999999999999999999999 1", "past the end"),
        ("4 2 5 1", "must not overlap"),  # run 2 starts inside run 1
        ("5 1 1 1", "must be sorted"),
        ("2 1 2 1", "must not overlap"),
    ],
)
def test_decode_malformed(rle, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, (3, 3))


def test_decode_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        rle_decode("1 1", (3,))


def _write(store, name: str, mask: list[list[int]]) -> None:
    store.write_bytes(name, png_bytes(np.array(mask, np.uint8) * 255))


def test_export_rle_folder(local):
    preds = local.store("preds")
    _write(preds, "1.png", [[1, 0, 1], [1, 0, 0]])
    _write(preds, "2.png", [[0, 1, 0], [0, 1, 0], [0, 0, 1]])
    _write(preds, "10.png", [[1, 1], [1, 1]])
    _write(preds, "7.png", [[0, 0], [0, 0]])
    preds.write_bytes("README.txt", b"not a mask")
    out = local.url("sub/submission.csv")

    res = export_rle(preds.url, out)

    with open(out) as f:
        text = f.read()
    # numeric order (10 after 7), and an empty mask gives an empty pixels field
    assert text == "img,pixels\n1,1 2 5 1\n2,4 2 9 1\n7,\n10,1 4\n"
    assert res == {"out": out, "n": 4, "empty": 1}


def test_export_rle_isic_ids_and_text_order(location):
    preds = location.store("preds")
    _write(preds, "ISIC_0000010_segmentation.png", [[0, 1]])
    _write(preds, "ISIC_0000002_segmentation.png", [[1, 0]])
    _write(preds, "ISIC_0000002.png", [[1, 1]])  # not a mask under the isic naming

    res = export_rle(preds.url, location.url("out/sub.csv"), location.storage, layout="isic")

    text = location.store("out").read_bytes("sub.csv").decode()
    assert text == "img,pixels\nISIC_0000002,1 1\nISIC_0000010,2 1\n"
    assert res["n"] == 2 and res["empty"] == 0


def test_export_rle_unreadable_mask_fails_naming_it(local):
    preds = local.store("preds")
    _write(preds, "1.png", [[1]])
    preds.write_bytes("2.png", b"this is not a png")
    with pytest.raises(InputError, match=r"1 predicted mask\(s\) cannot be read: .*2\.png"):
        export_rle(preds.url, local.url("s.csv"))


def test_export_rle_no_masks(local):
    with pytest.raises(InputError, match="no predicted masks"):
        export_rle(local.url("nothing"), local.url("s.csv"))
