"""Each layout end to end, on files generated in the real formats, local and on S3."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from segflow.ingest import Dataset, IngestConfig, ingest
from tests.makers import (
    coded_pair,
    colour_of,
    lesion_box,
    png_bytes,
    write_isic,
    write_mhd,
    write_nerve,
)


def _cfg(loc, **kw) -> IngestConfig:
    return IngestConfig(storage=loc.storage, workers=2, **kw)


def test_isic_rows_match_their_files(location):
    src = location.store("raw")
    ids = write_isic(src, range(6))
    res = ingest(
        _cfg(location, layout="isic", source=src.url, dataset=location.url("ds"), size=(48, 64))
    )
    assert (res.status, res.n_images, res.n_rejected) == ("ingested", 6, 0)
    ds = Dataset.open(location.url("ds"), location.storage)
    assert sorted(ds.ids) == ids
    assert ds.group["images"].shape == (6, 48, 64, 3)
    assert ds.group["masks"].dtype == np.uint8
    for i, image_id in enumerate(ds.ids):
        k = int(image_id.split("_")[1])
        img, mask = ds.image(i), ds.mask(i)
        # the background colour identifies the source file; the mask is its exact rectangle
        assert np.abs(img[2, 2].astype(int) - colour_of(k)).max() < 12
        t, left, b, r = lesion_box(k, 48, 64)
        expected = np.zeros((48, 64), np.uint8)
        expected[t:b, left:r] = 1
        np.testing.assert_array_equal(mask, expected)
    assert ds.column("orig_size").tolist() == [[48, 64]] * 6
    assert ds.column("has_mask").all()
    assert ds.attrs["layout"] == "isic" and ds.attrs["size"] == [48, 64]
    assert len(set(ds.column("content_hashes").tolist())) == 6


def test_isic_masks_in_their_own_folder_and_letterbox(local):
    src, masks = local.store("images"), local.store("masks")
    write_isic(src, range(3), h=32, w=64, masks=masks)
    res = ingest(
        _cfg(
            local,
            layout="isic",
            source=src.url,
            masks=masks.url,
            dataset=local.url("ds"),
            size=(64, 64),
            resize="letterbox",
        )
    )
    assert res.n_images == 3
    ds = Dataset.open(local.url("ds"))
    # 32x64 letterboxed into 64x64: content rows 16..48, zero padding above and below
    assert ds.column("pad_box").tolist() == [[16, 0, 48, 64]] * 3
    assert ds.image(0)[:16].max() == 0 and ds.image(0)[48:].max() == 0
    assert ds.mask(0)[:16].max() == 0 and ds.mask(0)[16:48].max() == 1


def test_nerve_groups_by_subject_and_test_images_have_no_mask(location):
    src = location.store("nerve")
    write_nerve(src, {1: 3, 7: 2}, n_test=2)
    res = ingest(_cfg(location, layout="nerve", source=src.url, dataset=location.url("ds")))
    assert (res.n_images, res.n_rejected) == (7, 0)
    ds = Dataset.open(location.url("ds"), location.storage)
    by_id = dict(zip(ds.ids, ds.column("groups").tolist(), strict=True))
    assert by_id == {"1_1": "1", "1_2": "1", "1_3": "1", "7_1": "7", "7_2": "7", "1": "", "2": ""}
    has = dict(zip(ds.ids, ds.column("has_mask").tolist(), strict=True))
    assert has["1_1"] and not has["1"] and not has["2"]
    assert set(ds.column("orig_channels").tolist()) == {1}
    i = ds.ids.index("1_1")
    img = ds.image(i)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


def test_folder_layout_greyscale_with_name_template(local):
    src, masks = local.store("em/images"), local.store("em/masks")
    for k in range(4):
        img, mask = coded_pair(k, 40, 40)
        src.write_bytes(f"{k}.png", png_bytes(img[..., 0]))
        masks.write_bytes(f"{k}.png", png_bytes(mask))
    res = ingest(
        _cfg(
            local,
            layout="folder",
            source=src.url,
            masks=masks.url,
            mask_template="{name}",
            image_glob="*.png",
            dataset=local.url("ds"),
            size=(40, 40),
        )
    )
    assert (res.n_images, res.n_rejected) == (4, 0)
    ds = Dataset.open(local.url("ds"))
    assert sorted(ds.ids) == ["0", "1", "2", "3"]
    k = ds.ids.index("2")
    t, left, b, r = lesion_box(2, 40, 40)
    assert ds.mask(k)[t:b, left:r].all() and ds.mask(k).sum() == (b - t) * (r - left)


def test_folder_layout_same_folder_masks_are_not_images(local):
    src = local.store("mixed")
    for k in range(3):
        img, mask = coded_pair(k, 32, 32)
        src.write_bytes(f"im{k}.png", png_bytes(img))
        src.write_bytes(f"im{k}_mask.png", png_bytes(mask))
    res = ingest(_cfg(local, layout="folder", source=src.url, dataset=local.url("ds")))
    assert (res.n_images, res.n_rejected) == (3, 0)
    assert sorted(Dataset.open(local.url("ds")).ids) == ["im0", "im1", "im2"]


def test_luna_slices_and_circle_masks_follow_world_coordinates(location):
    src = location.store("luna")
    # 20 slices of 64x64, spacing (x, y, z) = (0.5, 0.5, 2.0) mm, origin shifted
    spacing, origin = (0.5, 0.5, 2.0), (-10.0, -20.0, -100.0)
    vol = np.full((20, 64, 64), -1000, np.int16)
    write_mhd(src, "1.2.3", vol, spacing, origin)
    write_mhd(src, "9.9.9", vol, spacing, origin)  # no nodules: yields no slices
    # nodule at voxel (x=40, y=24, z=10), diameter 8 mm -> radius 4 mm = 2 slices, 8 voxels
    centre = (origin[0] + 40 * 0.5, origin[1] + 24 * 0.5, origin[2] + 10 * 2.0)
    x, y, z = centre
    rows = [
        {"seriesuid": "1.2.3", "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": 8.0},
        {"seriesuid": "4.4.4", "coordX": 0, "coordY": 0, "coordZ": 0, "diameter_mm": 5.0},
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    src.write_bytes("annotations.csv", buf.getvalue().encode())

    res = ingest(
        _cfg(location, layout="luna", source=src.url, dataset=location.url("ds"), size=(64, 64))
    )
    ds = Dataset.open(location.url("ds"), location.storage)
    # |k - 10| * 2 mm <= 4 mm  ->  slices 8..12
    assert ds.ids == [f"1.2.3_z{k:04d}" for k in range(8, 13)]
    assert set(ds.column("groups").tolist()) == {"1.2.3"}
    assert res.rejected_by_reason == {"missing_volume": 1}
    centre_slice = ds.mask(ds.ids.index("1.2.3_z0010"))
    ys, xs = np.nonzero(centre_slice)
    assert abs(xs.mean() - 40) < 0.5 and abs(ys.mean() - 24) < 0.5
    assert 7 <= (xs.max() - xs.min()) / 2 <= 8  # radius 4 mm / 0.5 mm = 8 voxels
    edge = ds.mask(ds.ids.index("1.2.3_z0008"))
    assert 0 < edge.sum() < centre_slice.sum()  # the sphere's cap is a smaller circle
    assert ds.image(0).max() == 0  # -1000 HU is the bottom of the lung window


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK"])
def test_unusual_modes_are_ingested_as_rgb(local, mode):
    src = local.store("raw")
    img, mask = coded_pair(3, 32, 32)
    pil = Image.fromarray(img)
    if mode == "CMYK":
        buf = io.BytesIO()
        pil.convert("CMYK").save(buf, "JPEG", quality=95)
        data, name = buf.getvalue(), "ISIC_0000003.jpg"
    else:
        data, name = png_bytes(pil.convert(mode)), "ISIC_0000003.png"
    src.write_bytes(name, data)
    src.write_bytes("ISIC_0000003_segmentation.png", png_bytes(mask))
    res = ingest(_cfg(local, layout="isic", source=src.url, dataset=local.url("ds"), size=(32, 32)))
    assert res.n_images == 1 and res.quirks == {f"mode_{mode}": 1}
    ds = Dataset.open(local.url("ds"))
    assert np.abs(ds.image(0)[1, 1].astype(int) - colour_of(3)).max() < 12
    assert ds.column("orig_channels").tolist() == [4 if mode != "P" else 3]
