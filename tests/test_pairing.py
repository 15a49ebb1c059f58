"""Any file naming (issue 15): regex pairing, a pairs CSV, their bad-pairing messages, the mask
formats archives use (GIF, BMP, multi-page TIFF), and the same options in ingest, evaluate and
predict (one implementation: segflow.pairing)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from segflow.errors import ConfigError, InputError, PairingError
from segflow.evaluate import evaluate
from segflow.imaging import Rejected, decode_image, decode_mask, mask_to_frame
from segflow.ingest import Dataset, IngestConfig, ingest
from segflow.predict.config import PredictConfig
from segflow.predict.run import list_inputs
from segflow.train.splits import make_splits
from tests.makers import coded_pair, lesion_box, png_bytes, tiff_bytes

H = W = 32
DRIVE_PATTERN = r"images/(?P<id>\d+)_test\.tif"
DRIVE_TEMPLATE = "../1st_manual/{id}_manual1.gif"


def gif_bytes(mask: np.ndarray) -> bytes:
    """A palette GIF as the DRIVE manual annotations are: index 1 (white) is the vessel."""
    img = Image.fromarray((mask > 0).astype(np.uint8), "P")
    img.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    img.save(buf, "GIF")
    return buf.getvalue()


def bmp_bytes(mask: np.ndarray) -> bytes:
    """A 1-bit BMP (mode "1"), as PH2's lesion masks."""
    buf = io.BytesIO()
    Image.fromarray(mask > 0).save(buf, "BMP")
    return buf.getvalue()


