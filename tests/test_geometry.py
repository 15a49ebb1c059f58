"""Resize policies (``place``) and their inverse (``to_frame`` / ``from_frame``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segflow.geometry import RESIZE_POLICIES, Placement, from_frame, place, to_frame


def _blocky_mask(h: int, w: int) -> np.ndarray:
    """A {0,1} mask with a few rectangles of different sizes, so misplacement shows."""
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : h // 2, w // 5 : w // 2] = 1
    m[h // 2 + 1 : h - 2, w // 2 + 2 : w - 3] = 1
    m[0, 0] = 1
    m[h - 1, w - 1] = 1
    return m


def _smooth_prob(h: int, w: int) -> np.ndarray:
    """A smooth probability field in [0, 1] (a wide Gaussian blob)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2, w / 3
    return np.exp(-(((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2)).astype(np.float32)


# -- place -------------------------------------------------------------------------------------
def test_policies_constant() -> None:
    assert RESIZE_POLICIES == ("stretch", "letterbox")


@pytest.mark.parametrize(
    ("orig", "size"),
    [((100, 200), (64, 64)), ((200, 100), (64, 64)), ((17, 33), (48, 64)), ((64, 64), (64, 64))],
)
def test_place_stretch_fills_whole_frame(orig, size) -> None:
    p = place(orig, size, "stretch")
    assert p == Placement(size=size, orig_size=orig, pad_box=(0, 0, *size))
    assert p.content_hw == size


@pytest.mark.parametrize(
    ("orig", "size", "pad_box"),
    [
        # wide: scale = min(64/100, 64/200) = 0.32 -> 32x64, centred vertically
        ((100, 200), (64, 64), (16, 0, 48, 64)),
        # tall: the same transposed
        ((200, 100), (64, 64), (0, 16, 64, 48)),
        # scale = min(64/30, 128/40) = 2.1333 -> 64 x round(85.33)=85; left = (128-85)//2 = 21
        ((30, 40), (64, 128), (0, 21, 64, 106)),
        # scale = min(6.4, 64/30) -> round(21.33)=21 x 64; top = (64-21)//2 = 21 (odd pad)
        ((10, 30), (64, 64), (21, 0, 42, 64)),
        # same aspect ratio: no padding at all
        ((50, 50), (64, 64), (0, 0, 64, 64)),
        ((32, 48), (64, 96), (0, 0, 64, 96)),
        # extreme aspect ratio: content never collapses below one pixel
        ((1, 1000), (64, 64), (31, 0, 32, 64)),
    ],
)
def test_place_letterbox_hand_worked(orig, size, pad_box) -> None:
    p = place(orig, size, "letterbox")
    assert p.size == size
    assert p.orig_size == orig
    assert p.pad_box == pad_box
    top, left, bottom, right = pad_box
    assert p.content_hw == (bottom - top, right - left)


def test_place_letterbox_keeps_aspect_and_fits() -> None:
    for orig in [(100, 200), (37, 91), (91, 37), (5, 64), (640, 480), (480, 640)]:
        p = place(orig, (48, 64), "letterbox")
        top, left, bottom, right = p.pad_box
        ch, cw = p.content_hw
        assert top >= 0 and left >= 0 and bottom <= 48 and right <= 64
        # one side touches the frame, the other is centred (pads differ by at most 1)
        assert ch == 48 or cw == 64
        assert abs(top - (48 - bottom)) <= 1 and abs(left - (64 - right)) <= 1
        # the other side follows the aspect ratio, to within rounding
        h, w = orig
        if ch == 48:
            assert abs(cw - 48 * w / h) <= 0.5
        else:
            assert abs(ch - 64 * h / w) <= 0.5


@pytest.mark.parametrize("policy", ["fit", "Letterbox", "", "crop"])
def test_place_invalid_policy_names_it(policy) -> None:
    with pytest.raises(ValueError, match=repr(policy)) as exc:
        place((10, 10), (8, 8), policy)  # type: ignore[arg-type]
    assert "stretch" in str(exc.value) and "letterbox" in str(exc.value)


# -- to_frame ----------------------------------------------------------------------------------
def test_to_frame_letterbox_pads_with_zeros_grey() -> None:
    img = Image.new("L", (200, 100), 200)  # PIL size is (w, h): orig (100, 200)
    p = place((100, 200), (64, 64), "letterbox")
    frame = to_frame(img, p)
    assert frame.shape == (64, 64)
    assert frame.dtype == np.uint8
    assert (frame[16:48] == 200).all()
    assert (frame[:16] == 0).all() and (frame[48:] == 0).all()


def test_to_frame_letterbox_pads_with_zeros_rgb() -> None:
    img = Image.new("RGB", (40, 60), (10, 150, 250))  # orig (60, 40) -> 64 x round(42.67)=43
    p = place((60, 40), (64, 64), "letterbox")
    assert p.pad_box == (0, 10, 64, 53)
    frame = to_frame(img, p)
    assert frame.shape == (64, 64, 3)
    assert (frame[:, 10:53] == (10, 150, 250)).all()
    assert (frame[:, :10] == 0).all() and (frame[:, 53:] == 0).all()


def test_to_frame_stretch_resizes_to_full_frame() -> None:
    arr = np.zeros((32, 64), np.uint8)
    arr[:, 32:] = 255  # right half white
    p = place((32, 64), (48, 48), "stretch")
    frame = to_frame(Image.fromarray(arr), p, nearest=True)
    assert frame.shape == (48, 48)
    assert (frame[:, :24] == 0).all() and (frame[:, 24:] == 255).all()


def test_to_frame_same_size_is_identity() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    frame = to_frame(Image.fromarray(arr), place((32, 40), (32, 40), "stretch"))
    np.testing.assert_array_equal(frame, arr)


def test_to_frame_nearest_adds_no_new_values() -> None:
    mask = _blocky_mask(37, 53) * 255
    frame = to_frame(Image.fromarray(mask), place((37, 53), (64, 64), "letterbox"), nearest=True)
    assert set(np.unique(frame)) <= {0, 255}
    bilinear = to_frame(Image.fromarray(mask), place((37, 53), (64, 64), "letterbox"))
    assert len(np.unique(bilinear)) > 2  # the default (bilinear) does blend


# -- from_frame --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("orig", "size", "policy"),
    [
        ((32, 32), (64, 64), "stretch"),  # x2 both axes
        ((16, 32), (64, 64), "letterbox"),  # x2, content 32x64 at (16, 0, 48, 64)
        ((32, 16), (64, 64), "letterbox"),
        ((16, 16), (64, 64), "letterbox"),  # x4
        ((64, 64), (64, 64), "stretch"),  # identity
    ],
)
def test_mask_round_trip_integer_scale_is_exact(orig, size, policy) -> None:
    mask = _blocky_mask(*orig)
    p = place(orig, size, policy)
    framed = to_frame(Image.fromarray(mask), p, nearest=True)
    assert framed.shape == size
    back = from_frame(framed, p)
    assert back.shape == orig
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)


