"""Evaluation against hand-worked masks written as PNGs (local folder and S3)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from segflow.errors import ConfigError, InputError
from segflow.evaluate import evaluate, list_masks, sort_ids
from tests.makers import png_bytes

H = W = 8


def square(top: int = 2, left: int = 2, size: int = 4, hw: tuple[int, int] = (H, W)) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    m[top : top + size, left : left + size] = 1
    return m


EMPTY = np.zeros((H, W), np.uint8)


def put(store, name: str, mask: np.ndarray, scale: int = 255) -> None:
    store.write_bytes(name, png_bytes(mask * scale))


def read_rows(store) -> dict[str, dict[str, str]]:
    text = store.read_bytes("evaluation.csv").decode()
    return {r["id"]: r for r in csv.DictReader(io.StringIO(text))}


def write_isic(truth, preds, cases: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
    for id_, (t, p) in cases.items():
        put(truth, f"{id_}_segmentation.png", t)
        if p is not None:
            put(preds, f"{id_}_segmentation.png", p)


# ISIC_1 perfect, ISIC_2 empty/empty, ISIC_3 empty prediction, ISIC_4 shifted by one column:
# the 4x4 squares share 12 pixels, their union is 20 -> J 0.6 (< 0.65: thresholded to 0),
# dice 2*12/(16+16) = 0.75.
CASES = {
    "ISIC_1": (square(), square()),
    "ISIC_2": (EMPTY, EMPTY),
    "ISIC_3": (square(), EMPTY),
    "ISIC_4": (square(), square(left=3)),
}


def test_hand_worked_scores(local):
    truth, preds = local.store("truth"), local.store("preds")
    write_isic(truth, preds, CASES)

    res = evaluate(preds.url, truth.url, "isic", workers=2)

    rows = read_rows(preds)
    assert list(rows) == ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"]
    expect = {  # dice, jaccard, thresholded, tp, fp, fn, tn
        "ISIC_1": (1.0, 1.0, 1.0, 16, 0, 0, 48),
        "ISIC_2": (1.0, 1.0, 1.0, 0, 0, 0, 64),
        "ISIC_3": (0.0, 0.0, 0.0, 0, 0, 16, 48),
        "ISIC_4": (0.75, 0.6, 0.0, 12, 4, 4, 44),
    }
    for id_, (d, j, tj, tp, fp, fn, tn) in expect.items():
        r = rows[id_]
        assert float(r["dice"]) == pytest.approx(d)
        assert float(r["jaccard"]) == pytest.approx(j)
        assert float(r["thresholded_jaccard"]) == pytest.approx(tj)
        assert (int(r["tp"]), int(r["fp"]), int(r["fn"]), int(r["tn"])) == (tp, fp, fn, tn)
        assert r["resized"] == "false" and r["missing"] == "false" and r["error"] == ""

    assert res.n == 4 and res.n_errors == 0
    assert res.mean_dice == pytest.approx((1 + 1 + 0 + 0.75) / 4)
    assert res.mean_jaccard == pytest.approx((1 + 1 + 0 + 0.6) / 4)
    assert res.mean_thresholded_jaccard == pytest.approx(0.5)
    assert res.missing_predictions == [] and res.unmatched_predictions == []
    assert res.per_image_csv == preds.uri("evaluation.csv")
    assert res.summary_json == preds.uri("evaluation.json")


def test_confusion_counts_percent_and_recall(local):
    truth, preds = local.store("truth"), local.store("preds")
    write_isic(truth, preds, CASES)

    c = evaluate(preds.url, truth.url, "isic").confusion

    # summed over the four images above: 4 * 64 = 256 pixels
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (28, 4, 20, 204)
    assert c["total"] == 256
    assert c["percent"] == pytest.approx({"tp": 10.9375, "fp": 1.5625, "fn": 7.8125, "tn": 79.6875})
    assert sum(c["percent"].values()) == pytest.approx(100.0)
    assert c["recall_foreground"] == pytest.approx(28 / 48)
    assert c["recall_background"] == pytest.approx(204 / 208)


def test_summary_json_matches_result(local):
    truth, preds = local.store("truth"), local.store("preds")
    write_isic(truth, preds, CASES)

    res = evaluate(preds.url, truth.url, "isic")

    summary = preds.read_json("evaluation.json")
    assert summary["layout"] == "isic" and summary["truth"] == truth.url
    for key, value in res.to_dict().items():
        assert summary[key] == value, key
    json.dumps(res.to_dict())  # the CLI prints it: must be plain JSON


def test_half_resolution_prediction_is_resized_to_truth(local):
    truth, preds = local.store("truth"), local.store("preds")
    put(truth, "ISIC_1_segmentation.png", square(2, 2, 4))
    # the same square at half resolution: nearest-neighbour upscaling doubles each pixel
    put(preds, "ISIC_1_segmentation.png", square(1, 1, 2, hw=(H // 2, W // 2)))
    # and one that is larger than the truth: 16x16 down to 8x8
    put(truth, "ISIC_2_segmentation.png", square(2, 2, 4))
    put(preds, "ISIC_2_segmentation.png", square(4, 4, 8, hw=(2 * H, 2 * W)))

    res = evaluate(preds.url, truth.url, "isic")

    rows = read_rows(preds)
    for id_ in ("ISIC_1", "ISIC_2"):
        assert rows[id_]["resized"] == "true"
        assert float(rows[id_]["dice"]) == 1.0
        # counted at the truth's resolution
        assert int(rows[id_]["tp"]) + int(rows[id_]["tn"]) == H * W
    assert res.mean_dice == 1.0


def test_missing_and_unmatched_predictions(local):
    truth, preds = local.store("truth"), local.store("preds")
    write_isic(truth, preds, {"ISIC_1": (square(), square()), "ISIC_5": (square(), None)})
    put(truth, "ISIC_6_segmentation.png", EMPTY)  # empty truth, no prediction: correct
    put(preds, "ISIC_9_segmentation.png", square())  # no truth: listed, not scored
    truth.write_bytes("LICENSE.txt", b"ISIC truth folders ship text files too")

    res = evaluate(preds.url, truth.url, "isic")

    assert res.missing_predictions == ["ISIC_5", "ISIC_6"]
    assert res.unmatched_predictions == ["ISIC_9"]
    rows = read_rows(preds)
    assert set(rows) == {"ISIC_1", "ISIC_5", "ISIC_6"}
    assert rows["ISIC_5"]["missing"] == "true"
    assert float(rows["ISIC_5"]["dice"]) == 0.0
    assert (int(rows["ISIC_5"]["fn"]), int(rows["ISIC_5"]["tn"])) == (16, 48)
    assert float(rows["ISIC_6"]["dice"]) == 1.0
    assert res.n == 3 and res.mean_dice == pytest.approx(2 / 3)


def test_unreadable_files_are_reported_not_fatal(local):
    truth, preds = local.store("truth"), local.store("preds")
    write_isic(truth, preds, {"ISIC_1": (square(), square())})
    put(truth, "ISIC_2_segmentation.png", square())
    preds.write_bytes("ISIC_2_segmentation.png", b"\x89PNG but truncated")
    truth.write_bytes("ISIC_3_segmentation.png", b"")
    put(preds, "ISIC_3_segmentation.png", square())

    res = evaluate(preds.url, truth.url, "isic")

    assert res.n == 1 and res.n_errors == 2
    assert res.mean_dice == 1.0  # the two bad images stay out of the means
    assert res.confusion["tp"] == 16 and res.confusion["total"] == 64
    assert set(res.errors) == {"ISIC_2", "ISIC_3"}
    assert res.errors["ISIC_2"].startswith("prediction ")
    assert res.errors["ISIC_3"].startswith("truth ")
    rows = read_rows(preds)
    assert "ISIC_2_segmentation.png" in rows["ISIC_2"]["error"]
    assert rows["ISIC_2"]["dice"] == "" and rows["ISIC_2"]["tp"] == ""
    assert preds.read_json("evaluation.json")["n_errors"] == 2


def test_all_unreadable_gives_no_means(local):
    truth, preds = local.store("truth"), local.store("preds")
    put(truth, "a.png", square())
    preds.write_bytes("a.png", b"garbage")

    res = evaluate(preds.url, truth.url, layout="folder")

    assert res.n == 0 and res.mean_dice is None
    assert res.confusion["percent"]["tp"] is None


def test_folder_layout_pairs_by_name_and_reads_label_maps(local):
    truth, preds = local.store("truth"), local.store("preds")
    put(truth, "1.png", square(), scale=1)  # a {0,1} label map, not 0/255
    put(preds, "1.png", square())
    put(truth, "2.png", square(), scale=1)
    put(preds, "2.png", square(left=3))
    put(truth, "10.png", EMPTY, scale=1)
    put(preds, "10.png", EMPTY)

    res = evaluate(preds.url, truth.url, layout="folder")

    assert list(read_rows(preds)) == ["1", "2", "10"]  # numeric order
    assert res.mean_dice == pytest.approx((1 + 0.75 + 1) / 3)
    assert res.mean_thresholded_jaccard == pytest.approx(2 / 3)


def test_against_storage_location(location):
    truth, preds = location.store("truth"), location.store("preds")
    write_isic(truth, preds, CASES)
    put(preds, "ISIC_9_segmentation.png", square())

    res = evaluate(preds.url, truth.url, "isic", storage=location.storage)

    assert res.n == 4 and res.mean_dice == pytest.approx(0.6875)
    assert res.unmatched_predictions == ["ISIC_9"]
    assert res.per_image_csv == preds.uri("evaluation.csv")
    rows = read_rows(preds)
    assert float(rows["ISIC_4"]["jaccard"]) == pytest.approx(0.6)
    assert preds.read_json("evaluation.json")["mean_dice"] == pytest.approx(0.6875)


def test_bad_arguments(local):
    truth, preds = local.store("truth"), local.store("preds")
    put(truth, "ISIC_1_segmentation.png", square())
    with pytest.raises(ConfigError, match="unknown layout 'nerve'"):
        evaluate(preds.url, truth.url, layout="nerve")
    with pytest.raises(InputError, match="no predicted masks"):
        evaluate(preds.url, truth.url)
    with pytest.raises(InputError, match="no ground-truth masks"):
        evaluate(truth.url, local.url("nowhere"))


def test_list_masks_and_sort_ids(local):
    store = local.store("m")
    for name in ("b_segmentation.PNG", "a_segmentation.png", "a.png", "x.txt"):
        store.write_bytes(name, b"")
    assert list_masks(store, "isic") == {"a": "a_segmentation.png", "b": "b_segmentation.PNG"}
    assert set(list_masks(store, "folder")) == {"a", "a_segmentation", "b_segmentation"}
    assert sort_ids(["10", "9", "1"]) == ["1", "9", "10"]
    assert sort_ids(["10", "9", "a"]) == ["10", "9", "a"]


def _predict_output(preds, cases: dict[str, np.ndarray], layout: str = "isic") -> None:
    """What `segflow predict` leaves: masks/ named by its layout, predictions.json last."""
    suffix = "_segmentation.png" if layout == "isic" else ".png"
    for id_, mask in cases.items():
        put(preds, f"masks/{id_}{suffix}", mask)
    preds.write_json("predictions.json", {"layout": layout, "n_images": len(cases)})


@pytest.mark.parametrize("given", ["root", "masks"])
def test_predict_output_folder_or_its_masks(local, given):
    truth, preds = local.store("truth"), local.store("pred")
    write_isic(truth, local.store("unused"), CASES)
    _predict_output(preds, {i: p for i, (_, p) in CASES.items()})
    url = preds.url if given == "root" else preds.uri("masks")
    res = evaluate(url, truth.url, workers=2)  # the naming comes from predictions.json
    assert res.n == 4 and res.mean_dice == pytest.approx((1 + 1 + 0 + 0.75) / 4)
    assert res.missing_predictions == [] and res.unmatched_predictions == []
    # beside masks/, not inside it
    assert res.per_image_csv == preds.uri("evaluation.csv")
    assert preds.exists("evaluation.json") and preds.exists("evaluate.complete.json")
    assert not preds.exists("masks/evaluation.csv")


def test_no_match_is_an_error_naming_both_sides(local):
    truth, preds = local.store("truth"), local.store("pred")
    _predict_output(preds, {"IMD002": square(), "IMD003": square()}, layout="folder")
    for id_ in ("IMD002", "IMD003"):  # PH2 naming
        buf = io.BytesIO()
        Image.fromarray(square() * 255).save(buf, "BMP")
        truth.write_bytes(f"{id_}_lesion.bmp", buf.getvalue())
    with pytest.raises(InputError, match="no prediction matches") as e:
        evaluate(preds.url, truth.url)
    assert "IMD002_lesion.bmp" in str(e.value) and "IMD002.png" in str(e.value)
    assert "--mask-template" in str(e.value)
    assert not preds.exists("evaluation.json")
    res = evaluate(preds.url, truth.url, mask_template="{stem}_lesion.bmp")
    assert res.n == 2 and res.mean_dice == 1.0


def test_mask_template_must_name_the_stem(local):
    truth, preds = local.store("truth"), local.store("pred")
    _predict_output(preds, {"a": square()}, layout="folder")
    put(truth, "a_lesion.png", square())
    with pytest.raises(ConfigError, match="stem"):
        evaluate(preds.url, truth.url, mask_template="{name}_lesion.png")


# -- pairing options (segflow.pairing): the same rules as ingest and predict --------------------
def test_pairs_csv_images_may_be_anywhere_masks_inside_truth(local):
    """Evaluate reads no image: a pairs CSV's image cell only names the row, so an ingest CSV
    (images/ and truth/ beside it) works with --truth the masks' folder; a mask outside
    --truth is still refused, as ingest refuses one outside --masks."""
    archive, preds = local.store("archive"), local.store("pred")
    _predict_output(preds, {"01": square(), "02": square(left=3)}, layout="folder")
    put(archive, "truth/01_manual.png", square())
    put(archive, "truth/02_manual.png", square())
    put(archive, "elsewhere/03_manual.png", square())
    archive.write_bytes(
        "pairs.csv",
        b"image,mask\n"
        b"images/01.tif,truth/01_manual.png\n"  # images/ is not inside --truth
        + f"{archive.uri('images/02.tif')},{archive.uri('truth/02_manual.png')}\n".encode()
        + b"images/03.tif,elsewhere/03_manual.png\n",
    )
    res = evaluate(preds.url, archive.uri("truth"), pairs=archive.uri("pairs.csv"))
    assert res.n == 2 and res.mean_dice == pytest.approx((1.0 + 0.75) / 2)
    assert list(res.errors) == ["03"] and "outside" in res.errors["03"]
    assert "--truth" in res.errors["03"]


def test_image_pattern_ids_are_checked_and_deduplicated_as_ingest_does(local):
    """An id that cannot name a row (empty) is left out with its reason; two images of one
    id: the first in path order is scored, the other is duplicate_id."""
    archive, preds = local.store("archive"), local.store("pred")
    _predict_output(preds, {"01": square(), "02": square()}, layout="folder")
    for name in ("01_test.png", "02_test.png", "02_test.tif", "_test.png"):
        archive.write_bytes(f"images/{name}", b"not read")
    for i in ("01", "02", ""):
        put(archive, f"truth/{i}_manual.png", square())
    res = evaluate(
        preds.url,
        archive.url,
        image_pattern=r"images/(?P<id>\d*)_test\.(?:png|tif)",
        mask_template="../truth/{id}_manual.png",
    )
    assert (res.n, res.mean_dice, res.missing_predictions) == (2, 1.0, [])
    assert res.errors[""].startswith("unreadable: the id is empty")
    assert res.errors["02"].startswith("duplicate_id: images/02_test.tif has the id 02")
    assert "images/02_test.png, which is scored" in res.errors["02"]
