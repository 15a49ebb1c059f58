"""One fold's training. ``fit_fold`` is the outline (claim the fold, set up, resume, then per
epoch: train_epoch, validate, on_epoch_end); the steps are plain functions below it.

``Run`` holds what a fold trains with and never changes; ``Progress`` is what changes from
epoch to epoch. Everything a resumed run needs is in ``last.pt`` (weights, optimiser,
scheduler, RNG and ``Progress``); everything a predictor needs is ``config.json`` + ``best.pt``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segflow.cluster import cpu_count
from segflow.dataset import Dataset
from segflow.metrics import per_image_scores
from segflow.predict.tta import tta_views
from segflow.predict.uncertainty import OOF_TTA, view_disagreement
from segflow.storage import Store
from segflow.train.augment import AugmentConfig, augment_batch
from segflow.train.config import TrainConfig
from segflow.train.data import FoldData
from segflow.train.ema import Ema
from segflow.train.fullres import RESOLUTION_FRAME, RESOLUTION_ORIGINAL, fold_scores
from segflow.train.losses import make_loss
from segflow.train.model import (
    ModelSpec,
    build_model,
    load_checkpoint,
    resize_input,
    save_spec,
    save_weights,
)
from segflow.train.model import amp_dtype as _amp_dtype
from segflow.train.model import normalise as normalise_input
from segflow.train.plan import SAFETY, deadline_lr, epochs_left
from segflow.train.splits import fold_indices, load_or_create_splits
from segflow.train.state import claim_fold, model_spec, with_plan

log = logging.getLogger("segflow.train")
METRICS_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    "val_dice",
    "val_jaccard",
    "val_thresholded_jaccard",
    "images_per_s",
    "epoch_seconds",  # duration of the epoch's training and validation
    "wall_time",  # when the epoch ended, ISO 8601 UTC
)
DONE = "fold"  # marker name: fold-k/fold.complete.json


@dataclass
class FoldResult:
    fold: int
    status: str  # done | skipped | failed
    best_epoch: int | None = None
    dice: float | None = None
    jaccard: float | None = None
    thresholded_jaccard: float | None = None
    checkpoint: str | None = None
    start_epoch: int = 0
    epochs_run: int = 0
    error: str | None = None
    # dice, jaccard, thresholded_jaccard above: at the original mask resolution ("original")
    # when the dataset names its source masks, else at the training resolution ("training")
    resolution: str = "training"
    training_scores: dict[str, float] | None = None  # at the training resolution, always
    stopped_by: str | None = None  # "deadline" when the time budget ended training early
    started_at: float = 0.0
    finished_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Run:
    """What one fold trains with, fixed once set up; the loop passes it to every step."""

    cfg: TrainConfig
    fold: int
    out: Store  # the fold's folder
    spec: ModelSpec
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    augment: AugmentConfig
    ema: Ema | None = None  # the averaged weights (train.ema_decay), updated every step

    @property
    def scored(self) -> torch.nn.Module:
        """The network that validation scores and best.pt keeps: the average, when kept."""
        return self.ema.module if self.ema is not None else self.model


@dataclass(frozen=True)
class Progress:
    """What changes from epoch to epoch; saved in ``last.pt`` with the weights."""

    epoch: int = 0  # epochs completed
    best_score: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochStats:
    """One epoch's figures: one row of metrics.csv."""

    epoch: int  # 1-based
    lr: float
    train_loss: float
    val: dict[str, float]  # loss, dice, jaccard, thresholded_jaccard
    images_per_s: float
    seconds: float


