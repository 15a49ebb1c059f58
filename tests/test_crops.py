"""``segflow.crops``: box arithmetic on hand-worked arrays, then whole runs (local and S3),
bad inputs, and a run killed with SIGKILL and resumed."""

from __future__ import annotations

import csv
import io
import os
import posixpath
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segflow.crops import CropsConfig, make_crops
from segflow.errors import InputError
from segflow.masks import expand_box, largest_box, masked_crop, paste_back
from segflow.storage import Store
from tests.makers import jpeg_bytes, png_bytes

REPO = Path(__file__).resolve().parents[1]


# -- arrays ---------------------------------------------------------------------------------------
def test_largest_component_is_chosen_not_the_union_box():
    mask = np.zeros((10, 12), np.uint8)
    mask[1:3, 1:3] = 1  # 4 pixels
    mask[5:8, 6:10] = 1  # 12 pixels: the largest
    mask[8, 10] = 1  # touches the big one diagonally: same component with 8-connectivity
    bbox, area, n, comp = largest_box(mask)
    assert bbox == (6, 5, 11, 9)  # not the union (1, 1, 11, 9)
    assert (area, n) == (13, 2)
    assert comp.dtype == np.uint8 and comp.sum() == 13 and comp[1:3, 1:3].sum() == 0


def test_largest_box_below_min_area_and_empty():
    mask = np.zeros((6, 6), np.uint8)
    assert largest_box(mask)[:3] == (None, 0, 0)
    mask[2:4, 2:4] = 255
    assert largest_box(mask, min_area=5)[:3] == (None, 4, 1)
    assert largest_box(mask, min_area=4)[0] == (2, 2, 4, 4)


def test_expand_box_margin_and_clipping():
    assert expand_box((10, 20, 20, 40), 0.1, (100, 100)) == (9, 18, 21, 42)
    # 0.2 x 10 = 2 px left/right, 0.2 x 5 = 1 px top/bottom; clipped at every border
    assert expand_box((1, 2, 11, 7), 0.2, (8, 12)) == (0, 1, 12, 8)
    assert expand_box((0, 0, 3, 3), 0.0, (3, 3, 3)) == (0, 0, 3, 3)
    with pytest.raises(ValueError, match="outside"):
        expand_box((0, 0, 5, 5), 0.1, (4, 4))


def _three_by_three() -> tuple[np.ndarray, np.ndarray]:
    image = np.empty((3, 3, 3), np.uint8)
    image[:] = (10, 20, 30)
    image[0, 0] = (90, 100, 110)
    image[1, 1] = (200, 201, 202)
    comp = np.zeros((3, 3), np.uint8)
    comp[1, 1] = 1
    return image, comp


@pytest.mark.parametrize(
    "background, fill",
    # mean of the 8 outside pixels: 7 x (10, 20, 30) + (90, 100, 110) = (160, 240, 320) / 8
    [("black", (0, 0, 0)), ("white", (255, 255, 255)), ("mean", (20, 30, 40))],
)
def test_masked_background_fill(background, fill):
    image, comp = _three_by_three()
    out = masked_crop(image, comp, (0, 0, 3, 3), background)
    want = np.empty((3, 3, 3), np.uint8)
    want[:] = fill
    want[1, 1] = (200, 201, 202)
    np.testing.assert_array_equal(out, want)
    inner = masked_crop(image, comp, (1, 0, 3, 2), background)  # a box that cuts the image
    np.testing.assert_array_equal(inner, want[0:2, 1:3])


def test_masked_grey_mean():
    image = np.array([[10, 30], [50, 250]], np.uint8)
    comp = np.array([[0, 0], [0, 1]], np.uint8)
    out = masked_crop(image, comp, (0, 0, 2, 2), "mean")
    np.testing.assert_array_equal(out, [[30, 30], [30, 250]])


