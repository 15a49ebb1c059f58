"""Issue 11 at the ingest level: label-map masks, links, duplicate nerve ids, LUNA decode
limits, and the dataset contract checked by every reader."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from segflow.dataset import Dataset, open_group
from segflow.errors import DatasetError
from segflow.ingest import IngestConfig, ingest
from segflow.ingest.luna import draw_ellipses
from tests.makers import coded_pair, jpeg_bytes, png_bytes, tiff_bytes, write_isic


def _report(local) -> dict:
    return local.store("ds").read_json("report.json")


def _reasons(local) -> dict[str, str]:
    return {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in _report(local)["rejected"]}


# -- label maps -----------------------------------------------------------------------------
def _label_archive(src) -> None:
    write_isic(src, range(2))  # 0/255 masks
    img, mask = coded_pair(5)
    src.write_bytes("ISIC_0000005.jpg", jpeg_bytes(img))
    src.write_bytes("ISIC_0000005_segmentation.png", png_bytes((mask > 0).astype(np.uint8) * 2))


def test_label_map_mask_is_kept_and_named_in_the_report(local):
    src = local.store("raw")
    _label_archive(src)
    res = ingest(
        IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=(48, 64))
    )
    ds = Dataset.open(local.url("ds"))
    row = ds.ids.index("ISIC_0000005")
    np.testing.assert_array_equal(ds.mask(row), coded_pair(5)[1] > 0)  # not emptied
    assert res.quirks == {"mask_label_map": 1}
    assert _report(local)["row_quirks"] == {"ISIC_0000005": ["mask_label_map"]}


def test_cli_mask_positive_ge128_empties_a_label_map_and_says_so(local):
    src = local.store("raw")
    _label_archive(src)
    args = [sys.executable, "-m", "segflow.cli", "ingest", "--layout", "isic", "--source"]
    args += [src.url, "--dataset", local.url("ds"), "--size", "48", "64", "--json"]
    res = subprocess.run([*args, "--mask-positive", "ge128"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["quirks"] == {
        "mask_emptied": 1,
        "mask_thresholded": 1,
    }
    ds = Dataset.open(local.url("ds"))
    assert not ds.mask(ds.ids.index("ISIC_0000005")).any()
    assert ds.attrs["mask_positive"] == "ge128"
    # the rule is part of the dataset: appending with another one would mix two rules
    with pytest.raises(DatasetError, match=r"mask_positive=ge128.*mask_positive=nonzero"):
        ingest(
            IngestConfig(
                layout="isic",
                source=src.url,
                dataset=local.url("ds"),
                size=(48, 64),
                mask_positive="nonzero",
            )
        )


# -- links and names ---------------------------------------------------------------------------
def test_links_dangling_or_outside_the_source_are_unreadable(local, tmp_path):
    src = local.store("raw")
    write_isic(src, range(2))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    img, mask = coded_pair(3)
    (outside / "ISIC_0000003.jpg").write_bytes(jpeg_bytes(img))
    root = src.root
    os.symlink(outside / "ISIC_0000003.jpg", f"{root}/ISIC_0000003.jpg")
    src.write_bytes("ISIC_0000003_segmentation.png", png_bytes(mask))
    os.symlink(f"{root}/gone.jpg", f"{root}/ISIC_0000004.jpg")
    src.write_bytes("ISIC_0000004_segmentation.png", png_bytes(mask))
    os.makedirs(f"{root}/pool")
    src.write_bytes("pool/any.jpg", jpeg_bytes(coded_pair(6)[0]))
    os.symlink(f"{root}/pool/any.jpg", f"{root}/ISIC_0000006.jpg")  # inside: followed
    src.write_bytes("ISIC_0000006_segmentation.png", png_bytes(coded_pair(6)[1]))

    res = ingest(
        IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=(16, 16))
    )
    assert sorted(Dataset.open(local.url("ds")).ids) == [f"ISIC_{k:07d}" for k in (0, 1, 6)]
    reasons = _reasons(local)
    assert reasons["ISIC_0000003.jpg"] == reasons["ISIC_0000004.jpg"] == "unreadable"
    detail = {r["source"].rsplit("/", 1)[-1]: r["detail"] for r in _report(local)["rejected"]}
    assert "outside the source" in detail["ISIC_0000003.jpg"]
    assert "dangling" in detail["ISIC_0000004.jpg"]
    assert res.rejected_by_reason == {"unreadable": 2}
    # allowed explicitly, the link out of the source is followed; the dangling one is not
    allowed = IngestConfig(
        layout="isic",
        source=src.url,
        dataset=local.url("ds2"),
        size=(16, 16),
        allow_external_links=True,
    )
    assert ingest(allowed).rejected_by_reason == {"unreadable": 1}
    assert sorted(Dataset.open(local.url("ds2")).ids) == [f"ISIC_{k:07d}" for k in (0, 1, 3, 6)]


def test_nerve_tif_next_to_tiff_is_a_duplicate_id(local):
    src = local.store("raw")
    img, mask = coded_pair(1, 24, 32)
    src.write_bytes("train/1_1.tif", tiff_bytes(img[..., 0]))
    src.write_bytes("train/1_1.tiff", tiff_bytes(img[..., 1]))
    src.write_bytes("train/1_1_mask.tif", tiff_bytes(mask))
    res = ingest(
        IngestConfig(layout="nerve", source=src.url, dataset=local.url("ds"), size=(24, 32))
    )
    assert res.n_images == 1 and res.rejected_by_reason == {"duplicate_id": 1}
    assert _reasons(local) == {"1_1.tiff": "duplicate_id"}


# -- LUNA: the limit counts what ITK would allocate ---------------------------------------------
def _luna(src, dims: tuple[int, int, int], compressed: bool) -> None:
    name = "big.zraw" if compressed else "big.raw"
    header = [
        "ObjectType = Image",
        "NDims = 3",
        f"DimSize = {dims[0]} {dims[1]} {dims[2]}",
        "ElementType = MET_SHORT",
        "ElementSpacing = 1 1 1",
        f"CompressedData = {compressed}",
        f"ElementDataFile = {name}",
    ]
    src.write_bytes("big.mhd", "\n".join(header).encode())
    src.write_bytes(name, zlib.compress(b"\0" * 4096) if compressed else b"\0" * 4096)
    src.write_bytes(
        "annotations.csv", b"seriesuid,coordX,coordY,coordZ,diameter_mm\nbig,10,10,2,4\n"
    )


@pytest.mark.parametrize(
    ("dims", "compressed"),
    [((2000, 2000, 50), False), ((512, 512, 400), True)],
    ids=["slice-over-pixel-limit", "compressed-volume-over-byte-limit"],
)
def test_luna_volume_over_the_limit_is_refused_before_reading(local, dims, compressed):
    src = local.store("luna")
    _luna(src, dims, compressed)
    cfg = IngestConfig(
        layout="luna", source=src.url, dataset=local.url("ds"), size=(32, 32), max_pixels=300_000
    )
    res = ingest(cfg)
    assert res.n_images == 0 and res.rejected_by_reason == {"too_large": 1}
    detail = _report(local)["rejected"][0]["detail"]
    assert "big.mhd" in detail and "300,000" in detail


def test_nodule_discs_are_drawn_in_their_box_only():
    shape = (300, 400)
    ellipses = [(50.3, 60.7, 10.2, 7.5), (395.0, 5.0, 20.0, 20.0), (-30.0, 10.0, 5.0, 5.0)]
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    want = np.zeros(shape, bool)
    for cx, cy, rx, ry in ellipses:
        want |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    np.testing.assert_array_equal(draw_ellipses(shape, ellipses), want)
    assert math.isclose(
        draw_ellipses(shape, ellipses[:1]).sum(), math.pi * 10.2 * 7.5, rel_tol=0.05
    )


# -- the contract is checked by every reader ----------------------------------------------------
def test_every_reader_checks_the_contract_version(local):
    import zarr

    from segflow.train.data import FoldData

    src = local.store("raw")
    write_isic(src, range(2))
    ingest(IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=(16, 16)))
    zarr.open_group(local.store("ds").zarr_store(), mode="a").attrs["contract"] = 99
    store = local.store("ds")
    for read in (open_group, Dataset, lambda s: FoldData(s, [0])):
        with pytest.raises(DatasetError, match="contract 99; this segflow reads contract 1"):
            read(store)
