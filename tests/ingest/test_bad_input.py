"""The bad-input table: each bad file is quarantined with its reason, the rest is ingested."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from segflow.ingest import Dataset, IngestConfig, ingest
from tests.makers import coded_pair, jpeg_bytes, png_bytes, write_isic


def _bad_archive(store) -> None:
    write_isic(store, range(4))  # four good pairs: ISIC_0000000..3
    img, mask = coded_pair(9)
    good_jpeg = jpeg_bytes(img)
    store.write_bytes("ISIC_0000010.jpg", b"")  # zero bytes
    store.write_bytes("ISIC_0000010_segmentation.png", png_bytes(mask))
    store.write_bytes("ISIC_0000011.jpg", good_jpeg[: len(good_jpeg) // 2])  # truncated
    store.write_bytes("ISIC_0000011_segmentation.png", png_bytes(mask))
    store.write_bytes("ISIC_0000012.jpg", b"this is a text file, not a JPEG\n" * 20)
    store.write_bytes("ISIC_0000012_segmentation.png", png_bytes(mask))
    store.write_bytes("ISIC_0000013.jpg", good_jpeg)  # no mask
    store.write_bytes("ISIC_0000014_segmentation.png", png_bytes(mask))  # no image
    store.write_bytes("ISIC_0000001.png", png_bytes(img))  # duplicate id of a good .jpg
    big = np.zeros((300, 300, 3), np.uint8)  # over the pixel limit set below
    store.write_bytes("ISIC_0000015.jpg", jpeg_bytes(big))
    store.write_bytes("ISIC_0000015_segmentation.png", png_bytes(big[..., 0]))
    store.write_bytes("README.txt", b"not part of the layout")


def test_bad_files_are_quarantined_with_reasons(location):
    src = location.store("raw")
    _bad_archive(src)
    cfg = IngestConfig(
        layout="isic",
        source=src.url,
        dataset=location.url("ds"),
        size=(48, 64),
        max_pixels=200 * 200,
        storage=location.storage,
    )
    res = ingest(cfg)
    assert res.n_images == 4
    assert sorted(Dataset.open(cfg.dataset, location.storage).ids) == [
        f"ISIC_{k:07d}" for k in range(4)
    ]
    report = location.store("ds").read_json("report.json")
    reasons = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in report["rejected"]}
    assert reasons == {
        "ISIC_0000010.jpg": "unreadable",
        "ISIC_0000011.jpg": "unreadable",
        "ISIC_0000012.jpg": "unreadable",
        "ISIC_0000013.jpg": "missing_mask",
        "ISIC_0000014_segmentation.png": "orphan_mask",
        "ISIC_0000001.png": "duplicate_id",
        "ISIC_0000015.jpg": "too_large",
    }
    assert res.rejected_by_reason == {
        "unreadable": 3,
        "missing_mask": 1,
        "orphan_mask": 1,
        "duplicate_id": 1,
        "too_large": 1,
    }
    detail = {r["reason"]: r["detail"] for r in report["rejected"]}
    assert "90,000 pixels" in detail["too_large"] and "40,000" in detail["too_large"]
    assert "0 bytes" in next(r["detail"] for r in report["rejected"] if "0010" in r["source"])
    # the dataset has no holes: rejected slots were filled by good rows
    ds = Dataset.open(cfg.dataset, location.storage)
    assert ds.group["images"].shape[0] == 4 and all(ds.image(i).max() > 0 for i in range(4))
    # rerun: the rejected files are unchanged, so nothing is retried or re-added
    again = ingest(cfg)
    assert again.status == "up_to_date" and again.n_rejected == 7


def test_exif_rotated_jpeg_is_oriented_with_its_mask(local):
    src = local.store("raw")
    img, mask = coded_pair(5, 48, 64)  # displayed: 48 high, 64 wide
    stored = Image.fromarray(img).transpose(Image.Transpose.ROTATE_90)  # raw: 64 x 48
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display" undoes ROTATE_90 (which is CCW)
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif)
    src.write_bytes("ISIC_0000005.jpg", buf.getvalue())
    src.write_bytes("ISIC_0000005_segmentation.png", png_bytes(mask))  # drawn as displayed
    res = ingest(
        IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=(48, 64))
    )
    assert res.quirks == {"exif_rotated": 1}
    ds = Dataset.open(local.url("ds"))
    assert ds.column("orig_size").tolist() == [[48, 64]]
    dark = ds.image(0).mean(axis=-1) < 60  # the lesion rectangle is dark
    overlap = (dark & (ds.mask(0) == 1)).sum() / ds.mask(0).sum()
    assert overlap > 0.9


def test_mask_size_mismatch_and_antialiasing_are_fixed_and_counted(local):
    src = local.store("raw")
    img, mask = coded_pair(0, 48, 64)
    big_mask = np.asarray(Image.fromarray(mask).resize((256, 192), Image.Resampling.BILINEAR))
    assert len(np.unique(big_mask)) > 2  # anti-aliased edges
    src.write_bytes("ISIC_0000000.jpg", jpeg_bytes(img))
    src.write_bytes("ISIC_0000000_segmentation.png", png_bytes(big_mask))
    res = ingest(
        IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=(48, 64))
    )
    assert res.quirks == {"mask_resized": 1, "mask_thresholded": 1}
    m = Dataset.open(local.url("ds")).mask(0)
    assert set(np.unique(m).tolist()) == {0, 1}
    assert abs(int(m.sum()) - int((mask > 0).sum())) <= 64  # same rectangle, up to its edge


def test_unlabeled_archive_is_valid(local):
    src = local.store("raw")
    for k in range(3):
        src.write_bytes(f"ISIC_{k:07d}.jpg", jpeg_bytes(coded_pair(k)[0]))
    res = ingest(IngestConfig(layout="isic", source=src.url, dataset=local.url("ds")))
    assert (res.n_images, res.n_rejected) == (3, 0)
    ds = Dataset.open(local.url("ds"))
    assert "masks" not in ds.group and not ds.column("has_mask").any()
    assert ds.mask(0) is None


def test_cli_strict_exit_code_and_json_last_line(local):
    src = local.store("raw")
    write_isic(src, range(2))
    src.write_bytes("ISIC_0000007.jpg", b"")
    src.write_bytes("ISIC_0000007_segmentation.png", png_bytes(np.zeros((4, 4), np.uint8)))
    base = [sys.executable, "-m", "segflow.cli", "ingest", "--layout", "isic", "--source"]
    args = [*base, src.url, "--dataset", local.url("ds"), "--size", "32", "32", "--json"]
    ok = subprocess.run(args, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["n_images"] == 2 and summary["rejected_by_reason"] == {"unreadable": 1}
    strict = subprocess.run([*args, "--strict"], capture_output=True, text=True, check=False)
    assert strict.returncode == 1
    assert json.loads(strict.stdout.strip().splitlines()[-1])["status"] == "up_to_date"


def test_cli_bad_option_gets_clear_error(local):
    args = [sys.executable, "-m", "segflow.cli", "ingest", "--layout", "dicom"]
    args += ["--source", local.url("x"), "--dataset", local.url("ds")]
    res = subprocess.run(args, capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert "layout" in res.stderr and "'dicom'" in res.stderr and "Traceback" not in res.stderr