def test_paste_back_round_trip_exact():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    box = (5, 7, 41, 30)
    crop = image[7:30, 5:41]
    back = paste_back(crop, box, image.shape, fill=3)
    np.testing.assert_array_equal(back[7:30, 5:41], image[7:30, 5:41])
    outside = np.ones(image.shape[:2], bool)
    outside[7:30, 5:41] = False
    assert (back[outside] == 3).all()
    with pytest.raises(ValueError, match="does not match"):
        paste_back(crop[:-1], box, image.shape)


# -- whole runs -----------------------------------------------------------------------------------
def _pair(k: int, h: int = 40, w: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """An image with a big lesion and a one-pixel speck far from it."""
    rng = np.random.default_rng(k)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    top, left = 8 + k % 5, 10 + k % 7
    mask[top : top + 15, left : left + 20] = 255
    mask[1, w - 2] = 255
    return img, mask


def _write_dataset(preds: Store, source: Store, n: int, layout: str = "isic") -> dict:
    arrays = {}
    for k in range(n):
        img, mask = _pair(k)
        image_id = f"ISIC_{k:07d}"
        arrays[image_id] = (img, mask)
        if layout == "isic":
            source.write_bytes(f"{image_id}.jpg", jpeg_bytes(img))
            preds.write_bytes(f"masks/{image_id}_segmentation.png", png_bytes(mask))
        else:
            source.write_bytes(f"{image_id}.png", png_bytes(img))
            preds.write_bytes(f"masks/{image_id}.png", png_bytes(mask))
    preds.write_json("predictions.json", {"layout": layout})  # as `segflow predict` records it
    return arrays


def _manifest(out: Store) -> dict[str, dict[str, str]]:
    rows = csv.DictReader(io.StringIO(out.read_bytes("crops.csv").decode()))
    return {r["id"]: r for r in rows}


def _decode(out: Store, rel: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(out.read_bytes(rel))))


def test_run_on_location(location):
    preds, source = location.store("preds"), location.store("src")
    arrays = _write_dataset(preds, source, 3)
    cfg = CropsConfig(
        predictions=preds.url,
        source=source.url,
        out=location.url("out"),
        mode="all",
        storage=location.storage,
        workers=2,
    )
    result = make_crops(cfg)
    assert (result.n_ok, result.n_empty, result.n_error) == (3, 0, 0)
    out = location.store("out")
    rows = _manifest(out)
    for image_id, (img, mask) in arrays.items():
        row = rows[image_id]
        comp = (mask > 0).astype(np.uint8)
        comp[1, -2] = 0  # the speck is not the largest component
        ys, xs = np.nonzero(comp)
        box = expand_box((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), 0.1, img.shape)
        assert tuple(int(row[c]) for c in ("x0", "y0", "x1", "y1")) == box
        assert (row["status"], row["area"], row["n_components"]) == ("ok", "300", "2")
        assert row["outputs"] == ";".join(f"{k}/{image_id}.png" for k in ("crop", "masked", "mask"))
        back = paste_back(_decode(out, f"mask/{image_id}.png"), box, comp.shape)
        np.testing.assert_array_equal(back, comp * 255)
    assert out.read_json("crops.json")["n_ok"] == 3
    again = make_crops(cfg)
    assert (again.n_ok, again.n_skipped) == (3, 3)


def test_folder_layout_exact_pixels(local):
    preds, source = local.store("preds"), local.store("src")
    arrays = _write_dataset(preds, source, 2, layout="folder")
    cfg = CropsConfig(predictions=preds.url, source=source.url, out=local.url("out"), margin=0)
    assert make_crops(cfg).n_ok == 2
    out = local.store("out")
    img, mask = arrays["ISIC_0000001"]
    got = _decode(out, "masked/ISIC_0000001.png")
    want = np.where((mask[9:24, 11:31] > 0)[..., None], img[9:24, 11:31], 0)
    np.testing.assert_array_equal(got, want)