def multipage_tiff(*pages: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for p in pages:
            tw.write(p)
    return buf.getvalue()


def expected_mask(k: int) -> np.ndarray:
    t, left, b, r = lesion_box(k, H, W)
    out = np.zeros((H, W), np.uint8)
    out[t:b, left:r] = 1
    return out


def write_drive(store, ks=(1, 2, 3)) -> None:
    """The DRIVE retinal layout: images/01_test.tif, 1st_manual/01_manual1.gif, and field-of-
    view masks mask/01_test_mask.gif that are not part of the pairing."""
    for k in ks:
        img, mask = coded_pair(k, H, W)
        store.write_bytes(f"images/{k:02d}_test.tif", tiff_bytes(img))
        store.write_bytes(f"1st_manual/{k:02d}_manual1.gif", gif_bytes(mask))
        store.write_bytes(f"mask/{k:02d}_test_mask.gif", gif_bytes(np.ones((H, W), np.uint8)))


def _ingest(loc, **kw):
    cfg = IngestConfig(
        storage=loc.storage, workers=2, layout="folder", dataset=loc.url("ds"), size=(H, W), **kw
    )
    return ingest(cfg)


def _masks_by_id(loc) -> dict[str, np.ndarray]:
    ds = Dataset.open(loc.url("ds"), loc.storage)
    return {i: ds.mask(k) for k, i in enumerate(ds.ids)}


# -- regex pairing ------------------------------------------------------------------------------
def test_retinal_images_pair_with_masks_in_a_sibling_folder(local):
    src = local.store("drive")
    write_drive(src)
    res = _ingest(local, source=src.url, image_pattern=DRIVE_PATTERN, mask_template=DRIVE_TEMPLATE)
    assert (res.n_images, res.n_rejected) == (3, 0)
    masks = _masks_by_id(local)
    assert sorted(masks) == ["01", "02", "03"]
    for k in (1, 2, 3):
        np.testing.assert_array_equal(masks[f"{k:02d}"], expected_mask(k))


def test_the_issue_example_with_images_and_masks_in_two_locations(location):
    src, manual = location.store("drive/images"), location.store("drive/1st_manual")
    for k in (1, 2):
        img, mask = coded_pair(k, H, W)
        src.write_bytes(f"{k:02d}_test.tif", tiff_bytes(img))
        manual.write_bytes(f"{k:02d}_manual1.gif", gif_bytes(mask))
    manual.write_bytes("07_manual1.gif", gif_bytes(np.ones((H, W))))  # no image uses it
    res = _ingest(
        location,
        source=src.url,
        masks=manual.url,
        image_pattern=r"(?P<id>\d+)_test\.tif",
        mask_template="{id}_manual1.gif",
    )
    assert (res.n_images, res.rejected_by_reason) == (2, {"orphan_mask": 1})
    masks = _masks_by_id(location)
    np.testing.assert_array_equal(masks["02"], expected_mask(2))


def test_a_pattern_group_named_group_reaches_the_split(local):
    src = local.store("eyes")
    for k, name in enumerate(["p1_L", "p1_R", "p2_L", "p2_R", "p3_L", "p3_R"]):
        img, mask = coded_pair(k, H, W)
        src.write_bytes(f"{name}.png", png_bytes(img))
        src.write_bytes(f"{name}_seg.png", png_bytes(mask))
    res = _ingest(
        local,
        source=src.url,
        image_pattern=r"(?P<id>(?P<group>p\d)_[LR])\.png",
        mask_template="{id}_seg.png",
    )
    assert (res.n_images, res.n_rejected) == (6, 0)
    ds = Dataset.open(local.url("ds"))
    groups = [str(g) for g in ds.column("groups")]
    assert dict(zip(ds.ids, groups, strict=True))["p2_R"] == "p2"
    _assert_groups_stay_in_one_fold(ds.ids, groups)


def _assert_groups_stay_in_one_fold(ids: list[str], groups: list[str]) -> None:
    splits = make_splits(ids, groups, 3, seed=0)
    assert splits["grouped"]
    fold_of = {i: f["fold"] for f in splits["folds"] for i in f["val"]}
    by_group: dict[str, set[int]] = {}
    for i, g in zip(ids, groups, strict=True):
        by_group.setdefault(g, set()).add(fold_of[i])
    assert all(len(folds) == 1 for folds in by_group.values()), by_group


# -- pairs CSV ----------------------------------------------------------------------------------
def test_pairs_csv_with_groups_relative_and_absolute_paths(location):
    root = location.store("archive")
    rows = ["image,mask,group"]
    for k in range(6):
        img, mask = coded_pair(k, H, W)
        root.write_bytes(f"scans/s{k}.png", png_bytes(img))
        root.write_bytes(f"labels/l{k}.bmp", bmp_bytes(mask))
        mask_cell = root.uri(f"labels/l{k}.bmp") if k == 0 else f"../labels/l{k}.bmp"
        rows.append(f"../scans/s{k}.png,{mask_cell},patient{k // 2}")
    rows.append("../scans/s9.png,../labels/l0.bmp,patient9")  # no such image
    rows.append("../scans/s1.png,../labels/nope.bmp,patient9")  # no such mask (s1 again)
    root.write_bytes("lists/pairs.csv", "\n".join(rows).encode())
    res = _ingest(location, source=root.url, pairs=root.uri("lists/pairs.csv"))
    assert res.n_images == 6
    assert res.rejected_by_reason == {"unreadable": 1, "missing_mask": 1}
    report = location.store("ds").read_json("report.json")
    detail = {r["reason"]: r["detail"] for r in report["rejected"]}
    assert "line 8" in detail["unreadable"] and "s9.png" in detail["unreadable"]
    assert "line 9" in detail["missing_mask"] and "nope.bmp" in detail["missing_mask"]
    ds = Dataset.open(location.url("ds"), location.storage)
    assert sorted(ds.ids) == [f"s{k}" for k in range(6)]
    groups = [str(g) for g in ds.column("groups")]
    assert dict(zip(ds.ids, groups, strict=True))["s3"] == "patient1"
    _assert_groups_stay_in_one_fold(ds.ids, groups)
    masks = _masks_by_id(location)
    np.testing.assert_array_equal(masks["s4"], expected_mask(4))


def test_pairs_csv_refuses_files_outside_the_source(local):
    root, outside = local.store("archive"), local.store("elsewhere")
    img, mask = coded_pair(0, H, W)
    root.write_bytes("a.png", png_bytes(img))
    root.write_bytes("a_m.png", png_bytes(mask))
    outside.write_bytes("b.png", png_bytes(img))
    root.write_bytes(
        "pairs.csv", f"image,mask\na.png,a_m.png\n{outside.uri('b.png')},a_m.png\n".encode()
    )
    res = _ingest(local, source=root.url, pairs=root.uri("pairs.csv"))
    assert (res.n_images, res.rejected_by_reason) == (1, {"unreadable": 1})
    (rej,) = local.store("ds").read_json("report.json")["rejected"]
    assert rej["source"].endswith("elsewhere/b.png") and "outside the source" in rej["detail"]


# -- bad pairing: one example of each side ------------------------------------------------------
def test_a_pattern_that_matches_nothing_shows_the_files_it_saw(local):
    src = local.store("drive")
    write_drive(src, ks=(1,))
    with pytest.raises(PairingError) as e:
        _ingest(local, source=src.url, image_pattern=r"(?P<id>\d+)_test\.tif")
    msg = str(e.value)
    assert "matches none of the 3 files" in msg and "'1st_manual/01_manual1.gif'" in msg
    # the fix is computed: the pattern matched a file name, not the whole path
    assert "'images/01_test.tif'" in msg and r"'images/(?P<id>\d+)_test\.tif'" in msg


def test_a_template_naming_an_unknown_field_lists_the_known_ones(local):
    src = local.store("drive")
    write_drive(src, ks=(1,))
    with pytest.raises(PairingError) as e:
        _ingest(local, source=src.url, image_pattern=DRIVE_PATTERN, mask_template="{idx}.gif")
    msg = str(e.value)
    assert "unknown field {idx}" in msg
    assert "{id}, {stem}, {name}, {ext}" in msg and "id='01'" in msg
    assert "'images/01_test.tif'" in msg


def test_two_images_mapping_to_one_mask_shows_both_and_the_mask(local):
    src = local.store("eyes")
    for name in ("p1_L", "p1_R"):
        src.write_bytes(f"{name}.png", png_bytes(coded_pair(0, H, W)[0]))
    src.write_bytes("p1_seg.png", png_bytes(coded_pair(0, H, W)[1]))
    with pytest.raises(PairingError) as e:
        _ingest(
            local,
            source=src.url,
            image_pattern=r"(?P<id>(?P<subject>p\d)_[LR])\.png",
            mask_template="{subject}_seg.png",
        )
    msg = str(e.value)
    assert "two images to one mask" in msg
    assert "'p1_L.png'" in msg and "'p1_R.png'" in msg and "'p1_seg.png'" in msg


def test_a_pairs_csv_without_its_columns_says_what_it_has_and_needs(local):
    root = local.store("archive")
    root.write_bytes("a.png", png_bytes(coded_pair(0, H, W)[0]))
    root.write_bytes("pairs.csv", b"img,seg\na.png,a_m.png\n")
    with pytest.raises(PairingError) as e:
        _ingest(local, source=root.url, pairs=root.uri("pairs.csv"))
    msg = str(e.value)
    assert "['img', 'seg']" in msg and "needs image, mask" in msg and "a.png,a_m.png" in msg


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"image_pattern": r"(\d+)\.png"}, "no named group id"),
        ({"image_pattern": r"(?P<id>\d+"}, "not a valid regex"),
        ({"image_pattern": r"(?P<id>.+)\.png", "mask_template": "{id"}, "not a valid template"),
        ({"image_pattern": r"(?P<id>.+)\.png", "mask_template": "../../{id}.png"}, "outside"),
        ({"pairs": "missing.csv"}, "no pairs CSV"),
    ],
)
def test_other_bad_pairings_are_clear(local, kw, expected):
    src = local.store("src")
    src.write_bytes("1.png", png_bytes(coded_pair(0, H, W)[0]))
    with pytest.raises(PairingError, match=expected):
        _ingest(local, source=src.url, **kw)


