"""Decoding images and masks into canonical form, on files written in the real formats."""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from segflow.geometry import place
from segflow.imaging import (
    REASONS,
    Decoded,
    Rejected,
    align_mask,
    decode_image,
    decode_mask,
    image_to_frame,
    mask_to_frame,
)

BIG = 10**8  # a max_pixels nothing in this file reaches
RED, BLUE = (220, 30, 30), (40, 60, 160)


# -- builders ----------------------------------------------------------------------------------
def encode(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(img: Image.Image | np.ndarray, **kw) -> bytes:
    return encode(img, "JPEG", **{"quality": 95, **kw})


def png(img: Image.Image | np.ndarray, **kw) -> bytes:
    return encode(img, "PNG", **kw)


def tiff(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def colour_bars(h: int = 32, w: int = 48) -> np.ndarray:
    """Three flat vertical bars: JPEG-robust and easy to check."""
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:, : w // 3] = (200, 40, 40)
    rgb[:, w // 3 : 2 * w // 3] = (40, 200, 40)
    rgb[:, 2 * w // 3 :] = (40, 40, 200)
    return rgb


def noise(h: int, w: int, *extra: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, *extra), dtype=np.uint8)


def box_mask(h: int, w: int, box: tuple[int, int, int, int], fg: int = 255) -> np.ndarray:
    top, left, bottom, right = box
    m = np.zeros((h, w), np.uint8)
    m[top:bottom, left:right] = fg
    return m


def arr_of(d: Decoded) -> np.ndarray:
    return np.asarray(d.image)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def reject(fn, *args, **kw) -> Rejected:
    with pytest.raises(Rejected) as exc:
        fn(*args, **kw)
    r = exc.value
    assert r.reason in REASONS
    assert str(r) == f"{r.reason}: {r.detail}"
    return r


# -- bad input ---------------------------------------------------------------------------------
def _truncated_jpeg() -> bytes:
    data = jpeg(noise(64, 64, 3))
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    data = png(noise(64, 64, 3))
    return data[: len(data) // 2]


BAD_IMAGES = [
    # (name, data, reason, words the detail must contain)
    ("empty.jpg", b"", "unreadable", ["empty.jpg", "0 bytes"]),
    ("empty.png", b"", "unreadable", ["empty.png", "0 bytes"]),
    ("empty.tif", b"", "unreadable", ["empty.tif", "0 bytes"]),
    ("half.jpg", _truncated_jpeg(), "unreadable", ["half.jpg", "truncated"]),
    ("half.png", _truncated_png(), "unreadable", ["half.png", "truncated"]),
    ("x.jpg", b"this is not an image\n" * 20, "unreadable", ["x.jpg", "not an image"]),
    ("x.png", b"\x89PNG\r\n\x1a\n garbage", "unreadable", ["x.png", "not an image"]),
    ("x.tif", b"this is not a tiff\n" * 20, "unreadable", ["x.tif", "not a TIFF"]),
    ("half.tif", tiff(noise(64, 64, 3))[:100], "unreadable", ["half.tif"]),
]


@pytest.mark.parametrize(
    ("name", "data", "reason", "words"), BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES]
)
def test_bad_image_rejected(name, data, reason, words) -> None:
    r = reject(decode_image, data, name, BIG)
    assert r.reason == reason
    for word in words:
        assert word in r.detail


def test_truncated_jpeg_rejected_in_draft_mode_too() -> None:
    r = reject(decode_image, _truncated_jpeg(), "half.jpg", BIG, target=(16, 16))
    assert r.reason == "unreadable"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_too_large_names_pixel_count_and_limit(fmt) -> None:
    data = encode(noise(48, 64, 3), fmt)
    r = reject(decode_image, data, "big.img", 3000)
    assert r.reason == "too_large"
    assert "big.img" in r.detail
    assert "64x48" in r.detail  # w x h as received
    assert "3,072" in r.detail  # the pixel count
    assert "3,000" in r.detail  # the limit
    # exactly at the limit is fine
    assert decode_image(data, "big.img", 64 * 48).orig_size == (48, 64)


def test_too_large_tiff_names_size_and_limit() -> None:
    data = tiff(noise(48, 64))
    r = reject(decode_image, data, "big.tif", 3000)
    assert r.reason == "too_large"
    assert "big.tif" in r.detail and "64x48" in r.detail and "3,000" in r.detail
    assert decode_image(data, "big.tif", 64 * 48).orig_size == (48, 64)


def test_planar_tiff_too_large_counts_pixels_not_samples() -> None:
    data = tiff(noise(3, 32, 40), photometric="rgb", planarconfig="separate")
    assert decode_image(data, "p.tif", 32 * 40).orig_size == (32, 40)
    assert reject(decode_image, data, "p.tif", 32 * 40 - 1).reason == "too_large"


# -- image modes -------------------------------------------------------------------------------
def test_rgb_jpeg_plain() -> None:
    rgb = colour_bars()
    d = decode_image(jpeg(rgb), "a.jpg", BIG)
    assert d.image.mode == "RGB"
    assert d.orig_size == d.raw_size == (32, 48)
    assert d.channels == 3 and d.orientation == 1 and d.quirks == []
    assert mad(arr_of(d), rgb) < 3


def test_cmyk_jpeg_converted_close_to_rgb() -> None:
    rgb = colour_bars()
    data = jpeg(Image.fromarray(rgb).convert("CMYK"))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    d = decode_image(data, "c.jpg", BIG)
    assert d.image.mode == "RGB"
    assert d.channels == 4
    assert d.quirks == ["mode_CMYK"]
    assert d.orig_size == (32, 48)
    out = arr_of(d)
    assert mad(out, rgb) < 4
    # the bars keep their hue: red, green, blue in order
    assert [int(np.argmax(out[16, x])) for x in (8, 24, 40)] == [0, 1, 2]


def test_png_16bit_grey_scaled_by_257() -> None:
    values = [0, 65535, 257 * 100, 257 * 200, 128, 129, 257 * 100 + 128, 257 * 100 + 129, 1000]
    expect = [0, 255, 100, 200, 0, 1, 100, 101, 4]  # round(x / 257)
    a16 = np.zeros((32, 32), np.uint16)
    a16[0, : len(values)] = values
    a16[1:] = 65535
    data = png(Image.fromarray(a16))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    d = decode_image(data, "d.png", BIG)
    assert d.image.mode == "L"
    assert d.channels == 1
    assert d.quirks == ["mode_I;16"]
    out = arr_of(d)
    assert out.dtype == np.uint8
    assert out[0, : len(values)].tolist() == expect
    assert (out[1:] == 255).all()


def test_palette_png_colours_kept() -> None:
    rgb = colour_bars()
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=3)
    data = png(pal)
    assert Image.open(io.BytesIO(data)).mode == "P"
    d = decode_image(data, "p.png", BIG)
    assert d.image.mode == "RGB"
    assert d.channels == 3
    assert d.quirks == ["mode_P"]
    np.testing.assert_array_equal(arr_of(d), rgb)


def test_palette_png_with_transparency_counts_alpha() -> None:
    rgb = colour_bars()
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=3)
    d = decode_image(png(pal, transparency=0), "p.png", BIG)
    assert d.channels == 4
    assert d.image.mode == "RGB"
    np.testing.assert_array_equal(arr_of(d), rgb)


def test_rgba_png_alpha_dropped_colours_kept() -> None:
    rgb = noise(32, 40, 3)
    alpha = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (32, 1))
    alpha[:, :5] = 0  # fully transparent columns must keep their colour, not turn black
    data = png(np.dstack([rgb, alpha]))
    assert Image.open(io.BytesIO(data)).mode == "RGBA"
    d = decode_image(data, "a.png", BIG)
    assert d.image.mode == "RGB"
    assert d.channels == 4
    assert d.quirks == ["mode_RGBA"]
    np.testing.assert_array_equal(arr_of(d), rgb)


