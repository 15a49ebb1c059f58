"""Prediction: exact TTA, masks at the original size, resumable shards, Ray, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segflow.predict.config import PredictConfig
from segflow.predict.run import predict
from segflow.predict.tta import TTA_MODES, apply, invert, tta_mean
from segflow.storage import StorageOptions, Store
from segflow.train import train
from tests.makers import coded_pair, jpeg_bytes, png_bytes
from tests.train.conftest import make_dataset, small_config


@pytest.mark.parametrize("mode", ["none", "flips", "d4"])
def test_each_view_is_inverted_exactly(mode):
    x = torch.rand(2, 1, 8, 8)
    for v in TTA_MODES[mode]:
        assert torch.equal(invert(apply(x, v), v), x)
    assert len({tuple(apply(x, v).flatten().tolist()) for v in TTA_MODES[mode]}) == len(
        TTA_MODES[mode]
    )  # the views are distinct


def test_tta_is_exact_for_an_equivariant_model():
    conv = torch.nn.Conv2d(3, 1, 1)  # a 1x1 convolution commutes with flips and rotations
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        plain = torch.sigmoid(conv(x))
        for mode in TTA_MODES:
            assert torch.allclose(tta_mean(conv, x, mode), plain, atol=1e-6)


def test_tta_undoes_each_view_for_a_non_equivariant_model():
    # a "model" that marks the top-left pixel: every view's mark must land back top-left
    def marker(x: torch.Tensor) -> torch.Tensor:
        out = torch.full((x.shape[0], 1, *x.shape[-2:]), -20.0)
        out[..., 0, 0] = 20.0
        return out

    x = torch.zeros(1, 3, 6, 8)  # non-square: rotations change the shape
    p = tta_mean(marker, x, "d4")
    # each of the 8 views puts its mark on one corner of the original image
    assert p.shape == (1, 1, 6, 8)
    corners = p[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.allclose(corners, torch.full((4,), 0.25), atol=1e-6)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> tuple[str, Path]:
    base = tmp_path_factory.mktemp("ens")
    dataset = make_dataset(str(base), StorageOptions(), n=16, size=32)
    models = str(base / "models")
    cfg = small_config(dataset, models, epochs=2)
    res = train(cfg)
    assert [f.status for f in res.folds] == ["done", "done"]
    return models, base


def _raw_archive(folder: Path, n: int, sizes=((48, 64), (60, 40), (33, 47))) -> dict[str, tuple]:
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for k in range(n):
        h, w = sizes[k % len(sizes)]
        img, _ = coded_pair(k, h, w)
        name = f"ISIC_{k:07d}"
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(img))
        shapes[name] = (h, w)
    return shapes


def _masks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "masks").glob("*.png"))}


def test_masks_come_back_at_the_original_size(ensemble, tmp_path):
    models, _ = ensemble
    shapes = _raw_archive(tmp_path / "raw", 7)
    (tmp_path / "raw" / "ISIC_0000099.jpg").write_bytes(b"not a jpeg")
    cfg = PredictConfig(
        models=models,
        source=str(tmp_path / "raw"),
        out=str(tmp_path / "out"),
        layout="isic",
        tta="d4",
        executor="inline",
        shard_size=3,
    )
    res = predict(cfg)
    assert (res.n_images, res.n_shards, res.n_errors) == (7, 3, 1)
    assert res.errors[0]["id"] == "ISIC_0000099" and "unreadable" in res.errors[0]["error"]
    assert res.folds == [0, 1] and 0 < res.threshold < 1
    for name, (h, w) in shapes.items():
        m = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name}_segmentation.png"))
        assert m.shape == (h, w) and set(np.unique(m).tolist()) <= {0, 255}
    again = predict(cfg)
    assert again.shards_run == 0 and again.n_images == 7  # finished shards are not redone


def test_new_files_only_run_new_shards(ensemble, tmp_path):
    models, _ = ensemble
    _raw_archive(tmp_path / "raw", 4)
    cfg = PredictConfig(
        models=models,
        source=str(tmp_path / "raw"),
        out=str(tmp_path / "out"),
        layout="isic",
        tta="none",
        executor="inline",
        shard_size=2,
    )
    first = predict(cfg)
    img, _ = coded_pair(50)
    (tmp_path / "raw" / "ISIC_0000050.jpg").write_bytes(jpeg_bytes(img))
    figures = []
    second = predict(cfg, progress=figures.append)
    assert (first.n_shards, second.n_shards, second.shards_run) == (2, 3, 1)
    assert second.n_images == 5
    # progress over the whole archive: the 4 images of the earlier run count as done
    [fig] = figures
    assert (fig.done, fig.total, fig.eta_s) == (5, 5, 0.0) and fig.rate > 0


def test_sigkill_mid_run_then_rerun_equals_a_clean_run(ensemble, tmp_path):
    models, _ = ensemble
    _raw_archive(tmp_path / "raw", 48, sizes=((96, 128), (120, 90)))
    clean = tmp_path / "clean"
    base = {
        "models": models,
        "source": str(tmp_path / "raw"),
        "layout": "isic",
        "tta": "d4",
        "executor": "inline",
        "shard_size": 4,
        "batch_size": 2,
    }
    predict(PredictConfig(out=str(clean), **base))

    killed = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "segflow.cli",
        "predict",
        "--models",
        models,
        "--source",
        base["source"],
        "--out",
        str(killed),
        "--layout",
        "isic",
        "--tta",
        "d4",
        "--executor",
        "inline",
        "--shard-size",
        "4",
        "--batch-size",
        "2",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((killed / "_shards").glob("shard-*.complete.json"))) >= 3:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((killed / "_shards").glob("shard-*.complete.json")))
    assert 3 <= done < 12, f"kill landed outside the run ({done} shards done)"
    res = predict(PredictConfig(out=str(killed), **base))
    assert res.shards_run == 12 - done
    assert _masks(killed) == _masks(clean)


def test_dataset_input_and_probabilities(ensemble, tmp_path):
    models, base = ensemble
    cfg = PredictConfig(
        models=models,
        dataset=str(base / "ds"),
        out=str(tmp_path / "out"),
        tta="flips",
        executor="inline",
        save_probabilities=True,
        threshold=0.5,
        postprocess="lcc",
    )
    res = predict(cfg)
    assert (res.n_images, res.threshold, res.postprocess) == (16, 0.5, "lcc")
    names = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    assert names[0] == "ISIC_0000000_segmentation.png" and len(names) == 16
    import zarr

    probs = zarr.open_array(str(tmp_path / "out"), path="probabilities.zarr/shard-00000", mode="r")
    assert probs.shape == (16, 32, 32) and probs.dtype == np.uint8


def test_predict_on_local_ray(ensemble, tmp_path, local_ray):
    models, _ = ensemble
    shapes = _raw_archive(tmp_path / "raw", 5)
    cfg = PredictConfig(
        models=models,
        source=str(tmp_path / "raw"),
        out=str(tmp_path / "out"),
        layout="isic",
        tta="flips",
        shard_size=2,
    )
    res = predict(cfg)
    assert (res.n_images, res.shards_run, res.n_errors) == (5, 3, 0)
    assert len(_masks(tmp_path / "out")) == len(shapes)


@pytest.mark.s3
def test_predict_between_s3_buckets(ensemble, s3_endpoint):
    from tests.conftest import make_bucket

    models, _ = ensemble
    storage = StorageOptions(endpoint_url=s3_endpoint)
    bucket = make_bucket(s3_endpoint)
    raw = Store(f"s3://{bucket}/raw", storage)
    for k in range(3):
        raw.write_bytes(f"ISIC_{k:07d}.jpg", jpeg_bytes(coded_pair(k, 40, 56)[0]))
    cfg = PredictConfig(
        models=models,
        source=raw.url,
        out=f"s3://{bucket}/out",
        layout="isic",
        tta="none",
        executor="inline",
        storage=storage,
    )
    res = predict(cfg)
    assert res.n_images == 3
    out = Store(f"s3://{bucket}/out", storage)
    data = out.read_bytes("masks/ISIC_0000001_segmentation.png")
    import io

    assert Image.open(io.BytesIO(data)).size == (56, 40)


def test_ids_that_differ_only_by_extension(ensemble, tmp_path):
    models, _ = ensemble
    raw = tmp_path / "raw"
    _raw_archive(raw, 3)  # ISIC_0000001.jpg is 60x40 (H x W)
    (raw / "ISIC_0000001.png").write_bytes(png_bytes(coded_pair(9, 40, 56)[0]))
    cfg = PredictConfig(
        models=models,
        source=str(raw),
        out=str(tmp_path / "out"),
        layout="isic",
        tta="none",
        executor="inline",
        shard_size=2,
    )
    res = predict(cfg)
    assert (res.n_images, res.n_errors, res.n_rejected) == (3, 0, 1)
    [rejected] = res.rejected
    assert (rejected["file"], rejected["reason"]) == ("ISIC_0000001.png", "duplicate_id")
    assert "ISIC_0000001.jpg" in rejected["detail"]
    # the first in path order is predicted, every time: the .jpg's size, not the .png's
    mask = Image.open(tmp_path / "out" / "masks" / "ISIC_0000001_segmentation.png")
    assert mask.size == (40, 60)
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert record["layout"] == "isic" and record["rejected"][0]["reason"] == "duplicate_id"
    again = predict(cfg)
    assert again.shards_run == 0 and again.n_rejected == 1


def test_record_names_the_mask_layout(ensemble, tmp_path):
    """crops, evaluate and export-rle read the masks' naming from predictions.json."""
    models, _ = ensemble
    _raw_archive(tmp_path / "raw", 2)
    cfg = PredictConfig(
        models=models,
        source=str(tmp_path / "raw"),
        out=str(tmp_path / "out"),
        tta="none",
        executor="inline",
        threshold=0.5,
        postprocess="none",
    )  # the default layout: folder
    assert predict(cfg).layout == "folder"
    assert sorted(_masks(tmp_path / "out")) == ["ISIC_0000000.png", "ISIC_0000001.png"]
    from segflow.predict.outputs import open_predictions

    assert open_predictions(str(tmp_path / "out"), layout="isic").layout == "folder"


