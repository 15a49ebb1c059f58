"""The dataset's pixel arrays: rows written chunk by chunk (bypassing zarr's setitem) read back
through zarr exactly, under flat chunk keys; any other layout is left to zarr."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from segflow.ingest.writer import create_or_check, ensure_capacity, row_encoder


def _geometry(size: tuple[int, int]) -> dict:
    return {"size": size, "resize": "stretch", "layout": "folder", "mask_positive": "auto"}


def test_rows_written_chunk_by_chunk_read_back_through_zarr(local):
    ds = local.store("ds.zarr")
    g = create_or_check(ds, _geometry((24, 40)))
    ensure_capacity(g, 5, with_masks=True)
    rng = np.random.default_rng(0)
    rows = {i: rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for i in (0, 3, 4)}
    masks = {i: (rng.random((24, 40)) > 0.5).astype(np.uint8) for i in rows}
    for name, data in (("images", rows), ("masks", masks)):
        encode = row_encoder(g[name])
        assert encode is not None
        for i, row in data.items():
            key, payload = encode(i, row)
            assert key == f"{name}/c.{i}.0.0{'.0' if name == 'images' else ''}"  # one folder
            ds.write_bytes(key, payload)
    g = zarr.open_group(ds.zarr_store(read_only=True), mode="r")
    for i in rows:
        np.testing.assert_array_equal(g["images"][i], rows[i])
        np.testing.assert_array_equal(g["masks"][i], masks[i])
    np.testing.assert_array_equal(g["images"][1], 0)  # never written: the fill value


def test_a_row_of_the_wrong_shape_or_past_the_end_is_refused(local):
    g = create_or_check(local.store("ds.zarr"), _geometry((8, 8)))
    ensure_capacity(g, 1, with_masks=False)
    encode = row_encoder(g["images"])
    with pytest.raises(ValueError, match=r"\(8, 9, 3\) for images of uint8 \(8, 8, 3\)"):
        encode(0, np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(IndexError, match="row 1 is outside images's 1 rows"):
        encode(1, np.zeros((8, 8, 3), np.uint8))  # zarr's setitem would refuse it too


def test_other_layouts_are_left_to_zarr(local):
    g = zarr.open_group(local.store("other.zarr").zarr_store(), mode="w")
    blosc = g.create_array(
        "a", shape=(4, 8, 8), chunks=(1, 8, 8), dtype="uint8", compressors=[BloscCodec()]
    )
    two_rows = g.create_array("b", shape=(4, 8, 8), chunks=(2, 8, 8), dtype="uint8")
    floats = g.create_array("c", shape=(4, 8, 8), chunks=(1, 8, 8), dtype="float32")
    assert row_encoder(blosc) is None
    assert row_encoder(two_rows) is None
    assert row_encoder(floats) is None