def test_la_png_becomes_grey() -> None:
    grey = noise(24, 32)
    data = png(np.dstack([grey, np.full_like(grey, 77)]))
    assert Image.open(io.BytesIO(data)).mode == "LA"
    d = decode_image(data, "la.png", BIG)
    assert d.image.mode == "L" and d.channels == 2 and d.quirks == ["mode_LA"]
    np.testing.assert_array_equal(arr_of(d), grey)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_greyscale_kept_single_channel_then_replicated_in_frame(fmt) -> None:
    grey = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (32, 1))
    d = decode_image(encode(grey, fmt), "g.img", BIG)
    assert d.image.mode == "L"
    assert d.channels == 1 and d.quirks == []
    framed = image_to_frame(d, place(d.orig_size, (32, 48), "stretch"))
    assert framed.shape == (32, 48, 3) and framed.dtype == np.uint8
    assert (framed[..., 0] == framed[..., 1]).all() and (framed[..., 1] == framed[..., 2]).all()
    assert mad(framed[..., 0], grey) < (1 if fmt == "PNG" else 3)
    boxed = image_to_frame(d, place(d.orig_size, (64, 64), "letterbox"))
    assert boxed.shape == (64, 64, 3)
    assert (boxed[..., 0] == boxed[..., 2]).all()


def test_image_to_frame_letterbox_rgb_pads_black() -> None:
    rgb = np.full((32, 64, 3), (90, 180, 30), np.uint8)
    d = decode_image(png(rgb), "r.png", BIG)
    p = place(d.orig_size, (64, 64), "letterbox")
    assert p.pad_box == (16, 0, 48, 64)
    framed = image_to_frame(d, p)
    assert framed.shape == (64, 64, 3)
    assert (framed[16:48] == (90, 180, 30)).all()
    assert (framed[:16] == 0).all() and (framed[48:] == 0).all()
    assert framed.flags.c_contiguous


def test_tiff_rgb_uint8_exact() -> None:
    rgb = noise(32, 40, 3)
    d = decode_image(tiff(rgb), "r.tif", BIG)
    assert d.image.mode == "RGB"
    assert d.channels == 3 and d.quirks == [] and d.orientation == 1
    assert d.orig_size == d.raw_size == (32, 40)
    np.testing.assert_array_equal(arr_of(d), rgb)