def test_empty_mask_writes_no_crop(local):
    preds, source = local.store("preds"), local.store("src")
    _write_dataset(preds, source, 2)
    blank = png_bytes(np.zeros((40, 56), np.uint8))
    preds.write_bytes("masks/ISIC_0000001_segmentation.png", blank)
    tiny = np.zeros((40, 56), np.uint8)
    tiny[3, 3] = 255  # 1 pixel < 0.001 x 2240 = 2.24 pixels
    source.write_bytes("ISIC_0000002.jpg", jpeg_bytes(_pair(2)[0]))
    preds.write_bytes("masks/ISIC_0000002_segmentation.png", png_bytes(tiny))
    result = make_crops(CropsConfig(predictions=preds.url, source=source.url, out=local.url("out")))
    assert (result.n_ok, result.n_empty) == (1, 2)
    out = local.store("out")
    rows = _manifest(out)
    assert rows["ISIC_0000001"]["status"] == "empty" and rows["ISIC_0000001"]["outputs"] == ""
    assert (rows["ISIC_0000002"]["status"], rows["ISIC_0000002"]["area"]) == ("empty", "1")
    assert [f.rel for f in out.list("masked")] == ["masked/ISIC_0000000.png"]


def test_bad_inputs_are_error_rows(local):
    preds, source = local.store("preds"), local.store("src")
    _write_dataset(preds, source, 4)
    source.write_bytes("ISIC_0000001.jpg", jpeg_bytes(np.zeros((30, 56, 3), np.uint8)))
    source.write_bytes("ISIC_0000002.jpg", b"not a jpeg at all")
    source.delete("ISIC_0000003.jpg")
    result = make_crops(CropsConfig(predictions=preds.url, source=source.url, out=local.url("out")))
    assert (result.n_ok, result.n_error) == (1, 3)
    rows = _manifest(local.store("out"))
    assert rows["ISIC_0000000"]["status"] == "ok"
    assert {i: rows[i]["reason"] for i in rows if rows[i]["status"] == "error"} == {
        "ISIC_0000001": "size_mismatch",
        "ISIC_0000002": "unreadable",
        "ISIC_0000003": "missing_image",
    }
    assert "56x40" in rows["ISIC_0000001"]["detail"] and "56x30" in rows["ISIC_0000001"]["detail"]


_SLOW_RUN = """
import sys, time
import segflow.crops as crops
real = crops.encode
def slow(*a, **k):
    time.sleep(0.03)  # widen the window in which the kill lands
    return real(*a, **k)
crops.encode = slow
crops.make_crops(crops.CropsConfig(predictions=sys.argv[1], source=sys.argv[2],
                                   out=sys.argv[3], mode="all", workers=2))
"""


def _snapshot(root: Path) -> dict[str, bytes]:
    skip = {"crops.json", "crops.complete.json"}  # hold the run's timing
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name not in skip
    }


def _n_done(out: Path) -> int:
    """Committed done records (pathlib's glob also matches in-flight ``.tmp-`` files)."""
    folder = out / "_done"
    names = [p.name for p in folder.glob("*.json")] if folder.is_dir() else []
    return sum(not n.startswith(".tmp-") for n in names)


def test_resume_after_sigkill(local, tmp_path):
    preds, source = local.store("preds"), local.store("src")
    _write_dataset(preds, source, 60)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SLOW_RUN), preds.url, source.url, str(killed)],
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and _n_done(killed) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = _n_done(killed)
    assert 5 <= n_before < 60, "the kill should land mid-run"
    assert not (killed / "crops.csv").exists()

    def cfg(out: Path) -> CropsConfig:
        return CropsConfig(predictions=preds.url, source=source.url, out=str(out), mode="all")

    resumed = make_crops(cfg(killed))
    assert resumed.n_skipped >= n_before and resumed.n_ok == 60
    assert make_crops(cfg(clean)).n_ok == 60
    got, want = _snapshot(killed), _snapshot(clean)
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want)


def _four_d_tiff() -> bytes:
    """A TIFF whose first page is 4-D (depth, H, W, RGB): Pillow cannot take it."""
    import tifffile

    buf = io.BytesIO()
    arr = np.zeros((2, 40, 56, 3), np.uint8)
    tifffile.imwrite(buf, arr, photometric="rgb", volumetric=True, tile=(2, 16, 16))
    return buf.getvalue()