def fit_fold(cfg: TrainConfig, fold: int) -> FoldResult:
    """Train one fold to the end, resuming from ``last.pt``; a finished fold of the same
    config is skipped, a fold of another config refused (see :mod:`segflow.train.state`)."""
    started = time.time()
    out = Store(cfg.models, cfg.storage).child(f"fold-{fold}")
    dataset = Dataset(Store(cfg.dataset, cfg.storage))
    cfg = with_plan(cfg)  # a --time-budget run trains the plan its driver recorded
    # before any write: a fold of another config must be neither skipped nor resumed
    claim_fold(cfg, out, model_spec(cfg, dataset))
    if (done := out.read_marker(DONE)) is not None:
        return FoldResult(**{**done, "status": "skipped", "extra": {}})
    train_data, val_data = fold_data(cfg, dataset, fold)
    ensure_oof_array(Store(cfg.models, cfg.storage), dataset)
    run = setup_run(cfg, fold, dataset)
    save_spec(out, run.spec)  # before any weights: a predictor rebuilds the network from it
    progress = start = _resume(run)
    log.info("fold %d: epochs %d..%d on %s", fold, start.epoch + 1, cfg.epochs, run.device)

    clock = Deadline.of(cfg, started)
    stopped_by = None
    for epoch in range(start.epoch, cfg.epochs):
        if clock is not None:
            total = clock.total_epochs(epoch, cfg.epochs)
            if total <= epoch and progress.best_epoch is not None:
                stopped_by = "deadline"  # the next whole epoch would not fit
                log.info("fold %d: stopping after epoch %d: the deadline is near", fold, epoch)
                break
            set_lr(run, clock.lr(cfg, epoch, max(total, epoch + 1)))
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]  # the rate this epoch trains with
        train_loss, ips = train_epoch(run, train_data, epoch)
        val = validate(run, val_data)
        stats = EpochStats(epoch + 1, lr, train_loss, val, ips, time.perf_counter() - t0)
        progress = on_epoch_end(run, progress, stats)
        if clock is not None:  # with the checkpoints and curves: the whole epoch's wall time
            clock.epoch_took(time.perf_counter() - t0)
        if cfg.early_stopping is not None and progress.bad_epochs >= cfg.early_stopping:
            break  # no improvement for `early_stopping` epochs

    # the best epoch's validation probabilities (not the last's): what the ensemble will be
    write_oof(run, val_data, dataset)
    frame = {k: progress.best_metrics.get(k) for k in ("dice", "jaccard", "thresholded_jaccard")}
    scores, resolution = frame, RESOLUTION_FRAME
    if (full := original_scores(run, val_data, dataset)) is not None:
        scores, resolution = {k: full[k] for k in frame}, RESOLUTION_ORIGINAL
    record = {"best_epoch": progress.best_epoch, RESOLUTION_FRAME: frame, RESOLUTION_ORIGINAL: full}
    out.write_json("scores.json", record)
    result = FoldResult(
        fold=fold,
        status="done",
        best_epoch=progress.best_epoch,
        checkpoint=out.uri("best.pt"),
        start_epoch=start.epoch,
        epochs_run=progress.epoch - start.epoch,
        resolution=resolution,
        training_scores=frame,
        stopped_by=stopped_by,
        started_at=started,
        finished_at=time.time(),
        **scores,
    )
    out.mark_complete(DONE, {k: v for k, v in asdict(result).items() if k != "extra"})
    return result


# -- set-up ---------------------------------------------------------------------------------------
def fold_data(cfg: TrainConfig, dataset: Dataset, fold: int) -> tuple[FoldData, FoldData]:
    ids = dataset.ids
    groups = [str(g) for g in dataset.column("groups")]
    splits = load_or_create_splits(Store(cfg.models, cfg.storage), ids, groups, cfg.folds, cfg.seed)
    train_rows, val_rows = fold_indices(splits, fold, ids)
    labelled = dataset.column("has_mask")
    # rows without a mask (an unlabeled part of the archive) can't teach anything
    train_rows = [i for i in train_rows if labelled[i]]
    val_rows = [i for i in val_rows if labelled[i]]
    store = Store(cfg.dataset, cfg.storage)
    return (
        FoldData(store, train_rows, cfg.cache_mb, cfg.prefetch),
        FoldData(store, val_rows, cfg.cache_mb, cfg.prefetch),
    )


