"""Training: learning happens, exact resume after SIGKILL, folds on Ray, storage on S3."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from segflow.errors import ConfigError, InputError
from segflow.storage import Store
from segflow.train import TrainConfig, fit_fold, load_model, train
from segflow.train.loop import METRICS_COLUMNS
from segflow.train.model import build_model, load_checkpoint, load_spec
from tests.train.conftest import make_dataset, small_config


def _metrics(store: Store) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(store.read_bytes("metrics.csv").decode())))


def test_model_learns_and_writes_every_artifact(tiny_dataset, local):
    cfg = small_config(tiny_dataset, local.url("models"), epochs=6, batch_size=4)
    res = fit_fold(cfg, 0)
    assert res.status == "done" and res.epochs_run == 6
    fold = local.store("models/fold-0")
    rows = _metrics(fold)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # an all-empty prediction scores Dice 0 on these images (every one has a lesion); an
    # untrained net sits near 0.3 (the lesion's share of the image)
    assert res.dice is not None and res.dice > 0.6, res
    assert res.dice > float(rows[0]["val_dice"]) + 0.2
    assert float(rows[-1]["train_loss"]) < 0.7 * float(rows[0]["train_loss"])
    for name in ("config.json", "best.pt", "last.pt", "metrics.csv", "curves.png", "oof.json"):
        assert fold.exists(name), name
    assert fold.read_bytes("curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # columns named for what they hold: the epoch's duration, and when it ended
    assert tuple(rows[0]) == METRICS_COLUMNS
    assert all(0 < float(r["epoch_seconds"]) < 600 for r in rows)
    ended = [datetime.fromisoformat(r["wall_time"]) for r in rows]
    assert ended == sorted(ended) and abs(ended[-1].timestamp() - time.time()) < 600
    # out-of-fold probabilities: written for this fold's validation rows only
    oof = zarr.open_array(local.store("models").zarr_store(), path="oof.zarr/probs", mode="r")
    val_rows = fold.read_json("oof.json")["rows"]
    assert len(val_rows) == 12
    others = sorted(set(range(24)) - set(val_rows))
    assert all(oof[r].max() > 0 for r in val_rows) and all(oof[r].max() == 0 for r in others)
    # ... and they are what `segflow predict` computes with this fold and its default TTA
    from segflow.dataset import Dataset
    from segflow.predict.ensemble import load_ensemble

    images = (
        Dataset(Store(tiny_dataset, local.storage)).group["images"].oindex[np.asarray(val_rows)]
    )
    expected = load_ensemble(local.store("models"), [0], "cpu").predict(images, "flips")
    assert np.abs(oof.oindex[np.asarray(val_rows)] / 255 - expected).max() <= 0.5 / 255 + 1e-6
    # a completed fold is skipped on rerun
    again = fit_fold(cfg, 0)
    assert again.status == "skipped" and again.best_epoch == res.best_epoch


def test_config_json_alone_rebuilds_an_identical_model(tiny_dataset, local):
    fit_fold(small_config(tiny_dataset, local.url("models"), epochs=1), 1)
    fold = local.store("models/fold-1")
    spec = load_spec(fold)
    got = (spec.arch, spec.encoder, spec.input_size, spec.resize)
    assert got == ("Unet", "resnet18", (32, 32), "stretch")
    saved = load_checkpoint(fold, "best.pt")["model"]
    rebuilt = build_model(spec).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in saved.items()}
    x = torch.rand(2, 3, 32, 32)
    a, b = load_model(fold), load_model(fold)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    model = build_model(spec)
    model.load_state_dict(saved)  # strict: every key and shape matches
    with torch.no_grad():
        assert torch.equal(model.eval()(x), a(x))


def test_checkpoints_are_loaded_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    store = Store(str(tmp_path))
    buf = io.BytesIO()
    torch.save({"model": Evil()}, buf)
    store.write_bytes("last.pt", buf.getvalue())
    with pytest.raises(InputError, match="weights_only=True"):
        load_checkpoint(store, "last.pt")


def test_sigkill_after_epoch_one_resumes_at_epoch_two(local, tmp_path):
    dataset = make_dataset(local.base, local.storage, n=48, size=64)
    models = tmp_path / "models"
    args = [sys.executable, "-m", "segflow.cli", "train", "--dataset", dataset]
    args += ["--models", str(models), "--folds", "2", "--fold-ids", "0", "--epochs", "3"]
    args += ["--executor", "inline", "--encoder", "resnet18", "--batch-size", "8"]
    fold = models / "fold-0"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (fold / "last.pt").exists() and (fold / "metrics.csv").exists():
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(str(fold))
    assert [r["epoch"] for r in _metrics(store)] == ["1"], "kill landed outside epoch 2"
    assert load_checkpoint(store, "last.pt")["epoch"] == 1

    # the CLI run's config exactly (its defaults included): a fold resumes only its own config
    cfg = small_config(
        dataset,
        str(models),
        epochs=3,
        encoder_depth=5,
        decoder_channels=None,
        fold_ids=[0],
        lr=1e-3,
        early_stopping=10,
    )
    res = fit_fold(cfg, 0)
    assert (res.start_epoch, res.epochs_run) == (1, 2)  # epochs 2 and 3, not from zero
    assert [int(r["epoch"]) for r in _metrics(store)] == [1, 2, 3]  # one row per epoch


class Killed(BaseException):
    """Stands in for a SIGKILL: no ``except Exception`` on the way catches it."""


@pytest.mark.parametrize("ema", [None, 0.9], ids=["plain", "ema"])
def test_resume_matches_an_unbroken_run_exactly(tiny_dataset, local, monkeypatch, ema):
    """Per-epoch seeds + saved optimiser/scheduler/RNG state (and the weight average, when
    kept): stopping after epoch 1 and resuming gives the same weights as never stopping
    (seeded CPU run)."""
    from segflow.train import loop

    unbroken = small_config(tiny_dataset, local.url("a"), epochs=2, ema_decay=ema)
    fit_fold(unbroken, 0)

    real = loop.on_epoch_end

    def killed_after_epoch(*args):
        real(*args)  # every file of epoch 1 is written...
        raise Killed  # ...then the process dies

    interrupted = small_config(tiny_dataset, local.url("b"), epochs=2, ema_decay=ema)
    with monkeypatch.context() as m:
        m.setattr(loop, "on_epoch_end", killed_after_epoch)
        with pytest.raises(Killed):
            fit_fold(interrupted, 0)
    fold_b = local.store("b/fold-0")
    assert not fold_b.exists("fold.complete.json") and len(_metrics(fold_b)) == 1
    res = fit_fold(interrupted, 0)
    assert (res.start_epoch, res.epochs_run) == (1, 1)
    last_a = load_checkpoint(local.store("a/fold-0"), "last.pt")
    last_b = load_checkpoint(fold_b, "last.pt")
    for a, b in [(last_a["model"], last_b["model"])] + (
        [(last_a["ema"]["model"], last_b["ema"]["model"])] if ema else []
    ):
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert ("ema" in last_b) == bool(ema)


def test_two_folds_run_concurrently_on_local_ray(tiny_dataset, local, local_ray):
    cfg = small_config(tiny_dataset, local.url("models"), executor="ray", epochs=1)
    res = train(cfg)
    assert [f.status for f in res.folds] == ["done", "done"], [f.error for f in res.folds]
    (a, b) = res.folds
    assert max(a.started_at, b.started_at) < min(a.finished_at, b.finished_at)  # overlapped
    summary = json.loads(Path(local.url("models/train_summary.json")).read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1]


def test_failed_fold_is_reported_and_others_finish(tiny_dataset, local):
    models = local.store("models")
    cfg = small_config(tiny_dataset, models.url, epochs=1)
    train(cfg.model_copy(update={"fold_ids": [0]}))
    models.write_bytes("fold-1/last.pt", b"not a checkpoint")  # fold 1 will fail to resume
    res = train(cfg)
    status = {f.fold: f.status for f in res.folds}
    assert status == {0: "skipped", 1: "failed"}
    assert "weights_only" in res.folds[1].error and not res.ok


@pytest.mark.s3
def test_training_on_s3(s3_endpoint):
    from segflow.storage import StorageOptions
    from tests.conftest import make_bucket

    storage = StorageOptions(endpoint_url=s3_endpoint)
    base = f"s3://{make_bucket(s3_endpoint)}"
    dataset = make_dataset(base, storage, n=16)
    res = fit_fold(small_config(dataset, f"{base}/models", storage, epochs=1), 0)
    assert res.status == "done" and res.checkpoint == f"{base}/models/fold-0/best.pt"
    fold = Store(f"{base}/models/fold-0", storage)
    written = {f.rel for f in fold.list()}
    assert written >= {"config.json", "best.pt", "last.pt", "metrics.csv", "curves.png"}
    assert written >= {"oof.json", "fold.complete.json", "train_config.json"}
    assert np.isfinite(float(_metrics(fold)[0]["val_dice"]))


def test_epoch_relay_reads_metrics_and_survives_a_damaged_file(tmp_path, caplog):
    from segflow.train.run import _log_new_epochs

    cfg = TrainConfig(dataset=str(tmp_path / "ds"), models=str(tmp_path / "m"), epochs=3)
    fold = tmp_path / "m" / "fold-1"
    fold.mkdir(parents=True)
    head = "epoch,lr,train_loss,val_loss,val_dice,images_per_s\n"
    (fold / "metrics.csv").write_text(head + "1,0.001,0.9,0.8,0.5,12.0\n2,0.001,0.7,0.6,0.6,12.5\n")
    with caplog.at_level(logging.INFO, logger="segflow.train"):
        assert _log_new_epochs(cfg, 1, 1) == 2  # epoch 1 was logged before
    assert [r.getMessage() for r in caplog.records] == [
        "fold 1 epoch 2/3: train 0.7 val 0.6 dice 0.6 (12.5 img/s)"
    ]
    (fold / "metrics.csv").write_text(head + "two,0.001\n")  # mid-rewrite, or damaged
    assert _log_new_epochs(cfg, 1, 2) == 2  # nothing new, and no exception to end the wait


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "segflow.cli", "train", "--executor", "inline", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)


def test_finished_folds_of_another_config_are_refused_not_skipped(local, tmp_path):
    """Issue 11.7: resnet18 folds must not be reported as a finished resnet34 training."""
    dataset = make_dataset(local.base, local.storage, n=16, size=32)
    models = tmp_path / "models"
    common = ["--dataset", dataset, "--models", str(models), "--folds", "2", "--epochs", "1"]
    first = _cli(*common, "--encoder", "resnet18", "--batch-size", "8")
    assert first.returncode == 0, first.stderr
    saved = {p: p.read_bytes() for p in models.rglob("*.json")}

    other = _cli(*common, "--encoder", "resnet34", "--size", "64", "64", "--batch-size", "8")
    assert other.returncode == 2, other.stdout
    assert "skipped" not in other.stdout
    message = other.stderr
    assert "fold-0, fold-1" in message
    assert "encoder: 'resnet18' -> 'resnet34'" in message
    assert "size: None -> [64, 64]" in message
    assert "--models NEW_URL" in message and "--overwrite" in message
    assert "Traceback" not in message
    # nothing rewritten: train_config.json still describes the folds beside it
    assert {p: p.read_bytes() for p in models.rglob("*.json")} == saved

    again = _cli(*common, "--encoder", "resnet18", "--batch-size", "8", "--json")
    assert again.returncode == 0, again.stderr  # the same config still skips its folds
    assert [f["status"] for f in json.loads(again.stdout.splitlines()[-1])["folds"]] == [
        "skipped",
        "skipped",
    ]


def test_overwrite_replaces_a_training_of_another_config(tiny_dataset, local):
    models = local.store("models")
    train(small_config(tiny_dataset, models.url, epochs=1))
    deeper = {"encoder_depth": 4, "decoder_channels": [32, 16, 8, 8]}
    changed = small_config(tiny_dataset, models.url, epochs=1, **deeper)
    with pytest.raises(ConfigError, match="encoder_depth: 3 -> 4"):
        train(changed)
    assert models.read_json("train_config.json")["encoder_depth"] == 3

    res = train(changed.model_copy(update={"overwrite": True}))
    assert [f.status for f in res.folds] == ["done", "done"]
    assert models.read_json("train_config.json")["encoder_depth"] == 4
    for k in (0, 1):
        assert load_spec(models.child(f"fold-{k}")).encoder_depth == 4
        assert models.read_json(f"fold-{k}/train_config.json")["encoder_depth"] == 4


def test_a_fold_resumes_or_skips_only_its_own_config(tiny_dataset, local):
    """fit_fold checks too (a Ray retry, a direct call), partial folds and folds saved
    before the per-fold record existed included (their config.json is compared)."""
    models = local.store("models")
    cfg = small_config(tiny_dataset, models.url, epochs=1)
    fit_fold(cfg, 0)
    fold = models.child("fold-0")
    fold.clear_marker("fold")  # a partial fold: last.pt, no marker
    with pytest.raises(ConfigError, match=r"lr: 0.003 -> 0.01"):
        fit_fold(cfg.model_copy(update={"lr": 1e-2}), 0)
    fold.delete("train_config.json")  # as saved by an older segflow
    with pytest.raises(ConfigError, match=r"encoder_depth: 3 -> 4"):
        fit_fold(cfg.model_copy(update={"encoder_depth": 4}), 0)
    assert load_spec(fold).encoder_depth == 3  # refused before anything was written
    res = fit_fold(cfg.model_copy(update={"fold_ids": [0], "cache_mb": 0}), 0)  # runtime only
    assert (res.status, res.start_epoch, res.epochs_run) == ("done", 1, 0)
    moved = local.url("moved")  # the location copied elsewhere still holds the same fold
    shutil.copytree(local.url("models"), moved)
    assert fit_fold(cfg.model_copy(update={"models": moved}), 0).status == "skipped"


def test_a_legacy_fold_records_only_what_was_compared(tiny_dataset, local):
    """A finished fold older than fold-k/train_config.json has only its config.json: its network
    can be compared, its epochs, lr or seed cannot, so they must not be recorded as checked."""
    from segflow.dataset import Dataset
    from segflow.train.loop import DONE
    from segflow.train.model import save_spec
    from segflow.train.state import model_spec

    models = local.store("models")
    cfg = small_config(tiny_dataset, models.url, epochs=1)
    fold = models.child("fold-0")
    spec = model_spec(cfg, Dataset(Store(tiny_dataset, cfg.storage)))
    save_spec(fold, spec)  # as an older segflow left a finished fold
    fold.mark_complete(DONE, {"fold": 0, "status": "done", "best_epoch": 1})

    other = cfg.model_copy(update={"epochs": 5, "lr": 1e-2, "seed": 7})
    assert fit_fold(other, 0).status == "skipped"  # the same network: all that can be told
    compared = {k: v for k, v in spec.model_dump(mode="json").items() if k != "segflow_version"}
    assert fold.read_json("train_config.json") == {**compared, "legacy": True}
    assert fit_fold(cfg, 0).status == "skipped"  # `other` was not recorded as the fold's config
    assert fold.read_json("train_config.json") == {**compared, "legacy": True}
    with pytest.raises(ConfigError, match=r"encoder_depth: 3 -> 4"):  # the network still is
        fit_fold(cfg.model_copy(update={"encoder_depth": 4}), 0)


def test_training_report_shows_one_titled_pair_of_charts_per_fold():
    from segflow.pipeline.report import training_markdown
    from segflow.train.plots import plot_curves

    head = ",".join(METRICS_COLUMNS) + "\n"
    row = "1,0.001,0.9,0.8,0.5,0.4,0.3,12.0,3.5,2026-01-01T00:00:00+00:00\n"
    curves = {k: plot_curves((head + row).encode(), k) for k in (1, 0)}
    assert curves[0] != curves[1]  # the same figures, titled with their fold
    version = {
        "url": "file:///m/versions/v1.json",
        "record": {
            "version": "v1",
            "dataset": {"url": "/d", "n_images": 4, "hash": "ab" * 32},
            "config": {"arch": "Unet", "encoder": "resnet18", "epochs": 1},
            "folds": [0, 1],
            "scores": {"oof": {"dice": 0.5, "thresholded_jaccard": 0.3, "n": 4}},
            "choice": {"threshold": 0.5, "postprocess": "none", "oof_thresholded_jaccard": 0.3},
        },
    }
    lines = training_markdown(version, curves, None).splitlines()
    headings = [i for i, line in enumerate(lines) if line.startswith("### ")]
    assert [lines[i] for i in headings] == ["### Fold 0", "### Fold 1"]
    for i in headings:  # each heading owns its image, set apart by blank lines
        assert lines[i + 1] == "" and lines[i + 2].startswith("![fold ")
        assert lines[i - 1] == ""