def test_tiff_16bit_grey_scaled() -> None:
    a16 = np.zeros((32, 40), np.uint16)
    a16[0, :5] = [0, 65535, 257 * 100, 257 * 37, 129]
    a16[1:] = 257 * 50
    d = decode_image(tiff(a16), "g.TIFF", BIG)  # suffix match is case-insensitive
    assert d.image.mode == "L"
    assert d.channels == 1
    assert d.quirks == ["dtype_uint16"]
    out = arr_of(d)
    assert out[0, :5].tolist() == [0, 255, 100, 37, 1]
    assert (out[1:] == 50).all()


def test_tiff_16bit_rgb_scaled() -> None:
    a16 = noise(16, 24, 3).astype(np.uint16) * 257
    d = decode_image(tiff(a16, photometric="rgb"), "c.tif", BIG)
    assert d.image.mode == "RGB" and d.channels == 3 and d.quirks == ["dtype_uint16"]
    np.testing.assert_array_equal(arr_of(d), noise(16, 24, 3))


def test_tiff_planar_rgb() -> None:
    rgb = noise(32, 40, 3)
    planar = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))  # (3, H, W)
    data = tiff(planar, photometric="rgb", planarconfig="separate")
    with tifffile.TiffFile(io.BytesIO(data)) as t:
        assert t.pages[0].shape == (3, 32, 40)
    d = decode_image(data, "p.tif", BIG)
    assert d.image.mode == "RGB"
    assert d.orig_size == (32, 40)
    assert d.channels == 3
    np.testing.assert_array_equal(arr_of(d), rgb)


def test_tiff_rgba_drops_alpha() -> None:
    rgba = noise(16, 24, 4)
    d = decode_image(tiff(rgba, photometric="rgb", extrasamples=["unassalpha"]), "a.tif", BIG)
    assert d.image.mode == "RGB" and d.channels == 4
    np.testing.assert_array_equal(arr_of(d), rgba[..., :3])


def test_tiff_float_unit_range_scaled_by_255() -> None:
    f = np.zeros((16, 24), np.float32)
    f[0, :3] = [0.0, 1.0, 0.5]
    d = decode_image(tiff(f), "f.tif", BIG)
    assert d.quirks == ["dtype_float32"]
    assert arr_of(d)[0, :3].tolist() == [0, 255, 128]


# -- EXIF orientation --------------------------------------------------------------------------
DISPLAY_H, DISPLAY_W = 20, 40
BLOCK = (0, 0, 8, 12)  # (top, left, bottom, right) of the red block, as displayed


def displayed_image() -> np.ndarray:
    img = np.empty((DISPLAY_H, DISPLAY_W, 3), np.uint8)
    img[:] = BLUE
    top, left, bottom, right = BLOCK
    img[top:bottom, left:right] = RED
    return img