def setup_run(cfg: TrainConfig, fold: int, dataset: Dataset) -> Run:
    """Fold ``fold``'s freshly initialised model, optimiser, scheduler and loss on the best
    device, ready for :func:`train_step`. Writes nothing: :func:`fit_fold` saves and resumes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(_seed(cfg.seed, fold))  # same seed and fold: same initial weights
    spec = model_spec(cfg, dataset)
    model = build_model(spec)
    if cfg.encoder_weights:
        from segflow.train.weights import load_encoder_weights

        load_encoder_weights(model, cfg.encoder, cfg.encoder_weights, cfg.storage)
    if cfg.init_from != "none":  # a warm start: the whole network from a trained version
        from segflow.train.warmstart import load_init

        load_init(model, cfg, fold, spec)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = _amp_dtype(cfg.amp, device)
    optimizer = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(
        model.parameters(), lr=initial_lr(cfg), weight_decay=cfg.weight_decay
    )
    return Run(
        cfg=cfg,
        fold=fold,
        out=Store(cfg.models, cfg.storage).child(f"fold-{fold}"),
        spec=spec,
        model=model,
        optimizer=optimizer,
        scheduler=_scheduler(cfg, optimizer),
        # loss scaling only for fp16: bf16 has fp32's exponent range and never underflows
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        loss_fn=make_loss(cfg.loss).to(device),
        device=device,
        amp_dtype=amp_dtype,
        augment=AugmentConfig(**cfg.augment),
        ema=Ema(model, cfg.ema_decay) if cfg.ema_decay else None,
    )


def initial_lr(cfg: TrainConfig) -> float:
    """The optimiser's starting rate: a warm start fine-tunes at ``init_lr_scale`` x ``lr``,
    because the cold rate's first steps throw away much of what the trained network knew."""
    return cfg.lr * (cfg.init_lr_scale if cfg.init_from != "none" else 1.0)


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.plan is not None:  # the rate is set per epoch, to the deadline (Deadline.lr)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs, cfg.min_lr)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min" if cfg.monitor == "loss" else "max",
        factor=cfg.plateau_factor,
        patience=cfg.plateau_patience,
        min_lr=cfg.min_lr,
    )


def _constant(epoch: int) -> float:
    return 1.0


@dataclass
class Deadline:
    """When a fold of a ``--time-budget`` run must stop training, and its schedule: cosine
    to the last whole epoch that fits before the deadline, after a short linear warm-up."""

    end: float  # unix time: training and finishing done
    finish_s: float  # kept for the OOF pass and the full-resolution scores
    epoch_s: float  # the planner's estimate, replaced by measured epochs as they come
    warmup: int
    measured: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: TrainConfig, started: float) -> Deadline | None:
        if not cfg.plan:
            return None
        end = started + float(cfg.plan["fold_s"])
        if cfg.deadline is not None:  # the run's end, less what the choice after it takes
            end = min(end, float(cfg.deadline) - float(cfg.plan.get("choose_s", 0.0)))
        plan = cfg.plan
        return cls(end, float(plan["finish_s"]), float(plan["epoch_s"]), plan["warmup_epochs"])

    def epoch_took(self, seconds: float) -> None:
        self.measured.append(seconds)

    def total_epochs(self, epoch: int, planned: int) -> int:
        """Epochs this fold will have run when it stops: ``epoch`` done plus what fits."""
        # the slower of the last epoch and the mean: a machine that got busier shows first
        per = max(self.measured[-1], float(np.mean(self.measured))) if self.measured else 0.0
        per = per * SAFETY if per else self.epoch_s
        return min(planned, epoch + epochs_left(time.time(), self.end, per, self.finish_s))

    def lr(self, cfg: TrainConfig, epoch: int, total: int) -> float:
        return deadline_lr(initial_lr(cfg), cfg.min_lr, epoch, total, self.warmup)


def set_lr(run: Run, lr: float) -> None:
    for group in run.optimizer.param_groups:
        group["lr"] = lr


def original_scores(run: Run, data: FoldData, dataset: Dataset) -> dict[str, Any] | None:
    """The fold's scores at the original mask resolution (segflow.train.fullres), from the
    OOF probabilities that :func:`write_oof` just wrote."""
    import zarr

    probs = zarr.open_array(
        Store(run.cfg.models, run.cfg.storage).zarr_store(), path="oof.zarr/probs", mode="r"
    )
    t0 = time.perf_counter()
    scores = fold_scores(dataset, data.rows.tolist(), probs, run.spec.threshold, run.cfg.storage)
    if scores is not None:
        scores["seconds"] = round(time.perf_counter() - t0, 2)
        log.info(
            "fold %d at the original resolution: dice %.4f, thresholded Jaccard %.4f (%d images)",
            run.fold,
            scores["dice"],
            scores["thresholded_jaccard"],
            scores["n"],
        )
    return scores


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _resume(run: Run) -> Progress:
    """Continue from ``last.pt``: the next epoch is the first one not completed."""
    if not run.out.exists("last.pt"):
        return Progress()
    state = load_checkpoint(run.out, "last.pt", run.device)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if run.ema is not None:
        if "ema" not in state:  # cannot happen for one config: ema_decay is in the fold's record
            raise ValueError(f"fold {run.fold}: last.pt has no weight average to resume")
        run.ema.load_state_dict(state["ema"])
    progress = Progress(**{f.name: state[f.name] for f in fields(Progress)})
    log.info("fold %d: resuming after epoch %d", run.fold, progress.epoch)
    return progress