def test_pairing_options_belong_to_the_folder_layout(local):
    with pytest.raises(ConfigError, match="folder layout only"):
        IngestConfig.load(None, layout="isic", source="s", dataset="d", image_pattern="(?P<id>.)")
    with pytest.raises(ConfigError, match="not both"):
        IngestConfig.load(
            None, layout="folder", source="s", dataset="d", image_pattern="x", pairs="p"
        )


# -- mask formats -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gif", "bmp", "tiff"])
def test_mask_formats(fmt):
    mask = coded_pair(1, H, W)[1]
    data = {
        "gif": gif_bytes(mask),
        "bmp": bmp_bytes(mask),
        # a multi-page TIFF: the first page is the mask, the others are ignored
        "tiff": multipage_tiff(mask, np.full((H, W), 255, np.uint8)),
    }[fmt]
    decoded, quirks = decode_mask(data, f"m.{fmt}", max_pixels=10_000)
    from segflow.geometry import place

    framed = mask_to_frame(decoded, place((H, W), (H, W), "stretch"), quirks)
    np.testing.assert_array_equal(framed, expected_mask(1))


def test_a_multipage_tiff_image_is_its_first_page():
    first, second = coded_pair(1, H, W)[0], coded_pair(2, H, W)[0]
    img = decode_image(multipage_tiff(first, second), "x.tif", max_pixels=10_000)
    np.testing.assert_array_equal(np.asarray(img.image), first)