def to_raw(display: np.ndarray, orientation: int) -> np.ndarray:
    """What a camera stores for a picture displayed as ``display`` (EXIF 0x0112 semantics,
    written independently of Pillow): e.g. 6 means the stored pixels must be turned 90 degrees
    clockwise to display, so they are the displayed picture turned counter-clockwise."""
    raw = {
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # upside down
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: lambda a: a.swapaxes(0, 1),  # transposed
        6: lambda a: np.rot90(a, 1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transversed
        8: lambda a: np.rot90(a, -1),
    }[orientation](display)
    return np.ascontiguousarray(raw)


def exif_bytes(display: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    img = Image.fromarray(to_raw(display, orientation))
    exif = img.getexif()
    exif[0x0112] = orientation
    kw = {"quality": 95} if fmt == "JPEG" else {}
    return encode(img, fmt, exif=exif, **kw)


def is_red(px: np.ndarray) -> bool:
    r, g, b = (int(v) for v in px)
    return r > 150 and g < 90 and b < 90


@pytest.mark.parametrize("orientation", [6, 8, 5, 7])
def test_exif_rotated_jpeg_decoded_as_displayed(orientation) -> None:
    display = displayed_image()
    data = exif_bytes(display, orientation)
    raw = Image.open(io.BytesIO(data))
    assert raw.size == (DISPLAY_H, DISPLAY_W)  # stored tall, displayed wide
    assert raw.getexif()[0x0112] == orientation

    d = decode_image(data, "e.jpg", BIG)
    assert d.orientation == orientation
    assert "exif_rotated" in d.quirks
    assert d.orig_size == (DISPLAY_H, DISPLAY_W)
    assert d.raw_size == (DISPLAY_W, DISPLAY_H)
    assert d.image.size == (DISPLAY_W, DISPLAY_H)
    out = arr_of(d)
    assert is_red(out[2, 2])  # top-left as displayed
    assert not is_red(out[2, DISPLAY_W - 3]) and not is_red(out[DISPLAY_H - 3, 2])
    assert mad(out, display) < 6


@pytest.mark.parametrize("orientation", [2, 3, 4])
def test_exif_flipped_jpeg_decoded_as_displayed(orientation) -> None:
    display = displayed_image()
    d = decode_image(exif_bytes(display, orientation), "e.jpg", BIG)
    assert d.orientation == orientation and "exif_rotated" in d.quirks
    assert d.orig_size == d.raw_size == (DISPLAY_H, DISPLAY_W)
    assert is_red(arr_of(d)[2, 2])
    assert mad(arr_of(d), display) < 6


def test_exif_orientation_1_is_no_rotation() -> None:
    img = Image.fromarray(displayed_image())
    exif = img.getexif()
    exif[0x0112] = 1
    d = decode_image(jpeg(img, exif=exif), "e.jpg", BIG)
    assert d.orientation == 1 and "exif_rotated" not in d.quirks
    assert d.orig_size == (DISPLAY_H, DISPLAY_W)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_png_decoded_as_displayed(orientation) -> None:
    display = displayed_image()
    d = decode_image(exif_bytes(display, orientation, "PNG"), "e.png", BIG)
    assert d.orientation == orientation and d.orig_size == (DISPLAY_H, DISPLAY_W)
    np.testing.assert_array_equal(arr_of(d), display)


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_raw_oriented_mask_aligned_to_exif_image(orientation) -> None:
    d = decode_image(exif_bytes(displayed_image(), orientation), "e.jpg", BIG)
    display_mask = box_mask(DISPLAY_H, DISPLAY_W, BLOCK)
    mask, quirks = decode_mask(png(to_raw(display_mask, orientation)), "e_mask.png", BIG)
    assert quirks == []
    assert mask.size == (DISPLAY_H, DISPLAY_W)  # stored like the raw image: tall

    aligned, quirks = align_mask(mask, d, "e_mask.png")
    assert quirks == ["mask_exif_aligned"]
    assert aligned.size == d.image.size
    np.testing.assert_array_equal(np.asarray(aligned.image), display_mask)

    # in the frame, the mask's block lands on the image's red block
    p = place(d.orig_size, (40, 40), "letterbox")
    img_f, mask_f = image_to_frame(d, p), mask_to_frame(aligned, p)
    assert set(np.unique(mask_f)) == {0, 1}
    red = np.array([is_red(px) for px in img_f.reshape(-1, 3)]).reshape(mask_f.shape)
    assert (red == mask_f.astype(bool)).mean() > 0.97


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_display_oriented_mask_left_alone(orientation) -> None:
    d = decode_image(exif_bytes(displayed_image(), orientation), "e.jpg", BIG)
    display_mask = box_mask(DISPLAY_H, DISPLAY_W, BLOCK)
    mask, _ = decode_mask(png(display_mask), "e_mask.png", BIG)
    aligned, quirks = align_mask(mask, d, "e_mask.png")
    assert quirks == []
    assert aligned is mask
    np.testing.assert_array_equal(np.asarray(aligned.image), display_mask)


@pytest.mark.parametrize("orientation", [6, 8])
def test_mask_with_its_own_exif_is_rotated_on_decode(orientation) -> None:
    display_mask = box_mask(DISPLAY_H, DISPLAY_W, BLOCK)
    mask, quirks = decode_mask(exif_bytes(display_mask, orientation, "PNG"), "m.png", BIG)
    assert quirks == []
    assert mask.size == (DISPLAY_W, DISPLAY_H)
    np.testing.assert_array_equal(np.asarray(mask.image), display_mask)


def test_raw_mask_of_other_size_aligned_then_resized() -> None:
    d = decode_image(exif_bytes(displayed_image(), 6), "e.jpg", BIG)
    small = box_mask(DISPLAY_H // 2, DISPLAY_W // 2, (0, 0, 4, 6))  # half size, display axes
    mask, _ = decode_mask(png(to_raw(small, 6)), "m.png", BIG)
    aligned, quirks = align_mask(mask, d, "m.png")
    assert quirks == ["mask_resized"]  # raw size doesn't match, so only resized
    assert aligned.size == (DISPLAY_W, DISPLAY_H)


# -- masks -------------------------------------------------------------------------------------
def test_mask_0_255_png_to_binary() -> None:
    m = box_mask(32, 48, (4, 6, 20, 30))
    mask, quirks = decode_mask(png(m), "m.png", BIG)
    assert quirks == []
    assert mask.image.mode == "L" and mask.size == (48, 32)
    np.testing.assert_array_equal(np.asarray(mask.image), m)
    out = mask_to_frame(mask, place((32, 48), (32, 48), "stretch"), quirks)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, m // 255)
    assert quirks == []  # clean 0/255: not thresholded


def test_mask_label_map_kept() -> None:
    m = box_mask(32, 48, (4, 6, 20, 30), fg=1)
    mask, quirks = decode_mask(png(m), "m.png", BIG)
    assert quirks == []
    np.testing.assert_array_equal(np.asarray(mask.image), m)  # values kept, not scaled
    same = mask_to_frame(mask, place((32, 48), (32, 48), "stretch"), quirks)
    np.testing.assert_array_equal(same, m)  # 1 stays foreground, not thresholded away
    up = mask_to_frame(mask, place((32, 48), (64, 96), "stretch"), quirks)
    np.testing.assert_array_equal(up, m.repeat(2, 0).repeat(2, 1))
    assert quirks == []


def test_empty_mask_is_all_background() -> None:
    mask, quirks = decode_mask(png(np.zeros((16, 16), np.uint8)), "m.png", BIG)
    assert quirks == []
    assert not mask_to_frame(mask, place((16, 16), (32, 32), "letterbox")).any()


def test_anti_aliased_mask_thresholded_at_128() -> None:
    m = np.zeros((32, 32), np.uint8)
    m[:, :8] = [0, 100, 127, 128, 129, 200, 255, 1]
    mask, quirks = decode_mask(png(m), "m.png", BIG)
    assert quirks == []
    np.testing.assert_array_equal(np.asarray(mask.image), m)
    out = mask_to_frame(mask, place((32, 32), (32, 32), "stretch"), quirks)
    assert out[0, :8].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
    assert set(np.unique(out)) == {0, 1}
    assert quirks == ["mask_thresholded"]


def test_anti_aliased_jpeg_mask_thresholded() -> None:
    m = box_mask(32, 48, (5, 7, 21, 37))  # edges inside 8x8 blocks: JPEG rings there
    mask, quirks = decode_mask(jpeg(m, quality=60), "m.jpg", BIG)
    assert quirks == []
    out = mask_to_frame(mask, place((32, 48), (32, 48), "stretch"), quirks)
    assert set(np.unique(out)) == {0, 1}
    assert (out == m // 255).mean() > 0.98
    assert quirks == ["mask_thresholded"]


def test_mask_of_other_size_resized_nearest() -> None:
    d = decode_image(png(noise(32, 48, 3)), "i.png", BIG)
    small = box_mask(16, 24, (2, 3, 10, 15))  # half size
    mask, _ = decode_mask(png(small), "m.png", BIG)
    aligned, quirks = align_mask(mask, d, "m.png")
    assert quirks == ["mask_resized"]
    assert aligned.size == (48, 32)
    big = np.asarray(aligned.image)
    assert set(np.unique(big)) == {0, 255}  # nearest: no blended values
    np.testing.assert_array_equal(big, small.repeat(2, 0).repeat(2, 1))
    out = mask_to_frame(aligned, place(d.orig_size, (64, 64), "letterbox"))
    assert set(np.unique(out)) == {0, 1}


def test_label_mask_of_odd_size_stays_binary() -> None:
    d = decode_image(png(noise(32, 48, 3)), "i.png", BIG)
    small = box_mask(13, 29, (2, 3, 10, 15), fg=1)
    mask, quirks = decode_mask(png(small), "m.png", BIG)
    aligned, align_quirks = align_mask(mask, d, "m.png")
    assert align_quirks == ["mask_resized"]
    assert aligned.size == (48, 32)
    assert set(np.unique(np.asarray(aligned.image))) == {0, 1}  # nearest: still labels
    for p in (place(d.orig_size, (32, 48), "stretch"), place(d.orig_size, (64, 64), "letterbox")):
        out = mask_to_frame(aligned, p, quirks)
        assert set(np.unique(out)) == {0, 1}  # foreground kept, not thresholded away
    assert quirks == []


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_rgb_mask_any_channel_marks_foreground(channel) -> None:
    m = box_mask(24, 32, (4, 4, 12, 20))
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[..., channel] = m
    mask, quirks = decode_mask(png(rgb), "m.png", BIG)
    assert quirks == []
    assert mask.image.mode == "L"
    np.testing.assert_array_equal(np.asarray(mask.image), m)
    out = mask_to_frame(mask, place((24, 32), (24, 32), "stretch"), quirks)
    np.testing.assert_array_equal(out, m // 255)
    assert quirks == []


def test_rgba_mask_ignores_alpha() -> None:
    m = box_mask(24, 32, (4, 4, 12, 20))
    rgba = np.dstack([m, m, m, np.full_like(m, 255)])  # opaque everywhere
    mask, _ = decode_mask(png(rgba), "m.png", BIG)
    np.testing.assert_array_equal(np.asarray(mask.image), m)


def test_palette_mask() -> None:
    idx = box_mask(24, 32, (4, 4, 12, 20), fg=1)
    pal = Image.frombytes("P", (32, 24), idx.tobytes())
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    data = png(pal)
    assert Image.open(io.BytesIO(data)).mode == "P"
    mask, _ = decode_mask(data, "m.png", BIG)
    np.testing.assert_array_equal(mask_to_frame(mask, place((24, 32), (24, 32), "stretch")), idx)


def test_bilevel_mask() -> None:
    m = box_mask(24, 32, (4, 4, 12, 20))
    data = png(Image.fromarray(m).convert("1"))
    assert Image.open(io.BytesIO(data)).mode == "1"
    mask, quirks = decode_mask(data, "m.png", BIG)
    assert quirks == []
    assert mask.image.mode == "L"
    np.testing.assert_array_equal(np.asarray(mask.image), m // 255)
    out = mask_to_frame(mask, place((24, 32), (24, 32), "stretch"), quirks)
    np.testing.assert_array_equal(out, m // 255)
    assert quirks == []


def test_tiff_16bit_mask() -> None:
    m16 = box_mask(24, 32, (4, 4, 12, 20)).astype(np.uint16) * 257  # 0 / 65535
    mask, quirks = decode_mask(tiff(m16), "m.tif", BIG)
    assert quirks == []
    assert set(np.unique(np.asarray(mask.image))) == {0, 255}
    out = mask_to_frame(mask, place((24, 32), (24, 32), "stretch"), quirks)
    np.testing.assert_array_equal(out, m16 // 65535)
    assert quirks == []


def test_png_16bit_mask() -> None:
    m16 = box_mask(24, 32, (4, 4, 12, 20)).astype(np.uint16) * 257  # 0 / 65535
    data = png(Image.fromarray(m16))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    mask, quirks = decode_mask(data, "m.png", BIG)
    assert quirks == []
    out = mask_to_frame(mask, place((24, 32), (48, 64), "stretch"), quirks)
    np.testing.assert_array_equal(out, (m16 // 65535).repeat(2, 0).repeat(2, 1))
    assert quirks == []


def test_tiff_uint8_mask_and_label_map() -> None:
    m = box_mask(24, 32, (4, 4, 12, 20))
    p = place((24, 32), (24, 32), "stretch")
    mask, quirks = decode_mask(tiff(m), "m.tif", BIG)
    np.testing.assert_array_equal(np.asarray(mask.image), m)
    np.testing.assert_array_equal(mask_to_frame(mask, p, quirks), m // 255)
    assert quirks == []
    labels, quirks = decode_mask(tiff(m // 255), "m.tiff", BIG)
    assert labels.labels is True
    np.testing.assert_array_equal(np.asarray(labels.image), m // 255)
    np.testing.assert_array_equal(mask_to_frame(labels, p, quirks), m // 255)
    assert quirks == []


def test_tiff_16bit_label_mask() -> None:
    m = box_mask(24, 32, (4, 4, 12, 20), fg=1).astype(np.uint16)
    mask, quirks = decode_mask(tiff(m), "m.tif", BIG)
    assert quirks == []
    np.testing.assert_array_equal(np.asarray(mask.image), m)
    out = mask_to_frame(mask, place((24, 32), (24, 32), "stretch"), quirks)
    np.testing.assert_array_equal(out, m)
    assert quirks == []


def test_mask_to_frame_accepts_label_array() -> None:
    m = box_mask(16, 32, (2, 4, 10, 20), fg=1)
    out = mask_to_frame(m, place((16, 32), (64, 64), "letterbox"))  # x2, rows 16..48
    assert out.shape == (64, 64)
    np.testing.assert_array_equal(out[16:48], m.repeat(2, 0).repeat(2, 1))
    assert not out[:16].any() and not out[48:].any()


BAD_MASKS = [
    ("empty.png", b""),
    ("x.png", b"not a mask at all\n" * 10),
    ("half.png", _truncated_png()),
    ("x.tif", b"not a tiff\n" * 10),
    ("empty.tif", b""),
]


@pytest.mark.parametrize(("name", "data"), BAD_MASKS, ids=[b[0] for b in BAD_MASKS])
def test_bad_mask_rejected(name, data) -> None:
    r = reject(decode_mask, data, name, BIG)
    assert r.reason == "bad_mask"
    assert name in r.detail


@pytest.mark.parametrize(("name", "fmt"), [("m.png", "png"), ("m.tif", "tif")])
def test_oversized_mask_is_bad_mask_with_sizes(name, fmt) -> None:
    m = box_mask(48, 64, (4, 4, 12, 20))
    data = png(m) if fmt == "png" else tiff(m)
    r = reject(decode_mask, data, name, 1000)
    assert r.reason == "bad_mask"
    assert "64x48" in r.detail and "1,000" in r.detail


# -- JPEG draft decoding -----------------------------------------------------------------------
@cache
def big_scene() -> np.ndarray:
    """A 1536x2048 scene with smooth gradients and a few large flat shapes."""
    h, w = 1536, 2048
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = (xx * 255 // w).astype(np.uint8)
    img[..., 1] = (yy * 255 // h).astype(np.uint8)
    img[..., 2] = 128
    img[200:700, 300:900] = (240, 20, 20)
    img[900:1400, 1200:1900] = (20, 20, 240)
    img[100:400, 1500:1900] = (250, 250, 250)
    return img


@cache
def big_jpeg(orientation: int = 1) -> bytes:
    if orientation == 1:
        return jpeg(big_scene(), quality=90)
    img = Image.fromarray(big_scene())
    exif = img.getexif()
    exif[0x0112] = orientation
    return jpeg(img, exif=exif)


def reference_frame(data: bytes, target: tuple[int, int]) -> np.ndarray:
    """Full-resolution decode + one resize, the slow path draft must match."""
    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return np.asarray(full.resize(target[::-1], Image.Resampling.BILINEAR))


def test_jpeg_draft_reduces_but_keeps_orig_size() -> None:
    data = big_jpeg()
    d = decode_image(data, "big.jpg", BIG, target=(96, 128))
    assert d.orig_size == (1536, 2048)
    assert d.raw_size == (1536, 2048)
    w, h = d.image.size
    assert (w, h) != (2048, 1536)  # decoded reduced (DCT scaling)
    assert w >= 128 and h >= 96  # but never below what the resize needs
    assert w * 1536 == h * 2048  # same aspect ratio
    p = place(d.orig_size, (96, 128), "stretch")
    framed = image_to_frame(d, p)
    assert framed.shape == (96, 128, 3)
    assert mad(framed, reference_frame(data, (96, 128))) < 6


def test_jpeg_without_target_is_full_resolution() -> None:
    d = decode_image(big_jpeg(), "big.jpg", BIG)
    assert d.image.size == (2048, 1536)


def test_jpeg_draft_letterbox() -> None:
    data = big_jpeg()
    d = decode_image(data, "big.jpg", BIG, target=(64, 64), policy="letterbox")
    p = place(d.orig_size, (64, 64), "letterbox")
    assert p.pad_box == (8, 0, 56, 64)
    assert d.image.size[0] >= 64 and d.image.size[1] >= 48
    assert d.image.size[0] < 2048
    framed = image_to_frame(d, p)
    assert (framed[:8] == 0).all() and (framed[56:] == 0).all()
    ref = reference_frame(data, (48, 64))
    assert mad(framed[8:56], ref) < 6


def test_jpeg_draft_respects_exif_axes() -> None:
    """Stored 2048x1536 with orientation 6 -> displayed 1536 wide x 2048 tall. A frame 16 high
    and 256 wide needs >= 256 displayed columns = raw rows; drafting on the wrong axes would
    pick 1/8 (192 raw rows) and leave too few pixels."""
    data = big_jpeg(6)
    d = decode_image(data, "big.jpg", BIG, target=(16, 256))
    assert d.orientation == 6
    assert d.orig_size == (2048, 1536) and d.raw_size == (1536, 2048)
    w, h = d.image.size
    assert w < 1536  # reduced
    assert w >= 256 and h >= 16
    assert w * 2048 == h * 1536  # displayed aspect ratio
    framed = image_to_frame(d, place(d.orig_size, (16, 256), "stretch"))
    assert mad(framed, reference_frame(data, (16, 256))) < 6


def test_jpeg_draft_greyscale() -> None:
    grey = big_scene()[..., 1]
    data = jpeg(grey, quality=90)
    d = decode_image(data, "g.jpg", BIG, target=(96, 128))
    assert d.image.mode == "L" and d.image.size[0] < 2048
    framed = image_to_frame(d, place(d.orig_size, (96, 128), "stretch"))
    ref = np.asarray(Image.open(io.BytesIO(data)).resize((128, 96), Image.Resampling.BILINEAR))
    assert mad(framed[..., 0], ref) < 6


# -- scaling of other dtypes, and known bugs ---------------------------------------------------
def test_int16_tiff_with_negatives_scaled_by_own_range() -> None:
    a = np.tile(np.linspace(-1000, 1000, 32).astype(np.int16), (16, 1))
    out = arr_of(decode_image(tiff(a), "ct.tif", BIG))
    assert out[:, 0].tolist() == [0] * 16 and out[:, -1].tolist() == [255] * 16
    assert (np.diff(out[0].astype(int)) >= 0).all()  # monotone


def test_float_tiff_outside_unit_range_scaled_by_own_range() -> None:
    f = np.tile(np.linspace(-3, 5, 32, dtype=np.float32), (16, 1))
    out = arr_of(decode_image(tiff(f), "f.tif", BIG))
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint32])
def test_other_integer_tiff_scaled_by_own_range(dtype) -> None:
    a = np.tile(np.linspace(0, 1000, 32).astype(dtype), (16, 1))
    out = arr_of(decode_image(tiff(a), "ct.tif", BIG))
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("hi", [1.0, 2.0])
def test_float_tiff_with_one_nan_is_not_blanked(hi) -> None:
    f = np.tile(np.linspace(0, hi, 32, dtype=np.float32), (16, 1))
    f[0, 0] = np.nan
    try:
        d = decode_image(tiff(f), "f.tif", BIG)
    except Rejected as r:  # rejecting the file would be a fix too
        assert r.reason in REASONS
        return
    out = arr_of(d)
    assert (out[1:, -1] == 255).all() and (out[1:, 0] == 0).all()


def test_uint16_soft_mask_thresholded() -> None:
    m = np.zeros((16, 16), np.uint16)
    m[:, 4:8] = 13107  # 0.2 of full range
    m[:, 8:] = 58982  # 0.9 of full range
    mask, quirks = decode_mask(tiff(m), "m.tif", BIG)
    out = mask_to_frame(mask, place((16, 16), (16, 16), "stretch"), quirks)
    assert not out[:, :8].any() and out[:, 8:].all()
    assert quirks == ["mask_thresholded"]  # soft floats are thresholded (at 0.5) in decode


def test_float_binary_mask_is_label_map() -> None:
    m = box_mask(16, 16, (2, 2, 10, 10), fg=1).astype(np.float32)
    mask, quirks = decode_mask(tiff(m), "m.tif", BIG)
    assert quirks == []
    np.testing.assert_array_equal(np.asarray(mask.image), m.astype(np.uint8))  # not x255
    out = mask_to_frame(mask, place((16, 16), (16, 16), "stretch"), quirks)
    np.testing.assert_array_equal(out, m.astype(np.uint8))
    assert quirks == []


def test_soft_float_mask_thresholded_like_uint8() -> None:
    m = np.zeros((16, 16), np.float32)
    m[:, 4:8] = 0.2
    m[:, 8:] = 0.9
    mask, quirks = decode_mask(tiff(m), "m.tif", BIG)
    out = mask_to_frame(mask, place((16, 16), (16, 16), "stretch"), quirks)
    assert not out[:, :8].any() and out[:, 8:].all()
    assert quirks == ["mask_thresholded"]  # soft floats are thresholded (at 0.5) in decode


def test_faint_soft_float_mask_is_not_mistaken_for_labels() -> None:
    m = np.zeros((16, 16), np.float32)
    m[:, 8:] = 0.003  # every probability below 0.5: no foreground at all
    mask, quirks = decode_mask(tiff(m), "m.tif", BIG)
    out = mask_to_frame(mask, place((16, 16), (16, 16), "stretch"), quirks)
    assert not out.any() and quirks == ["mask_thresholded"]


def test_antialiased_uint8_mask_sampled_at_0_and_1_is_not_labels() -> None:
    m = np.zeros((64, 64), np.uint8)
    m[::4, ::4] = 1  # faint values where the nearest-neighbour downscale samples
    m[1::4, 1::4] = 255
    mask, quirks = decode_mask(png(m), "m.png", BIG)
    out = mask_to_frame(mask, place((64, 64), (16, 16), "stretch"), quirks)
    assert not out.any()  # value 1 of 255 is background, not a label


# -- decode limits count every byte (issue 11, item 3) ------------------------------------------
def test_tiff_of_many_samples_is_refused_by_its_bytes_before_decoding() -> None:
    """200 samples per pixel: 40,000 pixels pass a 50,000-pixel limit, but decoding would
    allocate 8 MB, over 50,000 x 8 bytes."""
    deep = np.zeros((200, 200, 200), np.uint8)
    data = tiff(deep, photometric="minisblack", planarconfig="contig", compression="zlib")
    assert len(data) < 100_000  # a small file
    for fn in (decode_image, decode_mask):
        r = reject(fn, data, "deep.tif", 50_000)
        assert r.reason in ("too_large", "bad_mask")
        assert "deep.tif" in r.detail and "8,000,000 bytes" in r.detail and "400,000" in r.detail


def test_tiff_volume_page_is_counted_whole_then_refused_as_not_an_image() -> None:
    vol = np.zeros((4, 32, 32, 3), np.uint8)
    data = tiff(vol, volumetric=True, tile=(16, 16), photometric="rgb")
    assert reject(decode_image, data, "vol.tif", 32 * 32).reason == "too_large"  # 12 kB > 8 kB
    r = reject(decode_image, data, "vol.tif", BIG)
    assert r.reason == "unreadable" and "4 dimensions" in r.detail


def test_16bit_rgba_at_the_pixel_limit_is_within_the_byte_limit() -> None:
    arr = np.full((16, 16, 4), 40000, np.uint16)
    assert decode_image(tiff(arr), "rgba16.tif", 16 * 16).orig_size == (16, 16)


def test_decode_errors_name_the_file_not_the_buffer() -> None:
    for data, name in ((b"this is not an image\n" * 20, "x.jpg"), (b"junk" * 10, "m.png")):
        for fn in (decode_image, decode_mask):
            r = reject(fn, data, name, BIG)
            assert name in r.detail
            assert "BytesIO" not in r.detail and "object at 0x" not in r.detail


# -- which mask pixels are foreground (issue 11, low) -------------------------------------------
LABELS = box_mask(16, 24, (2, 2, 8, 10), fg=1) + box_mask(16, 24, (9, 12, 14, 20), fg=3)


def _framed(data: bytes, positive: str = "auto") -> tuple[np.ndarray, list[str]]:
    mask, quirks = decode_mask(data, "m.png", BIG, positive)  # type: ignore[arg-type]
    return mask_to_frame(mask, place((16, 24), (16, 24), "stretch"), quirks), quirks


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_label_map_is_foreground_where_nonzero_under_auto(fmt) -> None:
    data = png(LABELS) if fmt == "png" else tiff(LABELS.astype(np.uint16))
    out, quirks = _framed(data)
    np.testing.assert_array_equal(out, LABELS != 0)
    assert quirks == ["mask_label_map"]


def test_explicit_ge128_on_a_label_map_says_it_emptied_the_mask() -> None:
    out, quirks = _framed(png(LABELS), "ge128")
    assert not out.any() and quirks == ["mask_thresholded", "mask_emptied"]


def test_explicit_nonzero_counts_faint_pixels() -> None:
    m = box_mask(16, 24, (2, 2, 8, 10), fg=255)
    m[0, 0] = 40
    out, quirks = _framed(png(m), "nonzero")
    np.testing.assert_array_equal(out, m != 0)
    assert quirks == []
    out, quirks = _framed(png(m))  # auto: 0/255 with noise is thresholded at 128
    np.testing.assert_array_equal(out, m >= 128)
    assert quirks == ["mask_thresholded"]


@pytest.mark.parametrize("colour", [0, 255])
def test_alpha_only_mask_uses_its_alpha(colour) -> None:
    m = box_mask(16, 24, (3, 4, 9, 15))
    rgba = np.dstack([np.full_like(m, colour)] * 3 + [m])
    out, quirks = _framed(png(rgba))
    np.testing.assert_array_equal(out, m != 0)
    assert quirks == ["mask_from_alpha"]


def test_a_decompression_bomb_quotes_our_limit_not_pillows() -> None:
    """A PNG whose header claims 20000 x 20000, over twice Pillow's own limit: Pillow refuses
    to open it, and the message quotes the caller's limit, not Pillow's 178,956,970."""
    tiny = png(Image.new("L", (1, 1)))
    body = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))
    data = tiny[:8] + ihdr + tiny[33:]  # 8 signature + 25 IHDR bytes replaced
    r = reject(decode_image, data, "bomb.png", 1_000_000)
    assert r.reason == "too_large" and "bomb.png" in r.detail and "1,000,000" in r.detail
    assert "178,956,970" not in r.detail and "400,000,000 pixels" in r.detail
