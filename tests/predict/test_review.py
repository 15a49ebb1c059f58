"""Per-image QA: the ensemble's view-disagreement score, its OOF calibration, the QA table
(summary.parquet + summary.csv) and the review gallery of `segflow predict`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from segflow.cli import app
from segflow.predict.ensemble import Ensemble
from segflow.predict.table import COLUMNS
from segflow.predict.uncertainty import calibrate, needs_review, view_disagreement
from segflow.storage import StorageOptions
from segflow.train import train
from segflow.train.model import ModelSpec
from tests.makers import coded_pair, jpeg_bytes, png_bytes
from tests.train.conftest import make_dataset, small_config


# -- the score ------------------------------------------------------------------------------------
class _Blob(torch.nn.Module):
    """Logits of a centred square on dark images; on bright ones, a bar along the left
    (``side=0``) or right (``side=1``) edge: the views and the folds disagree there."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        out = torch.full((b, 1, h, w), -12.0)
        bright = x.mean((1, 2, 3)) > 0
        for i in range(b):
            if bright[i]:
                cols = slice(0, w // 3) if self.side == 0 else slice(w - w // 3, w)
                out[i, :, :, cols] = 12.0
            else:
                out[i, :, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 12.0
        return out


def _spec(size: int) -> ModelSpec:
    return ModelSpec(
        arch="Unet",
        encoder="resnet18",
        input_size=(size, size),
        dataset_size=(size, size),
        resize="stretch",
    )


def test_an_image_whose_views_disagree_is_flagged():
    spec = _spec(16)
    ens = Ensemble([_Blob(0), _Blob(1)], [spec, spec], [0, 1], torch.device("cpu"))
    images = np.stack([np.full((16, 16, 3), 10, np.uint8), np.full((16, 16, 3), 250, np.uint8)])
    probs, scores = ens.predict_scored(images, "flips")
    assert probs.shape == (2, 16, 16) and scores.shape == (2,)
    np.testing.assert_allclose(probs, ens.predict(images, "flips"))  # same map as predict()
    assert scores[0] < 1e-4  # every view of every fold draws the same square
    assert scores[1] > 0.5  # left bar vs right bar
    assert [needs_review(float(s), 0.3) for s in scores] == [False, True]
    assert needs_review(0.9, None) is None and needs_review(None, 0.3) is None


def test_the_score_is_one_minus_mean_pairwise_soft_dice():
    a = torch.zeros(4, 4)
    a[:2] = 0.6
    b = torch.zeros(4, 4)
    b[1:3] = 0.6
    views = torch.stack([a, a, b])[:, None]  # (V=3, B=1, H, W)
    # pairs: (a, a) = 1, (a, b) = 2 * 4 * 0.36 / (8 * 0.36 + 8 * 0.36) = 0.5, twice
    assert view_disagreement(views).item() == pytest.approx(1 - (1 + 0.5 + 0.5) / 3)
    assert view_disagreement(torch.zeros(2, 1, 4, 4)).item() == 0  # both empty: agreement
    assert view_disagreement(views[:1]) is None  # one view: nothing to disagree


# -- calibration ----------------------------------------------------------------------------------
def test_calibration_picks_the_best_f1_threshold():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.05])
    jaccard = np.array([0.9, 0.8, 0.5, 0.3, 0.7, 0.95])  # bad (< 0.65): 0.3 and 0.8
    c = calibrate(scores, jaccard)
    # cut 0.9: F1 0; 0.8: 0.5; 0.3: P 2/3, R 1, F1 0.8; 0.2: P 1/2, R 1, F1 0.667
    assert c.threshold == 0.3 and c.n_flagged == 3 and c.n_bad == 2
    assert (c.precision, c.recall, c.f1) == pytest.approx((2 / 3, 1.0, 0.8))
    assert calibrate(scores, np.ones(6)) is None  # nothing bad: nothing to calibrate on


def test_calibration_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    jaccard = rng.uniform(0, 1, 300)
    scores = np.round(1 - jaccard + rng.normal(0, 0.3, 300), 2)  # ties included
    c = calibrate(scores, jaccard)
    bad = jaccard < 0.65

    def f1(cut: float) -> float:
        flag = scores >= cut
        tp = (flag & bad).sum()
        return 0.0 if tp == 0 else 2 * tp / (flag.sum() + bad.sum())

    best = max(f1(t) for t in np.unique(scores))
    assert c.f1 == pytest.approx(best)
    assert f1(c.threshold) == pytest.approx(best)


# -- the QA table and the gallery -----------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("qa")
    dataset = make_dataset(str(base), StorageOptions(), n=16, size=32)
    url = str(base / "models")
    assert [f.status for f in train(small_config(dataset, url, epochs=1)).folds] == ["done"] * 2
    return url


def _archive(folder: Path) -> None:
    folder.mkdir(parents=True)
    for k, (h, w) in enumerate([(48, 64), (60, 40), (33, 47), (40, 40)]):
        (folder / f"ISIC_{k:07d}.jpg").write_bytes(jpeg_bytes(coded_pair(k, h, w)[0]))
    (folder / "ISIC_0000099.jpg").write_bytes(b"not a jpeg")  # decode error: rejected
    (folder / "ISIC_0000001.png").write_bytes(png_bytes(coded_pair(9, 40, 56)[0]))  # duplicate