# -- the three steps ------------------------------------------------------------------------------
def train_epoch(run: Run, data: FoldData, epoch: int) -> tuple[float, float]:
    run.model.train()
    # per-epoch seeds: a resumed epoch sees the same order and augmentations as an unbroken run
    gen = torch.Generator().manual_seed(_seed(run.cfg.seed, run.fold, epoch, 1))
    losses, seen, t0 = [], 0, time.perf_counter()
    for images, masks, _ in data.batches(run.cfg.batch_size, _seed(run.cfg.seed, run.fold, epoch)):
        losses.append(train_step(run, images, masks, gen))
        seen += len(images)
    return float(np.mean(losses)) if losses else math.nan, seen / (time.perf_counter() - t0)


def train_step(run: Run, images: np.ndarray, masks: np.ndarray, gen: torch.Generator) -> float:
    x, y = to_device(run, images, masks)
    x, y = augment_batch(x, y, run.augment, gen)
    x = normalise(run, x)
    with torch.autocast(run.device.type, run.amp_dtype or torch.float32, run.amp_dtype is not None):
        loss = run.loss_fn(run.model(x), y)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.model)
    return float(loss.detach())


@torch.no_grad()
def validate(run: Run, data: FoldData) -> dict[str, float]:
    run.scored.eval()
    losses, scores = [], {"dice": [], "jaccard": [], "thresholded_jaccard": []}
    for images, masks, _ in data.batches(run.cfg.batch_size):
        loss, s = validation_step(run, images, masks)
        losses.append(loss * len(images))
        for k in scores:
            scores[k].append(s[k])
    out = {k: float(torch.cat(v).mean()) if v else math.nan for k, v in scores.items()}
    out["loss"] = float(np.sum(losses) / max(len(data), 1))
    return out


def validation_step(run: Run, images: np.ndarray, masks: np.ndarray):
    x, y = to_device(run, images, masks)
    with torch.autocast(run.device.type, run.amp_dtype or torch.float32, run.amp_dtype is not None):
        logits = run.scored(normalise(run, x)).float()
    pred = torch.sigmoid(logits) >= run.spec.threshold  # the same rule as predict
    return float(run.loss_fn(logits, y)), per_image_scores(pred[:, 0], y[:, 0] > 0.5)


def on_epoch_end(run: Run, progress: Progress, stats: EpochStats) -> Progress:
    """Bookkeeping after each epoch: best.pt, scheduler, metrics.csv, last.pt, curves."""
    val = stats.val
    score = -val["loss"] if run.cfg.monitor == "loss" else val[run.cfg.monitor]
    if progress.best_score is None or score > progress.best_score:
        best = {k: val[k] for k in ("dice", "jaccard", "thresholded_jaccard")}
        progress = replace(
            progress, best_score=score, best_epoch=stats.epoch, bad_epochs=0, best_metrics=best
        )
        weights = {"model": run.scored.state_dict(), "epoch": stats.epoch}
        save_weights(run.out, "best.pt", weights)
    else:
        progress = replace(progress, bad_epochs=progress.bad_epochs + 1)
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(val["loss"] if run.cfg.monitor == "loss" else score)
    else:
        run.scheduler.step()
    progress = replace(progress, epoch=stats.epoch)
    _append_metrics(run.out, stats)
    # after the metrics row: a kill in between reruns the epoch and replaces its row, while
    # a last.pt ahead of metrics.csv would leave an epoch without one
    save_weights(run.out, "last.pt", _full_state(run, progress))
    _plot(run)
    log.info(
        "fold %d epoch %d: train %.4f val %.4f dice %.4f (%.1f img/s, %.1fs)",
        run.fold,
        stats.epoch,
        stats.train_loss,
        val["loss"],
        val["dice"],
        stats.images_per_s,
        stats.seconds,
    )
    return progress


# -- helpers -----------------------------------------------------------------------------
def to_device(run: Run, images: np.ndarray, masks: np.ndarray):
    x = torch.from_numpy(images).to(run.device, non_blocking=True)
    y = torch.from_numpy(masks).to(run.device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255)
    y = y[:, None].float()
    x = resize_input(x, run.spec)
    if y.shape[-2:] != x.shape[-2:]:
        y = F.interpolate(y, size=tuple(x.shape[-2:]), mode="nearest")
    if run.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def normalise(run: Run, x: torch.Tensor) -> torch.Tensor:
    return normalise_input(x, run.spec)