def test_a_manifest_holding_an_id_twice_is_repaired_once(tmp_path):
    """Manifests written before duplicate ids were refused: the shard that held the id twice
    runs once more, then never again."""
    from segflow.predict.run import MANIFEST, Inputs, plan_shards, read_shard, shard_marker

    out = Store(str(tmp_path / "out"))
    jpg, png = ["a", "a.jpg", "a.png", "f1"], ["a", "a.png", "a.png", "f2"]
    out.write_json(MANIFEST, {"shard_size": 4, "shards": [{"shard": 0, "items": [jpg, png]}]})
    out.mark_complete(shard_marker(0), {"outputs": [], "errors": []})
    inputs = Inputs([jpg], [{"file": "a.png", "id": "a", "reason": "duplicate_id"}], "folder")
    assert read_shard(out, plan_shards(out, inputs, 4)[0])["items"] == [jpg]
    assert out.read_marker(shard_marker(0)) is None  # runs again, once
    out.mark_complete(shard_marker(0), {"outputs": [], "errors": []})
    plan_shards(out, inputs, 4)
    assert out.read_marker(shard_marker(0)) is not None
    assert out.read_json(MANIFEST)["rejected"][0]["reason"] == "duplicate_id"


def _pairs_source(tmp_path: Path) -> tuple[Path, Path]:
    """A source of two images and a pairs CSV beside it (outside the source) naming them, a
    file outside the source and a file that does not exist."""
    _raw_archive(tmp_path / "src" / "images", 2)
    outside = tmp_path / "other" / "x.jpg"
    outside.parent.mkdir()
    outside.write_bytes((tmp_path / "src" / "images" / "ISIC_0000000.jpg").read_bytes())
    csv_path = tmp_path / "pairs.csv"
    rows = ["image", "src/images/ISIC_0000000.jpg", "src/images/ISIC_0000001.jpg", str(outside)]
    csv_path.write_text("\n".join([*rows, "src/images/09.jpg"]) + "\n")
    return tmp_path / "src", csv_path