@pytest.mark.parametrize("policy", ["stretch", "letterbox"])
@pytest.mark.parametrize("orig", [(37, 53), (53, 37), (100, 200), (20, 61)])
def test_mask_round_trip_any_scale_restores_size(orig, policy) -> None:
    mask = _blocky_mask(*orig)
    p = place(orig, (64, 64), policy)
    back = from_frame(to_frame(Image.fromarray(mask), p, nearest=True), p)
    assert back.shape == orig
    assert back.dtype == np.uint8
    assert set(np.unique(back)) <= {0, 1}
    # lossy when downscaled, but the bulk of the mask survives
    assert (back == mask).mean() > 0.9


def test_from_frame_crops_only_the_content_box() -> None:
    p = place((16, 32), (64, 64), "letterbox")  # content at rows 16..48
    frame = np.full((64, 64), 7, np.uint8)
    frame[16:48] = 1
    back = from_frame(frame, p)
    assert back.shape == (16, 32)
    assert (back == 1).all()  # none of the 7s in the padding leaks back


def test_from_frame_content_already_original_size() -> None:
    p = place((32, 64), (64, 64), "letterbox")  # content 32x64 == orig, no resize needed
    assert p.pad_box == (16, 0, 48, 64)
    frame = np.zeros((64, 64), np.uint8)
    frame[16:48] = _blocky_mask(32, 64)
    np.testing.assert_array_equal(from_frame(frame, p), _blocky_mask(32, 64))


@pytest.mark.parametrize("policy", ["stretch", "letterbox"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_probability_round_trip_bilinear(policy, dtype) -> None:
    orig = (40, 50)
    prob = _smooth_prob(*orig).astype(dtype)
    p = place(orig, (64, 64), policy)
    framed = to_frame(Image.fromarray(prob.astype(np.float32), mode="F"), p)
    assert framed.dtype == np.float32
    if policy == "letterbox":
        top, _, bottom, _ = p.pad_box
        assert p.pad_box == (6, 0, 57, 64)  # scale 1.28 -> 51 x 64; top = (64-51)//2
        assert (framed[:top] == 0).all() and (framed[bottom:] == 0).all()
    back = from_frame(framed.astype(dtype), p, nearest=False)
    assert back.shape == orig
    assert back.dtype == dtype
    assert np.abs(back - prob).max() < 0.05
    assert back.min() >= 0 and back.max() <= 1 + 1e-6


def test_probability_round_trip_nearest_keeps_values() -> None:
    """nearest=True on floats only picks existing values (no blending)."""
    prob = _smooth_prob(20, 30)
    p = place((20, 30), (64, 64), "letterbox")
    framed = to_frame(Image.fromarray(prob, mode="F"), p)
    back = from_frame(framed, p, nearest=True)
    assert back.shape == (20, 30)
    top, left, bottom, right = p.pad_box
    assert set(np.unique(back)) <= set(np.unique(framed[top:bottom, left:right]))


def test_from_frame_bool_mask() -> None:
    mask = _blocky_mask(16, 32).astype(bool)
    p = place((16, 32), (64, 64), "letterbox")
    framed = to_frame(Image.fromarray(mask), p, nearest=True)
    back = from_frame(framed, p)
    assert back.dtype == bool
    np.testing.assert_array_equal(back, mask)