def _huge_gif() -> bytes:
    data = bytearray(gif_bytes(np.zeros((8, 8), np.uint8)))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen: 4.3 gigapixels
    return bytes(data)


def _huge_bmp() -> bytes:
    data = bytearray(bmp_bytes(np.zeros((8, 8), np.uint8)))
    data[18:26] = struct.pack("<ii", 60000, 60000)  # width, height
    return bytes(data)


@pytest.mark.parametrize("make", [_huge_gif, _huge_bmp], ids=["gif", "bmp"])
def test_gif_and_bmp_headers_are_size_checked_before_decoding(make):
    with pytest.raises(Rejected) as e:
        decode_mask(make(), "bomb", max_pixels=1_000_000)
    assert e.value.reason == "bad_mask" or e.value.reason == "too_large"
    assert "over the limit" in str(e.value)


# -- the same options in evaluate and predict ---------------------------------------------------
def _prediction_folder(store, masks: dict[str, np.ndarray]) -> None:
    for i, m in masks.items():
        store.write_bytes(f"masks/{i}.png", png_bytes(m * 255))
    store.write_json("predictions.json", {"layout": "folder"})


def test_evaluate_takes_the_same_pattern_and_template(local):
    truth, preds = local.store("drive"), local.store("pred")
    write_drive(truth)
    _prediction_folder(preds, {f"{k:02d}": expected_mask(k) for k in (1, 2, 3)})
    with pytest.raises(InputError, match="--image-pattern"):  # DRIVE's names do not match
        evaluate(preds.url, truth.url)
    res = evaluate(preds.url, truth.url, image_pattern=DRIVE_PATTERN, mask_template=DRIVE_TEMPLATE)
    assert (res.n, res.mean_dice, res.n_errors) == (3, 1.0, 0)
    # a truth folder of masks only: the template alone, read backwards
    res = evaluate(preds.url, truth.uri("1st_manual"), mask_template="{id}_manual1.gif")
    assert (res.n, res.mean_dice) == (3, 1.0)
    with pytest.raises(PairingError, match="--mask-template too"):
        evaluate(preds.url, truth.url, image_pattern=DRIVE_PATTERN)
    with pytest.raises(PairingError, match="give --image-pattern too"):
        evaluate(preds.url, truth.uri("1st_manual"), mask_template=DRIVE_TEMPLATE)


def test_evaluate_takes_the_same_pairs_csv(local):
    truth, preds = local.store("drive"), local.store("pred")
    write_drive(truth)
    _prediction_folder(preds, {"01": expected_mask(1), "02": expected_mask(2)})
    truth.write_bytes(
        "pairs.csv",
        b"image,mask,id\n"
        b"images/01_test.tif,1st_manual/01_manual1.gif,01\n"
        b"images/02_test.tif,1st_manual/gone.gif,02\n",
    )
    res = evaluate(preds.url, truth.url, pairs=truth.uri("pairs.csv"))
    assert (res.n, res.mean_dice) == (1, 1.0)
    assert list(res.errors) == ["02"] and "missing_mask" in res.errors["02"]


def test_predict_lists_inputs_with_the_same_options(local):
    src = local.store("drive")
    write_drive(src)
    cfg = PredictConfig(
        models="unused", out=local.url("out"), source=src.url, image_pattern=DRIVE_PATTERN
    )
    inputs = list_inputs(cfg)
    assert [it[:3] for it in inputs.items] == [
        [f"{k:02d}", f"images/{k:02d}_test.tif", f"{k:02d}.png"] for k in (1, 2, 3)
    ]
    src.write_bytes("pairs.csv", b"image\nimages/02_test.tif\nimages/09_test.tif\n")
    cfg = cfg.model_copy(update={"image_pattern": None, "pairs": src.uri("pairs.csv")})
    inputs = list_inputs(cfg)
    assert [it[:3] for it in inputs.items] == [["02_test", "images/02_test.tif", "02_test.png"]]
    (rej,) = inputs.rejected
    assert rej["reason"] == "unreadable" and "09_test.tif" in rej["detail"]
    with pytest.raises(ConfigError, match="give --source"):
        PredictConfig.load(None, models="m", out="o", dataset="d", image_pattern=DRIVE_PATTERN)


