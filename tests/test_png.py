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


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(rows: list[bytes], w: int, *, depth=8, colour=0, interlace=0, extra=b"", h=None) -> bytes:
    header = struct.pack(">IIBBBBB", w, h or len(rows), depth, colour, 0, 0, interlace)
    body = zlib.compress(b"".join(rows))
    idat = _chunk(b"IDAT", body)
    return SIG + _chunk(b"IHDR", header) + extra + idat + _chunk(b"IEND", b"")


SIG = b"\x89PNG\r\n\x1a\n"


def _fast(data: bytes):
    """decode_grey8 with the (W, H) the file's header states, as a caller that checked it."""
    w, h = struct.unpack(">II", data[16:24]) if len(data) >= 24 else (0, 0)
    return decode_grey8(data, (w, h))


def test_none_sub_and_up_rows_by_hand():
    # pixels:      [10, 20, 30], [10, 25, 30], [250, 5, 0], [0, 0, 1]
    rows = [
        bytes([0, 10, 20, 30]),  # None: as stored
        bytes([2, 0, 5, 0]),  # Up: + the row above
        bytes([1, 250, 11, 251]),  # Sub: + the byte to the left, mod 256
        bytes([2, 6, 251, 1]),  # Up again, wrapping: 250+6, 5+251, 0+1
    ]
    got = _fast(_png(rows, 3))
    want = np.array([[10, 20, 30], [10, 25, 30], [250, 5, 0], [0, 0, 1]], np.uint8)
    np.testing.assert_array_equal(got, want)


def test_a_run_of_up_rows_at_the_top_starts_from_zeros():
    kinds = np.array([2, 2, 0])
    rows = np.array([[1, 2], [1, 1], [7, 7]], np.uint8)
    np.testing.assert_array_equal(unfilter(kinds, rows), [[1, 2], [2, 3], [7, 7]])


def _encoded(mask: np.ndarray, encoder: str) -> bytes:
    if encoder == "segflow":
        return encode(mask)
    if encoder == "opencv":
        return cv2.imencode(".png", mask)[1].tobytes()
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, "PNG", optimize=encoder == "pillow-optimize")
    return buf.getvalue()


def _ellipses(noisy: bool) -> np.ndarray:
    rng = np.random.default_rng(0)
    mask = np.zeros((120, 160), np.uint8)
    for _ in range(6):
        centre = (int(rng.integers(160)), int(rng.integers(120)))
        axes = (int(rng.integers(5, 40)), int(rng.integers(5, 30)))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, -1)
    if noisy:  # photo-like rows: encoders pick Average/Paeth for some
        mask[::7, ::5] = rng.integers(0, 256, mask[::7, ::5].shape)
    return mask


@pytest.mark.parametrize("encoder", ["opencv", "segflow"])  # Sub rows, Up rows
def test_real_encoders_masks_take_the_fast_path_exactly(encoder):
    mask = _ellipses(noisy=False)
    data = _encoded(mask, encoder)
    kinds = set(np.frombuffer(zlib.decompress(_idat(data)), np.uint8)[:: 160 + 1].tolist())
    assert kinds <= {0, 1, 2} and kinds != {0}  # real filtering happened, all of it undoable
    np.testing.assert_array_equal(_fast(data), mask)


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("encoder", ["pillow", "pillow-optimize", "opencv"])
def test_any_encoders_masks_are_exact_or_left_to_pillow(encoder, noisy):
    # Pillow often picks Paeth rows even for clean masks: those decode through Pillow
    mask = _ellipses(noisy)
    data = _encoded(mask, encoder)
    got = _fast(data)
    if got is None:  # the encoder chose Average/Paeth rows: the caller's Pillow path takes them
        kinds = np.frombuffer(zlib.decompress(_idat(data)), np.uint8)[:: 160 + 1]
        assert set(kinds.tolist()) - {0, 1, 2}
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


def _splice_ihdr(data: bytes, extra: bytes) -> bytes:
    """The same PNG with ``extra`` bytes appended to its IHDR (and a valid CRC)."""
    return data[:8] + _chunk(b"IHDR", data[16:29] + extra) + data[33:]


