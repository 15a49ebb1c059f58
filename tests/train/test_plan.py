"""--time-budget: the planner, the deadline, the refusal, and scores at full resolution."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import numpy as np
import pytest

from segflow.evaluate import evaluate
from segflow.storage import Store
from segflow.train import train
from segflow.train.budget import BudgetError, parse_budget
from segflow.train.plan import (
    Fingerprint,
    FixedStepTimer,
    Workload,
    candidates,
    choose_plan,
    deadline_lr,
    measure,
)
from tests.makers import png_bytes
from tests.train.conftest import dataset_with_large_masks, small_config

FP = Fingerprint(
    n_images=2000,
    n_labelled=2000,
    frame_size=(256, 256),
    median_orig_size=(2000, 3000),
    median_aspect=1.5,
    foreground_fraction=0.2,
    compactness=0.7,
)
# ~the measured CPU cost of Lite0: 0.05 s per image at 128x128 (= 3 s per megapixel)
TIMER = FixedStepTimer(train_s_per_mpixel=3.0)


def _plan(budget_s: float, folds: int = 1, devices: int = 1):
    work = Workload(
        budget_s=budget_s,
        folds=folds,
        devices=devices,
        n_train=1600,
        n_val=400,
        finish_s_per_image=0.05,
        min_epochs=8,
    )
    cands = candidates(FP.frame_size, ["timm-tf_efficientnet_lite0"], 16)
    timings = measure(cands, TIMER, lambda t: True)
    return choose_plan(FP, timings, work)


def test_planner_picks_a_smaller_plan_when_the_budget_shrinks():
    big, mid, small = _plan(3 * 3600), _plan(25 * 60), _plan(8 * 60)
    assert big.size == (256, 256) and big.epochs >= 8
    assert small.size < mid.size < big.size
    assert all(p.epochs >= 8 and p.reached_min_epochs for p in (big, mid, small))
    # the same inputs give the same plan: the stage cache stays meaningful
    assert _plan(25 * 60) == mid
    # 5 folds on one device take 5 rounds, on 5 devices one: the larger plan fits again
    assert _plan(25 * 60, folds=5).size < mid.size
    assert _plan(25 * 60, folds=5, devices=5).size == mid.size


def test_time_for_the_choice_is_kept_out_of_training():
    """The post-processing choice after the last round has its (measured) time kept: fewer
    epochs fit, and a refusal's minimum budget counts it."""
    free = _plan(25 * 60)
    work = Workload(
        budget_s=25 * 60,
        folds=1,
        devices=1,
        n_train=1600,
        n_val=400,
        finish_s_per_image=0.05,
        min_epochs=8,
        choose_s=400.0,
    )
    cands = candidates(FP.frame_size, ["timm-tf_efficientnet_lite0"], 16)
    kept = choose_plan(FP, measure(cands, TIMER, lambda t: True), work)
    assert kept.fold_s == pytest.approx(free.fold_s - 400.0)
    assert (kept.size[0] * kept.size[1], kept.epochs) < (free.size[0] * free.size[1], free.epochs)
    tiny = replace(work, budget_s=420.0)
    with pytest.raises(BudgetError) as e:
        choose_plan(FP, measure(cands, TIMER, lambda t: True), tiny)
    assert e.value.minimum_s > 400 and "to choose the post-processing" in str(e.value)


def test_a_plan_long_enough_averages_its_weights():
    from segflow.train.plan import EMA_MIN_STEPS, PLAN_EMA_DECAY, planned_ema

    plan = _plan(25 * 60)  # 1,600 training images, batch 16: 100 steps per epoch
    assert plan.epochs * 100 >= EMA_MIN_STEPS and planned_ema(plan, 1600) == PLAN_EMA_DECAY
    assert planned_ema(replace(plan, epochs=4), 1600) is None  # 400 steps: still lagging


def test_an_average_asked_for_or_refused_is_kept_by_the_plan_and_its_reruns():
    from segflow.train.config import TrainConfig
    from segflow.train.plan import recorded

    base = {"dataset": "d", "models": "m", "time_budget": "25m"}
    record = {**base, "encoder": "resnet18", "encoder_weights": None, "size": [64, 64]}
    record.update(batch_size=16, epochs=9, plan={"epochs": 9})
    old = recorded(TrainConfig(**base), record)  # a record from before ema_decay was planned
    assert old.ema_decay is None and old.epochs == 9
    planned = recorded(TrainConfig(**base), {**record, "ema_decay": 0.99})
    assert planned.ema_decay == 0.99
    off = recorded(TrainConfig(**base, ema_decay=0), {**record, "ema_decay": 0.99})
    assert off.ema_decay is None and "ema_decay" in off.model_fields_set
    mine = recorded(TrainConfig(**base, ema_decay=0.9), {**record, "ema_decay": 0.99})
    assert mine.ema_decay == 0.9