def test_undecodable_source_is_an_error_row_and_the_run_goes_on(local):
    preds, source = local.store("preds"), local.store("src")
    _write_dataset(preds, source, 3)
    source.delete("ISIC_0000001.jpg")
    source.write_bytes("ISIC_0000001.tif", _four_d_tiff())
    cfg = CropsConfig(predictions=preds.url, source=source.url, out=local.url("out"))
    for _ in range(2):  # a rerun too: the failure is recorded, not retried into a crash
        result = make_crops(cfg)
        assert (result.n_ok, result.n_error) == (2, 1)
    row = _manifest(local.store("out"))["ISIC_0000001"]
    assert row["status"] == "error" and row["reason"]
    assert "ISIC_0000001.tif" in row["detail"]


def test_predictions_as_masks_folder_or_plain_folder(local):
    preds, source = local.store("preds"), local.store("src")
    _write_dataset(preds, source, 2)  # recorded layout isic
    # the masks/ folder of a predict run: its record still names the layout
    via_masks = make_crops(
        CropsConfig(predictions=preds.uri("masks"), source=source.url, out=local.url("a"))
    )
    assert via_masks.n_ok == 2
    # the record wins over a --layout that contradicts it
    recorded = make_crops(
        CropsConfig(predictions=preds.url, source=source.url, out=local.url("b"), layout="folder")
    )
    assert recorded.n_ok == 2
    # a plain folder of masks, no record: --layout names them (default folder: <id>.png)
    plain = local.store("plain")
    for f in preds.list("masks"):
        plain.write_bytes(posixpath.basename(f.rel), preds.read_bytes(f.rel))
    unnamed = make_crops(CropsConfig(predictions=plain.url, source=source.url, out=local.url("c")))
    assert unnamed.errors_by_reason == {"missing_image": 2}  # ids ISIC_..._segmentation
    with pytest.raises(InputError, match="masks at"):
        make_crops(CropsConfig(predictions=source.url, source=source.url, out=local.url("e")))
    named = CropsConfig(predictions=plain.url, source=source.url, out=local.url("d"), layout="isic")
    assert make_crops(named).n_ok == 2


# -- pairing options (segflow.pairing): the images predict chose, by the same options ----------
DRIVE_PATTERN = r"images/(?P<id>\d+)_test\.png"


def _drive(source: Store, preds: Store, ids: tuple[str, ...], masks: tuple[str, ...]) -> dict:
    """Source images named as DRIVE's (images/01_test.png) and a predict output whose masks are
    named by the pattern's ids (masks/01.png), as `segflow predict --image-pattern` writes."""
    arrays = {}
    for k, i in enumerate(ids):
        img, mask = _pair(k)
        arrays[i] = (img, mask)
        source.write_bytes(f"images/{i}_test.png", png_bytes(img))
    for k, i in enumerate(masks):
        preds.write_bytes(f"masks/{i}.png", png_bytes(arrays.get(i, _pair(k))[1]))
    preds.write_json("predictions.json", {"layout": "folder"})
    return arrays


def test_image_pattern_pairs_masks_with_the_images_predict_used(local):
    preds, source = local.store("preds"), local.store("src")
    arrays = _drive(source, preds, ("01", "02"), ("01", "02", "03"))
    source.write_bytes("images/notes.png", png_bytes(np.zeros((4, 4), np.uint8)))  # no match
    plain = make_crops(CropsConfig(predictions=preds.url, source=source.url, out=local.url("a")))
    assert plain.errors_by_reason == {"missing_image": 3}  # <id>.* is not DRIVE's naming
    cfg = CropsConfig(
        predictions=preds.url,
        source=source.url,
        out=local.url("b"),
        image_pattern=DRIVE_PATTERN,
        margin=0,
    )
    result = make_crops(cfg)
    assert (result.n_ok, result.errors_by_reason) == (2, {"missing_image": 1})
    rows = _manifest(local.store("b"))
    assert "no image of id 03" in rows["03"]["detail"] and DRIVE_PATTERN in rows["03"]["detail"]
    img, mask = arrays["02"]
    got = _decode(local.store("b"), "masked/02.png")
    top, left = 8 + 1, 10 + 1  # _pair(1)'s lesion
    box = (slice(top, top + 15), slice(left, left + 20))
    np.testing.assert_array_equal(got, np.where((mask[box] > 0)[..., None], img[box], 0))
    again = make_crops(cfg)
    assert (again.n_ok, again.n_skipped) == (2, 3)