def _split_idat(data: bytes) -> bytes:
    """The same PNG with its IDAT cut in two and a gAMA chunk between the halves."""
    (n,) = struct.unpack(">I", data[33:37])
    body = data[41 : 41 + n]
    halves = _chunk(b"IDAT", body[:4]) + _chunk(b"gAMA", b"\0\0\0\1") + _chunk(b"IDAT", body[4:])
    return data[:33] + halves + data[45 + n :]


def _second_ihdr(data: bytes) -> bytes:
    """A 1x1 header after the pixels: it must not replace the one the caller checked."""
    late = _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    return data[:-12] + late + _chunk(b"IEND", b"")


ROW = bytes([0, 1, 2])
LEFT_TO_PILLOW = {
    "rgb": lambda: _png([bytes([0, 1, 2, 3, 4, 5, 6])], 2, colour=2),
    "16-bit": lambda: _png([bytes([0, 0, 1, 0, 2])], 2, depth=16),
    "interlaced": lambda: _png([ROW], 2, interlace=1),
    "paeth": lambda: _png([ROW, bytes([4, 1, 1])], 2),
    "average": lambda: _png([ROW, bytes([3, 1, 1])], 2),
    "bad-crc": lambda: _flip(_png([ROW], 2), -16),  # the IDAT's CRC (IEND: the last 12 bytes)
    "truncated": lambda: _png([ROW, ROW], 2)[:-30],
    "exif": lambda: _png([ROW], 2, extra=_chunk(b"eXIf", b"")),
    # an orientation in XMP is applied by Pillow, so any text chunk leaves the file to it
    "xmp": lambda: _png([ROW], 2, extra=_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x/>")),
    "long-ihdr": lambda: _splice_ihdr(_png([ROW], 2), b"\0"),
    "second-ihdr": lambda: _second_ihdr(_png([ROW], 2)),
    "split-idat": lambda: _split_idat(_png([ROW, ROW], 2)),
    "too-long": lambda: _png([ROW, ROW, ROW], 2, h=2),  # more rows than the header says
    "too-short": lambda: _png([ROW], 2, h=2),
    "jpeg": lambda: b"\xff\xd8\xff\xe0" + b"\0" * 20,
}


@pytest.mark.parametrize("case", sorted(LEFT_TO_PILLOW))
def test_everything_else_is_left_to_pillow(case):
    assert _fast(LEFT_TO_PILLOW[case]()) is None


def test_the_helpers_above_make_decodable_pngs_when_left_alone():
    # so each case above fails for its own reason, not for a broken helper
    assert _fast(_png([ROW, ROW], 2)) is not None
    data = _split_idat(_png([ROW, ROW], 2))
    assert np.asarray(Image.open(io.BytesIO(_png([ROW, ROW], 2)))).shape == (2, 2)
    assert data.count(b"IDAT") == 2


def test_a_small_file_claiming_huge_rows_is_never_inflated_past_its_header():
    """~100 kB of deflate that inflates to 100 MB, under a 10x10 header: the decoder stops at
    the 110 bytes the header needs and leaves the file to Pillow."""
    import tracemalloc

    bomb = zlib.compress(b"\0" * 100_000_000, 9)
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 10, 10, 8, 0, 0, 0, 0))
    data = SIG + header + _chunk(b"IDAT", bomb) + _chunk(b"IEND", b"")
    tracemalloc.start()
    try:
        assert decode_grey8(data, (10, 10)) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"inflating used {peak:,} bytes"


def test_a_header_that_differs_from_the_checked_size_is_left_to_pillow():
    data = _png([ROW] * 3, 2)
    assert decode_grey8(data, (2, 3)) is not None
    assert decode_grey8(data, (3, 2)) is None


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
        np.testing.assert_array_equal(_fast(data), arr)  # Up rows: the fast decode path


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 5), np.uint8), np.zeros((0, 4), np.uint8)]
)
def test_encode_refuses_what_png_cannot_hold_as_given(bad):
    with pytest.raises(ValueError, match="encode needs a non-empty uint8"):
        encode(bad)