def test_the_flags_are_on_every_command():
    from typer.testing import CliRunner

    from segflow.cli import app

    runner = CliRunner()
    for command, flags in [
        ("ingest", ("--image-pattern", "--mask-template", "--pairs")),
        ("predict", ("--image-pattern", "--pairs")),
        ("evaluate", ("--image-pattern", "--mask-template", "--pairs")),
        ("crops", ("--image-glob", "--image-pattern", "--pairs")),
    ]:
        out = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert all(f in out for f in flags), (command, out)


def test_a_rerun_is_a_no_op_and_a_regrouped_row_is_updated(local):
    root = local.store("archive")
    for k in range(3):
        img, mask = coded_pair(k, H, W)
        root.write_bytes(f"s{k}.png", png_bytes(img))
        root.write_bytes(f"m{k}.png", png_bytes(mask))

    def write_csv(last_group: str) -> None:
        groups = ["a", "a", last_group]
        lines = ["image,mask,group"] + [f"s{k}.png,m{k}.png,{groups[k]}" for k in range(3)]
        root.write_bytes("pairs.csv", "\n".join(lines).encode())

    write_csv("b")
    assert _ingest(local, source=root.url, pairs=root.uri("pairs.csv")).n_new == 3
    again = _ingest(local, source=root.url, pairs=root.uri("pairs.csv"))
    assert (again.n_new, again.n_updated) == (0, 0)
    write_csv("c")
    res = _ingest(local, source=root.url, pairs=root.uri("pairs.csv"))
    assert (res.n_new, res.n_updated) == (0, 1)
    ds = Dataset.open(local.url("ds"))
    assert dict(zip(ds.ids, [str(g) for g in ds.column("groups")], strict=True)) == {
        "s0": "a",
        "s1": "a",
        "s2": "c",
    }


def test_evaluate_command_line_takes_the_pairing_flags(local):
    import json

    from typer.testing import CliRunner

    from segflow.cli import app

    truth, preds = local.store("drive"), local.store("pred")
    write_drive(truth, ks=(1,))
    _prediction_folder(preds, {"01": expected_mask(1)})
    args = ["evaluate", "--predictions", preds.url, "--truth", truth.url, "--json"]
    res = CliRunner().invoke(
        app, [*args, "--image-pattern", DRIVE_PATTERN, "--mask-template", DRIVE_TEMPLATE]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["mean_dice"] == 1.0
    bad = ["--image-pattern", r"(?P<id>\d+)_test\.tif", "--mask-template", "{id}.gif"]
    res = CliRunner().invoke(app, [*args, *bad])
    assert isinstance(res.exception, PairingError) and "matches none of" in str(res.exception)


# -- ids that cannot name an output -------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    ["", " ", "../x", "a/../../x", "a/..", "/abs", "\\abs", "a//b", "a\x00b", "a\nb", "..\\x"],
)
def test_id_problem_refuses_ids_that_would_leave_or_break_the_output(bad):
    from segflow.pairing import id_problem

    assert id_problem(bad)


@pytest.mark.parametrize("good", ["01", "sub/a", "ISIC_0000001", "a..b", "x.y"])
def test_id_problem_allows_ids_with_sub_folders(good):
    from segflow.pairing import id_problem

    assert id_problem(good) is None


def test_bad_ids_from_a_pairs_csv_or_a_pattern_are_dropped_with_a_reason(local):
    """An id with '..' (or a leading /, or empty) would fail the shard's mask writer on every
    retry: pairing drops its row with the reason and keeps the others."""
    from segflow.pairing import list_images

    root = local.store("src")
    for name in ("a.png", "b.png", "c.png", "_x.png"):
        root.write_bytes(name, png_bytes(coded_pair(0, H, W)[0]))
    rows = "image,id\na.png,../../etc/a\nb.png,/abs\nc.png,sub/c\n"
    root.write_bytes("pairs.csv", rows.encode())
    found, dropped = list_images(root.url, None, "*", None, root.uri("pairs.csv"))
    assert [(i, rel) for i, rel, _ in found] == [("sub/c", "c.png")]
    assert {d["id"]: d["reason"] for d in dropped} == {
        "../../etc/a": "unreadable",
        "/abs": "unreadable",
    }
    assert "'..' part" in dropped[0]["detail"] and "line 2" in dropped[0]["detail"]
    found, dropped = list_images(root.url, None, "*", r"(?P<id>[a-z]*)_?x?\.png", None)
    assert sorted(i for i, _, _ in found) == ["a", "b", "c"]
    assert [(d["id"], d["file"]) for d in dropped] == [("", root.uri("_x.png"))]
    assert "empty" in dropped[0]["detail"]