def test_budget_too_small_for_one_epoch_is_refused_with_the_minimum():
    with pytest.raises(BudgetError) as e:
        _plan(20)
    assert e.value.minimum_s > 20
    assert f"{int(np.ceil(e.value.minimum_s / 60))}m" in str(e.value)
    # the minimum is enough: one epoch of the smallest plan fits in it
    assert _plan(e.value.minimum_s + 1).epochs >= 1


def test_budget_parsing_and_schedule():
    assert parse_budget("25m") == 1500 and parse_budget("1.5h") == 5400
    assert parse_budget("90s") == parse_budget("90") == 90
    lrs = [deadline_lr(1e-3, 1e-6, e, 10, 1) for e in range(10)]
    assert lrs[0] < lrs[1] == pytest.approx(1e-3)  # warm-up, then the peak
    assert all(a > b for a, b in itertools.pairwise(lrs[1:]))  # cosine down


def test_too_small_budget_refused_before_training(local, tiny_dataset):
    models = f"{local.base}/m"
    cfg = small_config(tiny_dataset, models, local.storage, time_budget="1s", fold_ids=[0])
    with pytest.raises(BudgetError, match="minimum budget"):
        train(cfg)
    assert not Store(models, local.storage).exists("fold-0")  # nothing trained


def test_run_stops_before_the_deadline_with_every_artifact(local, tiny_dataset, monkeypatch):
    import segflow.train.plan as plan_module

    # a plan of ~1 s epochs whatever the machine's load; the deadline must hold anyway
    monkeypatch.setattr(
        plan_module, "TorchStepTimer", lambda cfg: FixedStepTimer(train_s_per_mpixel=50.0)
    )
    models = f"{local.base}/m"
    budget = 30.0
    cfg = small_config(
        tiny_dataset, models, local.storage, time_budget=f"{budget:.0f}s", fold_ids=[0]
    )
    t0 = time.time()
    result = train(cfg)
    took = time.time() - t0
    assert took < budget, f"training took {took:.1f}s of a {budget}s budget"
    fold = result.folds[0]
    assert fold.status == "done", fold.error
    m = Store(models, local.storage)
    record = m.read_json("train_config.json")
    plan = record["plan"]
    assert record["epochs"] == plan["epochs"] >= 1
    assert record["ema_decay"] is None and plan["ema_decay"] is None  # a few steps: no average
    assert plan["fingerprint"]["n_labelled"] == 24 and plan["step_times"]
    # either the deadline stopped it, or the planned epochs ended before it
    assert fold.stopped_by == "deadline" or fold.epochs_run == plan["epochs"]
    for name in ("best.pt", "last.pt", "oof.json", "metrics.csv", "scores.json"):
        assert m.exists(f"fold-0/{name}"), name
    assert m.child("fold-0").read_marker("fold") is not None
    # a rerun keeps the recorded plan and skips the finished fold
    again = train(cfg)
    assert again.folds[0].status == "skipped"