def test_pairs_csv_image_column_and_ids_with_sub_folders(local):
    preds, source = local.store("preds"), local.store("src")
    _drive(source, preds, ("01", "02"), ("a", "sub/b", "c"))
    source.write_bytes(
        "pairs.csv",
        b"image,mask,id\n"
        b"images/01_test.png,ignored.gif,a\n"  # crops reads only the image column
        b"images/02_test.png,,sub/b\n"
        b"images/09_test.png,,c\n",  # no such file: c's row says why
    )
    cfg = CropsConfig(
        predictions=preds.url,
        source=source.url,
        out=local.url("out"),
        pairs=source.uri("pairs.csv"),
        mode="crop",
    )
    result = make_crops(cfg)
    assert (result.n_ok, result.errors_by_reason) == (2, {"unreadable": 1})
    out = local.store("out")
    rows = _manifest(out)
    assert rows["sub/b"]["outputs"] == "crop/sub/b.png" and out.exists("crop/sub/b.png")
    assert "line 4" in rows["c"]["detail"] and "09_test.png" in rows["c"]["detail"]


def test_bad_pairing_is_a_clear_error_on_the_command_line(local):
    from typer.testing import CliRunner

    from segflow.cli import app
    from segflow.errors import ConfigError, PairingError

    preds, source = local.store("preds"), local.store("src")
    _drive(source, preds, ("01",), ("01",))
    args = ["crops", "--predictions", preds.url, "--source", source.url, "--out", local.url("o")]
    res = CliRunner().invoke(app, [*args, "--image-pattern", r"(?P<id>\d+)_test\.png"])
    assert isinstance(res.exception, PairingError), res.output
    # it matched a file name, not the whole path: the message says so and gives the fix
    assert "matches none of" in str(res.exception) and "images/01_test.png" in str(res.exception)
    both = ["--image-pattern", DRIVE_PATTERN, "--pairs", source.uri("pairs.csv")]
    res = CliRunner().invoke(app, [*args, *both])
    assert isinstance(res.exception, ConfigError) and "not both" in str(res.exception)
    res = CliRunner().invoke(app, [*args, "--image-pattern", DRIVE_PATTERN, "--json"])
    assert res.exit_code == 0, res.output


def test_image_glob_alone_pairs_masks_by_path_as_predict_folder_layout(local):
    """`predict --layout folder --image-glob 'images/*.png'` names each mask by the image's
    path without its extension (masks/images/01_test.png): crops with the same glob finds
    the image of each such mask, in a sub-folder."""
    preds, source = local.store("preds"), local.store("src")
    arrays = _drive(source, preds, ("01", "02"), ())
    for i in ("01", "02"):
        preds.write_bytes(f"masks/images/{i}_test.png", png_bytes(arrays[i][1]))
    source.write_bytes("other/03_test.png", png_bytes(np.zeros((4, 4), np.uint8)))  # not globbed
    with pytest.raises(InputError, match=r"no <id>\.png masks"):  # none at the top level
        make_crops(CropsConfig(predictions=preds.url, source=source.url, out=local.url("a")))
    cfg = CropsConfig(
        predictions=preds.url,
        source=source.url,
        out=local.url("b"),
        image_glob="images/*.png",
        margin=0,
    )
    result = make_crops(cfg)
    assert (result.n_ok, result.errors_by_reason) == (2, {})
    assert local.store("b").exists("masked/images/02_test.png")