def _full_state(run: Run, progress: Progress) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
        **asdict(progress),
    }


def _append_metrics(out: Store, stats: EpochStats) -> None:
    """Rewrite metrics.csv with the rows of earlier epochs plus this one: a resumed run that
    repeats an epoch never leaves two rows for it."""
    rows = []
    if out.exists("metrics.csv"):
        text = out.read_bytes("metrics.csv").decode()
        rows = [r for r in csv.DictReader(io.StringIO(text)) if int(r["epoch"]) < stats.epoch]
    val = stats.val
    rows.append(
        {
            "epoch": stats.epoch,
            "lr": f"{stats.lr:.3g}",
            "train_loss": f"{stats.train_loss:.5f}",
            "val_loss": f"{val['loss']:.5f}",
            "val_dice": f"{val['dice']:.5f}",
            "val_jaccard": f"{val['jaccard']:.5f}",
            "val_thresholded_jaccard": f"{val['thresholded_jaccard']:.5f}",
            "images_per_s": f"{stats.images_per_s:.2f}",
            "epoch_seconds": f"{stats.seconds:.2f}",
            "wall_time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    buf = io.StringIO()
    # rows of a run before a column rename (a resumed fold) keep the columns both share
    writer = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    out.write_bytes("metrics.csv", buf.getvalue().encode())


def _plot(run: Run) -> None:
    from segflow.train.plots import plot_curves

    try:
        curves = plot_curves(run.out.read_bytes("metrics.csv"), run.fold)
        run.out.write_bytes("curves.png", curves)
    except Exception as e:  # a plot must never cost a training run
        log.warning("fold %d: could not plot training curves: %s", run.fold, e)


@torch.no_grad()
def write_oof(run: Run, data: FoldData, dataset: Dataset) -> None:
    """The best model's validation probabilities (the mean of its :data:`OOF_TTA` views, as
    a predictor computes them), at the dataset frame size, into ``models/oof.zarr``; each fold
    writes only its own rows (one writer per chunk)."""
    import zarr

    state = load_checkpoint(run.out, "best.pt", run.device)
    run.model.load_state_dict(state["model"])
    run.model.eval()
    probs = zarr.open_array(
        Store(run.cfg.models, run.cfg.storage).zarr_store(), path="oof.zarr/probs", mode="r+"
    )
    scores: list[float] = []  # per-image TTA-view disagreement, in the order of data.rows
    for images, masks, rows in data.batches(run.cfg.batch_size):
        x, _ = to_device(run, images, masks)
        with torch.autocast(
            run.device.type, run.amp_dtype or torch.float32, run.amp_dtype is not None
        ):
            views = tta_views(run.model, normalise(run, x), OOF_TTA)
        # the mean of the views, as `segflow predict` computes a fold's probabilities with its
        # default TTA: the threshold and post-processing are chosen on what they will be applied to
        p = views.mean(0)
        scores += view_disagreement(views[:, :, 0]).cpu().tolist()  # calibrates needs_review
        if p.shape[-2:] != tuple(dataset.size):
            p = F.interpolate(p, size=tuple(dataset.size), mode="bilinear", align_corners=False)
        out = (p[:, 0] * 255).round().to(torch.uint8).cpu().numpy()
        for row, prob in zip(rows.tolist(), out, strict=True):
            probs[row] = prob
    oof = {
        "rows": [int(r) for r in data.rows],
        "scale": 1 / 255,
        "tta": OOF_TTA,
        "uncertainty": scores,
    }
    run.out.write_json("oof.json", oof)


def ensure_oof_array(models: Store, dataset: Dataset) -> None:
    """``models/oof.zarr/probs``: (N, H, W) uint8 probabilities x255, one chunk per image."""
    import zarr

    group = zarr.open_group(models.zarr_store(), mode="a")
    if "oof.zarr/probs" in group:
        return
    h, w = dataset.size
    arr = group.create_array(
        "oof.zarr/probs", shape=(dataset.n, h, w), chunks=(1, h, w), dtype="uint8", fill_value=0
    )
    arr.attrs.update({"scale": 1 / 255, "dataset": dataset.store.url})


def set_threads(cpus: int | None) -> None:
    """Concurrent folds on one CPU machine must share its cores, not each take all of them."""
    n = cpus or cpu_count()
    torch.set_num_threads(max(1, n))