def test_full_resolution_scores_equal_evaluate(local):
    from segflow.dataset import Dataset
    from segflow.train.fullres import fold_scores, prediction, source_truth

    url, raw = dataset_with_large_masks(local)
    dataset = Dataset(Store(url, local.storage))
    rng = np.random.default_rng(0)
    # blurry probabilities: the inverse resize and the threshold both matter
    probs = (rng.random((dataset.n, 32, 32)) * 255).astype(np.uint8)
    for i in range(dataset.n):
        probs[i] = np.clip(probs[i] // 2 + dataset.mask(i) * 128, 0, 255)
    rows = list(range(dataset.n))
    scores = fold_scores(dataset, rows, probs, 0.5, local.storage)
    assert scores is not None and scores["resolution"] == "original"
    assert scores["n"] == dataset.n
    # the masks a predictor writes, scored by segflow evaluate against the source masks
    preds = Store(f"{local.base}/pred", local.storage)
    for i, id_ in enumerate(dataset.ids):
        truth = source_truth(dataset, i, local.storage)
        assert truth.shape == (72, 96)
        mask = prediction(dataset, i, probs[i], truth.shape, 0.5)
        preds.write_bytes(f"{id_}_segmentation.png", png_bytes(mask.astype(np.uint8) * 255))
    ev = evaluate(preds.url, raw.url, layout="isic", storage=local.storage)
    assert ev.n == dataset.n and not ev.missing_predictions
    assert scores["dice"] == pytest.approx(ev.mean_dice, abs=1e-12)
    assert scores["jaccard"] == pytest.approx(ev.mean_jaccard, abs=1e-12)
    assert scores["thresholded_jaccard"] == pytest.approx(ev.mean_thresholded_jaccard, abs=1e-12)


def test_fold_reports_original_and_training_resolution(local):
    url, _ = dataset_with_large_masks(local)
    models = f"{local.base}/m"
    result = train(small_config(url, models, local.storage, epochs=1, fold_ids=[0]))
    fold = result.folds[0]
    assert fold.status == "done", fold.error
    assert fold.resolution == "original"
    assert set(fold.training_scores) == {"dice", "jaccard", "thresholded_jaccard"}
    scores = Store(models, local.storage).read_json("fold-0/scores.json")
    assert scores["original"]["dice"] == fold.dice
    assert scores["training"] == fold.training_scores


def test_training_report_shows_the_plan():
    from segflow.pipeline.report import plan_lines

    plan = {**_plan(25 * 60).to_dict(), "fingerprint": FP.to_dict()}
    text = "\n".join(plan_lines(plan))
    assert "plan for 25 min: timm-tf_efficientnet_lite0 at" in text
    assert "2000 labelled images, median original 2000x3000" in text
    assert "step times" in text and plan_lines(None) == []


def test_rerun_ignores_a_recorded_deadline_long_past(local, tiny_dataset, monkeypatch):
    """A flow whose prepare step is cached reruns a fold a day later: the fold must train
    its planned epochs, not stop at the deadline its first run recorded."""
    import segflow.train.plan as plan_module
    from segflow.train.run import prepare_run, run_fold

    monkeypatch.setattr(
        plan_module, "TorchStepTimer", lambda cfg: FixedStepTimer(train_s_per_mpixel=50.0)
    )
    models = f"{local.base}/m"
    cfg = small_config(tiny_dataset, models, local.storage, time_budget="1h", fold_ids=[0])
    prepare_run(cfg)
    m = Store(models, local.storage)
    record = m.read_json("train_config.json")
    # yesterday's run, as an older segflow recorded it; 2 epochs keep the test short
    record.update(deadline=time.time() - 86400, epochs=2)
    record["plan"].update(epochs=2, warmup_epochs=0)
    m.write_json("train_config.json", record)
    fold = run_fold(cfg, 0)
    assert fold.status == "done" and fold.stopped_by is None
    assert fold.epochs_run == 2


def _delete_source_mask(dataset, row: int, storage) -> None:
    import posixpath

    folder, name = posixpath.split(str(dataset.group["mask_sources"][row]))
    Store(folder, storage).delete(name)


def test_missing_source_masks_leave_the_fold_done(local):
    """A source mask deleted after ingest: its row is unreadable, the fold still finishes; with
    every source gone the fold reports its training-resolution scores, labelled so."""
    from segflow.dataset import Dataset
    from segflow.train.fullres import seconds_per_image

    url, _ = dataset_with_large_masks(local)
    dataset = Dataset(Store(url, local.storage))
    _delete_source_mask(dataset, 0, local.storage)
    assert seconds_per_image(dataset, local.storage) >= 0  # the planner measures the rest
    models = f"{local.base}/m1"
    result = train(small_config(url, models, local.storage, epochs=1, fold_ids=[0, 1]))
    assert [f.status for f in result.folds] == ["done", "done"], [f.error for f in result.folds]
    assert all(f.resolution == "original" for f in result.folds)
    m = Store(models, local.storage)
    unreadable = [m.read_json(f"fold-{k}/scores.json")["original"]["n_unreadable"] for k in (0, 1)]
    assert sorted(unreadable) == [0, 1]  # row 0 validates in one fold

    for row in range(1, dataset.n):
        _delete_source_mask(dataset, row, local.storage)
    assert seconds_per_image(dataset, local.storage) >= 0
    models = f"{local.base}/m2"
    fold = train(small_config(url, models, local.storage, epochs=1, fold_ids=[0])).folds[0]
    assert fold.status == "done", fold.error
    assert fold.resolution == "training" and fold.dice == fold.training_scores["dice"]