def test_pairs_rows_left_out_keep_their_urls_in_the_summary(ensemble, tmp_path):
    """Rows a pairs CSV names outside the source, or that do not exist, are rejected with the
    file's own URL: the run completes and the QA table's source is that URL, not the source
    joined to it (which raised 'escapes its store' after every shard, or doubled the path)."""
    import csv

    models, _ = ensemble
    src, pairs = _pairs_source(tmp_path)
    cfg = PredictConfig(
        models=models,
        source=str(src),
        pairs=str(pairs),
        out=str(tmp_path / "out"),
        tta="none",
        executor="inline",
    )
    res = predict(cfg)
    assert (res.n_images, res.n_rejected) == (2, 2)
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert rows["x"]["source"] == str(tmp_path / "other" / "x.jpg")
    assert rows["09"]["source"] == str(src / "images" / "09.jpg")
    assert rows["x"]["status"] == rows["09"]["status"] == "rejected"


def test_plan_key_follows_an_edited_pairs_csv(tmp_path):
    """The pairs CSV chooses the images: editing it (outside the source) changes the plan key,
    as it changes ingest's."""
    from segflow.pipeline.manifests import ResolvedVersion
    from segflow.pipeline.stages import plan_key

    src, pairs = _pairs_source(tmp_path)
    cfg = PredictConfig(models="m", source=str(src), pairs=str(pairs), out=str(tmp_path / "o"))
    version = ResolvedVersion(id="v1", models="m", record={}, hash="h")
    first = plan_key(cfg, version)
    assert plan_key(cfg, version) == first
    pairs.write_text("image\nsrc/images/ISIC_0000000.jpg\n")
    assert plan_key(cfg, version) != first


def test_masks_are_flushed_before_the_shard_is_marked_done(ensemble, tmp_path, monkeypatch):
    """Masks are written without fsync; the shard's done-marker must follow a flush, or a
    power cut leaves a 'done' shard with masks that never reached the disk."""
    calls: list[str] = []
    flush, mark = Store.flush, Store.mark_complete

    def recording_flush(self):
        calls.append("flush")
        return flush(self)

    def recording_mark(self, name, payload):
        if "/shard-" in name:
            calls.append("mark")
        return mark(self, name, payload)

    monkeypatch.setattr(Store, "flush", recording_flush)
    monkeypatch.setattr(Store, "mark_complete", recording_mark)
    models, _ = ensemble
    _raw_archive(tmp_path / "raw", 2)
    cfg = PredictConfig(
        models=models,
        source=str(tmp_path / "raw"),
        out=str(tmp_path / "out"),
        tta="none",
        executor="inline",
        shard_size=1,
    )
    predict(cfg)
    marks = [i for i, c in enumerate(calls) if c == "mark"]
    assert len(marks) == 2 and all(i > 0 and calls[i - 1] == "flush" for i in marks)
