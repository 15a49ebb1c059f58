"""The PNG fast path: hand-filtered rows decode to known pixels, real encoders' masks decode to
exactly what Pillow gives, and everything outside the fast path is handed back (None)."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from segflow.imaging import decode_mask
from segflow.png import decode_grey8, encode, unfilter


def _png(rows: list[bytes], w: int, *, depth=8, colour=0, interlace=0, extra=b"") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", w, len(rows), depth, colour, 0, 0, interlace)
    body = zlib.compress(b"".join(rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", body)
        + chunk(b"IEND", b"")
    )


def test_none_sub_and_up_rows_by_hand():
    # pixels:      [10, 20, 30], [10, 25, 30], [250, 5, 0], [0, 0, 1]
    rows = [
        bytes([0, 10, 20, 30]),  # None: as stored
        bytes([2, 0, 5, 0]),  # Up: + the row above
        bytes([1, 250, 11, 251]),  # Sub: + the byte to the left, mod 256
        bytes([2, 6, 251, 1]),  # Up again, wrapping: 250+6, 5+251, 0+1
    ]
    got = decode_grey8(_png(rows, 3))
    want = np.array([[10, 20, 30], [10, 25, 30], [250, 5, 0], [0, 0, 1]], np.uint8)
    np.testing.assert_array_equal(got, want)


def test_a_run_of_up_rows_at_the_top_starts_from_zeros():
    kinds = np.array([2, 2, 0])
    rows = np.array([[1, 2], [1, 1], [7, 7]], np.uint8)
    np.testing.assert_array_equal(unfilter(kinds, rows), [[1, 2], [2, 3], [7, 7]])


@pytest.mark.parametrize("encoder", ["pillow", "pillow-optimize", "opencv"])
def test_real_encoders_masks_match_pillow(encoder):
    rng = np.random.default_rng(0)
    mask = np.zeros((120, 160), np.uint8)
    for _ in range(6):
        centre = (int(rng.integers(160)), int(rng.integers(120)))
        axes = (int(rng.integers(5, 40)), int(rng.integers(5, 30)))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, -1)
    mask[::7, ::5] = rng.integers(0, 256, mask[::7, ::5].shape)  # noise: exercise every filter
    if encoder == "opencv":
        data = cv2.imencode(".png", mask)[1].tobytes()
    else:
        buf = io.BytesIO()
        Image.fromarray(mask).save(buf, "PNG", optimize=encoder == "pillow-optimize")
        data = buf.getvalue()
    got = decode_grey8(data)
    if got is None:  # an encoder chose Average/Paeth rows: the caller's Pillow path takes them
        kinds = np.frombuffer(zlib.decompress(_idat(data)), np.uint8)[:: 160 + 1]
        assert set(kinds) - {0, 1, 2}
    else:
        np.testing.assert_array_equal(got, mask)


def _idat(data: bytes) -> bytes:
    pos, out = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            out += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    return out


@pytest.mark.parametrize(
    "case",
    ["rgb", "16-bit", "interlaced", "paeth", "average", "bad-crc", "truncated", "exif", "jpeg"],
)
def test_everything_else_is_left_to_pillow(case):
    row = bytes([0, 1, 2])
    data = {
        "rgb": _png([bytes([0, 1, 2, 3, 4, 5, 6])], 2, colour=2),
        "16-bit": _png([bytes([0, 0, 1, 0, 2])], 2, depth=16),
        "interlaced": _png([row], 2, interlace=1),
        "paeth": _png([row, bytes([4, 1, 1])], 2),
        "average": _png([row, bytes([3, 1, 1])], 2),
        "bad-crc": _flip(_png([row], 2), -16),  # the IDAT's CRC (IEND is the last 12 bytes)
        "truncated": _png([row, row], 2)[:-30],
        "exif": _png(
            [row], 2, extra=struct.pack(">I", 0) + b"eXIf" + struct.pack(">I", zlib.crc32(b"eXIf"))
        ),
        "jpeg": b"\xff\xd8\xff\xe0" + b"\0" * 20,
    }[case]
    assert decode_grey8(data) is None


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def test_decode_mask_takes_the_fast_path_and_keeps_its_meaning():
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 20:60] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, "PNG")
    decoded, quirks = decode_mask(buf.getvalue(), "m.png", max_pixels=10**6)
    np.testing.assert_array_equal(np.asarray(decoded.image), mask)
    assert (
        type(decoded.image) is Image.Image
    )  # built from the fast path's array, not a PngImageFile
    assert decoded.labels is False and quirks == []
    labels = io.BytesIO()
    Image.fromarray((mask > 0).astype(np.uint8)).save(labels, "PNG")
    assert decode_mask(labels.getvalue(), "m.png", max_pixels=10**6)[0].labels is True


@pytest.mark.parametrize("shape", [(37, 53), (37, 53, 2), (37, 53, 3), (37, 53, 4), (1, 1, 3)])
def test_encode_round_trips_through_pillow_and_opencv(shape):
    arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    data = encode(arr)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if len(shape) == 3 and shape[2] in (3, 4):  # OpenCV hands colour back as BGR(A)
        back = back[..., [2, 1, 0, *([3] if shape[2] == 4 else [])]]
    if len(shape) == 3 and shape[2] == 2:  # and grey+alpha as BGRA
        back = back[..., [0, 3]]
    np.testing.assert_array_equal(back, arr)
    if len(shape) == 2:
        np.testing.assert_array_equal(decode_grey8(data), arr)  # Up rows: the fast decode path


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 5), np.uint8), np.zeros((0, 4), np.uint8)]
)
def test_encode_refuses_what_png_cannot_hold_as_given(bad):
    with pytest.raises(ValueError, match="encode needs a non-empty uint8"):
        encode(bad)