def _predict(models: str, raw: Path, out: Path, *extra: str):
    args = ["predict", "--models", models, "--source", str(raw), "--out", str(out)]
    args += ["--layout", "isic", "--executor", "inline", "--shard-size", "2", "--json", *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_summary_table_has_every_column_and_a_row_per_input(models, tmp_path):
    _archive(tmp_path / "raw")
    gallery = tmp_path / "gallery"
    out = tmp_path / "out"
    record = _predict(models, tmp_path / "raw", out, "--review-gallery", str(gallery))
    table = pq.read_table(out / "summary.parquet")
    assert tuple(table.column_names) == COLUMNS
    assert len(table) == 6  # 4 predicted, 1 unreadable, 1 duplicate id
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    rows = {r["id"]: r for r in table.to_pylist()[::-1]}  # the predicted row of a duplicate id
    assert len(ok) == 4 and len(rows) == 5
    for r in ok:
        assert r["model_version"] == "unversioned" and 0 < r["threshold"] < 1
        assert r["postprocess"] in ("none", "lcc", "lcc_fill") and r["reason"] is None
        assert 0 <= r["foreground_fraction"] <= 1 and r["area_px"] >= 0
        assert r["area_px"] == round(r["foreground_fraction"] * r["width"] * r["height"])
        assert 0 <= r["uncertainty"] <= 1 and r["needs_review"] in (True, False)
        if r["area_px"]:
            assert r["n_components"] >= 1 and 0 <= r["x0"] < r["x1"] <= r["width"]
            assert 0.0 < r["mean_prob_fg"] <= 1.0
        assert (out / r["mask"]).exists()
    assert (rows["ISIC_0000000"]["width"], rows["ISIC_0000000"]["height"]) == (64, 48)
    bad = rows["ISIC_0000099"]
    assert bad["status"] == "rejected" and "unreadable" in bad["reason"]
    assert bad["source"].endswith("ISIC_0000099.jpg") and bad["uncertainty"] is None
    dup = [r for r in table.to_pylist() if (r["reason"] or "").startswith("duplicate_id: ")]
    assert [d["source"].rsplit("/", 1)[-1] for d in dup] == ["ISIC_0000001.png"]
    with open(out / "summary.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert tuple(csv_rows[0]) == COLUMNS and len(csv_rows) == 6
    assert record["table"].endswith("summary.parquet") and record["review_threshold"] is not None
    assert record["n_review"] == sum(bool(r["needs_review"]) for r in ok)
    # the gallery: the 4 scored images, most uncertain first, as static files
    for name in ("index.html", "review.png", "uncertainty.png", "review.json"):
        assert (gallery / name).stat().st_size > 0
    items = json.loads((gallery / "review.json").read_text())["items"]
    assert [i["uncertainty"] for i in items] == sorted((r["uncertainty"] for r in ok), reverse=True)
    page = (gallery / "index.html").read_text()
    assert all(i["id"] in page for i in items) and 'src="review.png"' in page


def test_a_version_without_calibration_leaves_needs_review_empty(models, tmp_path, caplog):
    choice_file = Path(models) / "postprocess.json"
    choice = json.loads(choice_file.read_text()) if choice_file.exists() else None
    _archive(tmp_path / "raw")
    _predict(models, tmp_path / "raw", tmp_path / "first")  # writes the calibrated choice
    saved = json.loads(choice_file.read_text())
    try:
        old = {k: v for k, v in saved.items() if k not in ("review_threshold", "review")}
        choice_file.write_text(json.dumps(old))  # as written before the calibration existed
        record = _predict(models, tmp_path / "raw", tmp_path / "out")
    finally:
        choice_file.write_text(json.dumps(choice or saved))
    assert record["n_review"] is None and record["review_threshold"] is None
    table = pq.read_table(tmp_path / "out" / "summary.parquet").to_pylist()
    assert len(table) == 6 and all(r["needs_review"] is None for r in table)
    assert all(r["uncertainty"] is not None for r in table if r["status"] == "ok")


def test_summary_csv_defuses_spreadsheet_formulas(tmp_path):
    """A text cell starting with = + - @ (a file named '=HYPERLINK(...)') would run as a formula
    when summary.csv is opened in a spreadsheet: the CSV prefixes it with ', the Parquet keeps
    the text as it is."""
    from segflow.predict.table import SUMMARY, SUMMARY_CSV, RunColumns, concatenate, rejected_row
    from segflow.storage import Store

    out = Store(str(tmp_path))
    extra = [rejected_row("=HYPERLINK(1)", "@x.png", "-bad"), rejected_row("a-b", "+1", "ok")]
    concatenate(out, [], extra, RunColumns("=v1", 0.5, "none", None))
    with open(tmp_path / SUMMARY_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["source"], r["reason"]) for r in rows] == [
        ("'=HYPERLINK(1)", "'@x.png", "'-bad"),
        ("a-b", "'+1", "ok"),
    ]
    assert rows[0]["model_version"] == "'=v1" and rows[0]["threshold"] == "0.5"
    table = pq.read_table(tmp_path / SUMMARY).to_pylist()
    assert [r["id"] for r in table] == ["=HYPERLINK(1)", "a-b"] and table[0]["reason"] == "-bad"
