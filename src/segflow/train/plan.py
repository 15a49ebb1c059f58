"""Planning a training run to a deadline (``--time-budget``), as nnU-Net plans from the data.

Three plain steps, each testable alone:

1. :func:`fingerprint`: what the dataset is (image count, median original size and aspect,
   foreground fraction, mask compactness), recorded with the plan.
2. A :class:`StepTimer` measures what one candidate costs per image on the device the folds
   will run on: :class:`TorchStepTimer` runs a few real warm-up steps; tests pass a
   :class:`FixedStepTimer`.
3. :func:`choose_plan`: the largest input size, then the strongest encoder, that fits at
   least ``min_epochs`` epochs of every fold in the budget, K folds on G devices taking
   ⌈K/G⌉ rounds, after a per-fold margin for the OOF pass and the full-resolution scoring
   that is measured too. It is a pure function of its (rounded) inputs, so the same
   fingerprint and step times give the same plan, and the stage cache stays meaningful.

A budget too small for one epoch of the cheapest candidate is refused before anything is
trained (:class:`BudgetError`, which names the minimum budget).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segflow.predict.tta import TTA_MODES
from segflow.predict.uncertainty import OOF_TTA
from segflow.train.budget import BudgetError, format_seconds, parse_budget

if TYPE_CHECKING:
    from segflow.dataset import Dataset
    from segflow.train.config import TrainConfig

log = logging.getLogger("segflow.train")

#: encoders the planner may choose from, weakest first, when the user named none; each needs
#: offline weights (segflow.train.weights.NAMED_SOURCES), so a plan never downloads anything
PLAN_ENCODERS: tuple[str, ...] = ("timm-tf_efficientnet_lite0",)
MIN_SIDE = 64  # below this a U-Net of depth 5 has a 2x2 bottleneck: no plan goes smaller
SIDE_STEP = 32  # input sides are multiples of 32 (2**5, the U-Net's deepest stride)
DEFAULT_MAX_SIDE = 256  # the default input side without a budget (see default_size)
SAFETY = 1.1  # an epoch costs its measured steps plus data loading, logging and checkpoints
MAX_EPOCHS = 100  # a generous budget buys more epochs up to here, then nothing more
SPENT_STEP = 5.0  # seconds: planning time is rounded up to this
WARMUP_EPOCHS = 1  # linear warm-up before the cosine to the deadline


def _round2(x: float) -> float:
    """Two significant digits: step times that differ by noise give the same plan."""
    return float(f"{x:.2g}") if x > 0 else 0.0


# -- 1. fingerprint -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fingerprint:
    n_images: int
    n_labelled: int
    frame_size: tuple[int, int]  # the dataset's (H, W)
    median_orig_size: tuple[int, int]  # (h, w) of the sources
    median_aspect: float  # w / h of the sources
    foreground_fraction: float  # of the frame's pixels, mean over the sampled masks
    compactness: float  # 4 pi area / perimeter^2 of the masks (1: a disc), mean over the sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(dataset: Dataset, sample: int = 256) -> Fingerprint:
    """The dataset's fingerprint; the masks of an evenly spaced ``sample`` of labelled rows
    (one chunk each), so it costs the same on 2,000 or 200,000 images."""
    labelled = np.flatnonzero(dataset.column("has_mask"))
    orig = np.asarray(dataset.column("orig_size"), dtype=np.float64).reshape(-1, 2)
    picks = labelled[np.linspace(0, len(labelled) - 1, min(sample, len(labelled))).astype(int)]
    fg, compact = [], []
    for i in sorted(set(picks.tolist())):
        m = dataset.mask(int(i))
        if m is None:
            continue
        m = m > 0
        fg.append(m.mean())
        if m.any():
            compact.append(_compactness(m))
    h, w = (np.median(orig[:, 0]), np.median(orig[:, 1])) if len(orig) else (0.0, 0.0)
    aspect = float(np.median(orig[:, 1] / np.maximum(orig[:, 0], 1))) if len(orig) else 1.0
    return Fingerprint(
        n_images=int(dataset.n),
        n_labelled=len(labelled),
        frame_size=(int(dataset.size[0]), int(dataset.size[1])),
        median_orig_size=(int(h), int(w)),
        median_aspect=round(aspect, 3),
        foreground_fraction=round(float(np.mean(fg)) if fg else 0.0, 4),
        compactness=round(float(np.mean(compact)) if compact else 0.0, 3),
    )


def _compactness(m: np.ndarray) -> float:
    """4 pi A / P^2 with P the count of foreground pixels that touch the background (4-way)."""
    padded = np.pad(m, 1)
    inner = padded[1:-1, 1:-1]
    interior = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    perimeter = max(int(np.count_nonzero(inner & ~interior)), 1)
    return min(1.0, 4 * math.pi * int(np.count_nonzero(m)) / perimeter**2)


def default_size(frame: Sequence[int], depth: int = 5) -> tuple[int, int]:
    """The input size without ``--size`` or a budget: the dataset's frame, capped at
    :data:`DEFAULT_MAX_SIDE` per side and rounded down to a multiple of the U-Net's deepest
    stride (2**depth). The frame is what ingest fitted the sources into; past 256 a CPU epoch
    costs over 4x the 128 one, so larger inputs are left to ``--size`` or ``--time-budget``,
    which measures whether they fit."""
    step = 2**depth
    return tuple(max(step, min(int(s), DEFAULT_MAX_SIDE) // step * step) for s in frame)  # type: ignore[return-value]


# -- 2. step times --------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Candidate:
    encoder: str
    size: tuple[int, int]
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.encoder} {self.size[0]}x{self.size[1]} batch {self.batch_size}"


@dataclass(frozen=True)
class StepTime:
    """Seconds per image of one candidate: a training step, and an inference pass."""

    train_s: float
    infer_s: float

    def rounded(self) -> StepTime:
        return StepTime(_round2(self.train_s), _round2(self.infer_s))


class StepTimer(Protocol):
    def measure(self, candidate: Candidate) -> StepTime: ...


@dataclass(frozen=True)
class FixedStepTimer:
    """A timer without a device: cost proportional to the input pixels, times a factor per
    encoder. For tests, and to see what a plan would be on a known machine."""

    train_s_per_mpixel: float
    infer_fraction: float = 0.3
    encoder_factor: Mapping[str, float] = field(default_factory=dict)

    def measure(self, candidate: Candidate) -> StepTime:
        mp = candidate.size[0] * candidate.size[1] / 1e6
        t = mp * self.train_s_per_mpixel * self.encoder_factor.get(candidate.encoder, 1.0)
        return StepTime(t, t * self.infer_fraction)


class TorchStepTimer:
    """Real steps on this process's device: ``warmup`` untimed then ``steps`` timed training
    steps (forward, loss, backward, optimiser) and as many inference passes, on random
    inputs of the candidate's shape. Same model, loss, optimiser and precision as the folds."""

    def __init__(self, cfg: TrainConfig, warmup: int = 1, steps: int = 2) -> None:
        self.cfg, self.warmup, self.steps = cfg, warmup, steps

    def measure(self, candidate: Candidate) -> StepTime:
        import torch

        from segflow.train.losses import make_loss
        from segflow.train.model import ModelSpec, build_model
        from segflow.train.model import amp_dtype as _amp_dtype

        cfg = self.cfg
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        spec = ModelSpec(
            arch=cfg.arch,
            encoder=candidate.encoder,
            encoder_depth=cfg.encoder_depth,
            decoder_channels=cfg.decoder_channels,
            input_size=candidate.size,
            dataset_size=candidate.size,
            resize="stretch",
            threshold=cfg.threshold,
        )
        torch.manual_seed(0)
        model = build_model(spec).to(device)
        loss_fn = make_loss(cfg.loss).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        amp = _amp_dtype(cfg.amp, device)
        b = candidate.batch_size
        x = torch.rand(b, 3, *candidate.size, device=device)
        y = (torch.rand(b, 1, *candidate.size, device=device) > 0.5).float()

        def train_step() -> None:
            with torch.autocast(device.type, amp or torch.float32, amp is not None):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        @torch.no_grad()
        def infer_step() -> None:
            with torch.autocast(device.type, amp or torch.float32, amp is not None):
                model(x)

        model.train()
        train_s = self._time(train_step, device) / b
        model.eval()
        infer_s = self._time(infer_step, device) / b
        log.info(
            "plan: %s: %.4f s/image train, %.4f s/image inference",
            candidate.label,
            train_s,
            infer_s,
        )
        return StepTime(train_s, infer_s)

    def _time(self, step: Callable[[], None], device: Any) -> float:
        import torch

        for _ in range(self.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(self.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / self.steps


# -- 3. the choice --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What one training run asks of the budget: the folds, their images, the devices."""

    budget_s: float
    folds: int  # folds to train
    devices: int  # folds that train at once
    n_train: int  # images per fold's training set
    n_val: int  # images per fold's validation set
    finish_s_per_image: float  # full-resolution scoring of one validation image (measured)
    spent_s: float = 0.0  # already used: fingerprint and step timing
    # after the last round: the version's threshold and post-processing, chosen on every OOF
    # image at its original resolution (segflow.predict.postprocess.oof_choice)
    choose_s: float = 0.0
    slowdown: float = 1.0  # step time multiplier when concurrent folds share one CPU
    min_epochs: int = 8

    @property
    def rounds(self) -> int:
        return math.ceil(self.folds / max(self.devices, 1))


@dataclass(frozen=True)
class Plan:
    encoder: str
    size: tuple[int, int]
    batch_size: int
    epochs: int  # the most that fit (capped at MAX_EPOCHS); the deadline may stop sooner
    warmup_epochs: int
    epoch_s: float  # predicted seconds of one epoch (train + validation), with SAFETY
    fold_s: float  # wall seconds each fold may use, training and finishing
    finish_s: float  # of those, kept for the OOF pass and the full-resolution scores
    rounds: int
    budget_s: float
    min_epochs: int
    reached_min_epochs: bool
    step_times: dict[str, dict[str, float]]  # candidate label -> rounded StepTime
    epochs_by_candidate: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        return cls(**{**d, "size": tuple(d["size"])})


def candidates(frame: Sequence[int], encoders: Sequence[str], batch_size: int) -> list[Candidate]:
    """Encoder x input size x batch: sizes keep the frame's aspect, their long side runs from
    :data:`MIN_SIDE` (or the frame's, when smaller) to the frame's in steps of
    :data:`SIDE_STEP`: never upsampled."""
    h, w = int(frame[0]), int(frame[1])
    long = max(h, w)
    out = []
    for side in range(min(MIN_SIDE, long), long + 1, SIDE_STEP):
        f = side / long
        size = tuple(max(SIDE_STEP, round(s * f / SIDE_STEP) * SIDE_STEP) for s in (h, w))
        out += [Candidate(e, size, batch_size) for e in encoders]  # type: ignore[arg-type]
    return sorted(set(out), key=_cost_order(encoders))


def _cost_order(encoders: Sequence[str]) -> Callable[[Candidate], tuple]:
    rank = {e: i for i, e in enumerate(encoders)}
    return lambda c: (c.size[0] * c.size[1], rank.get(c.encoder, 0), c.batch_size)


def fold_epochs(t: StepTime, work: Workload) -> tuple[int, float, float, float]:
    """(epochs that fit, seconds per epoch, seconds per fold, finishing seconds per fold)."""
    t = t.rounded()
    epoch_s = (work.n_train * t.train_s + work.n_val * t.infer_s) * work.slowdown * SAFETY
    # the OOF pass runs every view of OOF_TTA; then each image is scored at full resolution
    oof_s = t.infer_s * len(TTA_MODES[OOF_TTA]) * work.slowdown
    finish_s = work.n_val * (oof_s + work.finish_s_per_image) * SAFETY
    fold_s = (work.budget_s - work.spent_s - work.choose_s) / work.rounds
    n = math.floor((fold_s - finish_s) / epoch_s) if epoch_s > 0 else MAX_EPOCHS
    return max(0, min(n, MAX_EPOCHS)), epoch_s, fold_s, finish_s


def choose_plan(
    fp: Fingerprint,
    timings: Mapping[Candidate, StepTime],
    work: Workload,
    encoders: Sequence[str] = PLAN_ENCODERS,
) -> Plan:
    """The largest input size, then the strongest encoder (later in ``encoders``), that fits
    ``work.min_epochs``; when none does, the cheapest candidate with as many epochs as fit;
    when not even one epoch fits, :class:`BudgetError` with the minimum budget."""
    if not timings:
        raise ValueError("no candidate was measured")
    order = sorted(timings, key=_cost_order(encoders))
    fits = {c: fold_epochs(timings[c], work) for c in order}
    good = [c for c in order if fits[c][0] >= work.min_epochs]
    chosen = good[-1] if good else order[0]
    epochs, epoch_s, fold_s, finish_s = fits[chosen]
    if epochs < 1:
        cheapest = order[0]
        _, e_s, _, f_s = fits[cheapest]
        minimum = work.spent_s + work.choose_s + work.rounds * (e_s + f_s)
        raise BudgetError(
            work.budget_s,
            math.ceil(minimum),
            f"{cheapest.label}: {format_seconds(e_s)} per epoch and {format_seconds(f_s)} to "
            f"finish each of {work.folds} fold(s) in {work.rounds} round(s), after "
            f"{format_seconds(work.spent_s)} of planning, and {format_seconds(work.choose_s)} "
            f"to choose the post-processing; {fp.n_labelled} labelled images",
        )
    if not good:
        log.warning(
            "plan: no candidate fits %d epochs in %s; training %s for %d",
            work.min_epochs,
            format_seconds(work.budget_s),
            chosen.label,
            epochs,
        )
    return Plan(
        encoder=chosen.encoder,
        size=chosen.size,
        batch_size=chosen.batch_size,
        epochs=epochs,
        warmup_epochs=WARMUP_EPOCHS if epochs >= 4 else 0,
        epoch_s=round(epoch_s, 2),
        fold_s=round(fold_s, 2),
        finish_s=round(finish_s, 2),
        rounds=work.rounds,
        budget_s=work.budget_s,
        min_epochs=work.min_epochs,
        reached_min_epochs=bool(good),
        step_times={c.label: asdict(timings[c].rounded()) for c in order},
        epochs_by_candidate={c.label: fits[c][0] for c in order},
    )


def measure(
    cands: Sequence[Candidate], timer: StepTimer, fits: Callable[[StepTime], bool]
) -> dict[Candidate, StepTime]:
    """Time the candidates cheapest first, stopping after the first that does not fit: a
    larger input only costs more, so measuring on would spend the budget for nothing."""
    out: dict[Candidate, StepTime] = {}
    for c in cands:
        out[c] = timer.measure(c).rounded()
        if not fits(out[c]):
            break
    return out


# -- deadline schedule -------------------------------------------------------------------------
def deadline_lr(base: float, floor: float, epoch: int, total: int, warmup: int) -> float:
    """The learning rate of 0-based ``epoch`` of ``total``: linear warm-up over ``warmup``
    epochs, then cosine from ``base`` to ``floor`` at the end of the last epoch."""
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    span = max(total - warmup, 1)
    t = min(max(epoch - warmup, 0) / span, 1.0)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t))


def epochs_left(now: float, end: float, epoch_s: float, finish_s: float) -> int:
    """Whole epochs of ``epoch_s`` that still fit before ``end``, keeping ``finish_s``."""
    if epoch_s <= 0:
        return MAX_EPOCHS
    return max(0, math.floor((end - finish_s - now) / epoch_s))


# -- the run's plan -------------------------------------------------------------------------------
PLANNED_FIELDS = (
    "encoder",
    "encoder_weights",
    "size",
    "batch_size",
    "epochs",
    "ema_decay",
    "plan",
)
#: a planned run keeps an average of its weights (train.ema_decay) when it takes enough
#: optimiser steps for the average to settle (several of its ~1 / (1 - decay) horizons); one
#: pair of 25-minute ISIC runs gave +0.003 thresholded Jaccard with it (docs/results.md,
#: ablations). Its per-step cost is not in the measured step times: a few % of a CPU step,
#: inside the 1.1 safety factor
PLAN_EMA_DECAY = 0.99
EMA_MIN_STEPS = 500


def plan_run(
    cfg: TrainConfig, dataset: Dataset, started: float, timer: StepTimer | None = None
) -> TrainConfig:
    """``cfg`` with its plan for ``cfg.time_budget``: encoder, size, batch and epochs set, the
    plan (with the fingerprint and the measured step times) in ``cfg.plan``, and the
    ``deadline`` (``started`` + budget). Raises :class:`BudgetError` before anything trains."""
    from segflow.predict.postprocess import seconds_per_choice_image
    from segflow.train.fullres import seconds_per_image
    from segflow.train.weights import NAMED_SOURCES

    budget = parse_budget(cfg.time_budget or 0)
    fp = fingerprint(dataset)
    given = cfg.model_fields_set
    # a named encoder, or weights of one encoder, fix the encoder; else the offline choices
    fixed = "encoder" in given or (
        cfg.encoder_weights is not None and cfg.encoder_weights not in NAMED_SOURCES
    )
    encoders = [cfg.encoder] if fixed else [e for e in PLAN_ENCODERS if e in NAMED_SOURCES.values()]
    frame = tuple(cfg.size) if cfg.size else fp.frame_size
    cands = candidates(frame, encoders, cfg.batch_size)
    folds = len(cfg.fold_ids) if cfg.fold_ids is not None else cfg.folds
    devices, slowdown, gpus = _devices(cfg, folds)
    if timer is None:
        timer = RayStepTimer(cfg, gpus) if gpus else TorchStepTimer(cfg)
    finish = _round2(seconds_per_image(dataset, cfg.storage))
    n_val = math.ceil(fp.n_labelled / cfg.folds)
    # a real choice on a few source masks, timed, per OOF image of the folds asked for; no
    # SAFETY factor: on so few images the pipeline's fill and drain already make the timing
    # ~1.3x what the choice costs per image over hundreds (ISIC: 0.31 against 0.24 s)
    # the choice reads every finished fold's OOF: those of earlier runs count too
    chosen_on = min(fp.n_labelled, n_val * (folds + len(_finished_elsewhere(cfg))))
    choose_s = _round2(seconds_per_choice_image(dataset, cfg.storage, 16) * chosen_on)
    work = Workload(
        budget_s=budget,
        folds=folds,
        devices=devices,
        n_train=fp.n_labelled - fp.n_labelled // cfg.folds,
        n_val=n_val,
        finish_s_per_image=finish,
        choose_s=choose_s,
        slowdown=slowdown,
        min_epochs=cfg.min_epochs,
    )
    timings = measure(cands, timer, lambda t: fold_epochs(t, work)[0] >= cfg.min_epochs)
    # what planning used, rounded up to SPENT_STEP: noise in it must not change the plan
    spent = math.ceil((time.time() - started) / SPENT_STEP) * SPENT_STEP
    plan = choose_plan(fp, timings, replace(work, spent_s=spent), encoders)
    record = {
        **plan.to_dict(),
        "fingerprint": fp.to_dict(),
        "finish_s_per_image": finish,
        "choose_s": choose_s,
        "devices": devices,
        "slowdown": slowdown,
        "planning_s": spent,
    }
    log.info(
        "plan for %s: %s at %dx%d, batch %d, up to %d epochs (%.0f s each), %d round(s)",
        format_seconds(budget),
        plan.encoder,
        *plan.size,
        plan.batch_size,
        plan.epochs,
        plan.epoch_s,
        plan.rounds,
    )
    ema = cfg.ema_decay if "ema_decay" in given else planned_ema(plan, work.n_train)
    record["ema_decay"] = ema
    weights = cfg.encoder_weights
    if not fixed:
        weights = next((n for n, e in NAMED_SOURCES.items() if e == plan.encoder), None)
    return cfg.model_copy(
        update={
            "encoder": plan.encoder,
            "encoder_weights": weights,
            "size": plan.size,
            "batch_size": plan.batch_size,
            "epochs": plan.epochs,
            "ema_decay": ema,
            "plan": record,
            "deadline": started + budget,
        }
    )


def planned_ema(plan: Plan, n_train: int) -> float | None:
    """The weight average a plan trains with: :data:`PLAN_EMA_DECAY` when its optimiser
    steps reach :data:`EMA_MIN_STEPS`, else none (the average would still lag the weights)."""
    steps = plan.epochs * math.ceil(n_train / plan.batch_size)
    return PLAN_EMA_DECAY if steps >= EMA_MIN_STEPS else None


def _finished_elsewhere(cfg: TrainConfig) -> list[int]:
    """Folds already finished under ``cfg.models`` that this run does not train."""
    import posixpath

    from segflow.storage import Store

    models = Store(cfg.models, cfg.storage)
    asked = set(cfg.fold_ids) if cfg.fold_ids is not None else set(range(cfg.folds))
    done = {
        posixpath.basename(posixpath.dirname(str(p)))
        for p in models.fs.glob(models.path("fold-*/fold.complete.json"))
    }
    found = [int(d.removeprefix("fold-")) for d in done if d.removeprefix("fold-").isdigit()]
    return sorted(k for k in found if k not in asked and k < cfg.folds)


def _devices(cfg: TrainConfig, folds: int) -> tuple[int, float, float]:
    """(folds that train at once, step-time multiplier, GPUs per fold on Ray). Inline: one
    fold at a time. On Ray with GPUs: ``GPUs / gpus_per_fold`` folds at once. On Ray without:
    every fold at once, sharing the cores, so each step takes ``folds`` times as long as
    measured on all of them."""
    if cfg.executor == "inline":
        return 1, 1.0, 0.0
    from segflow.cluster import connect_ray, gpus_per_task

    resources = connect_ray(cfg.ray_address)
    per_fold = gpus_per_task(cfg.gpus_per_fold, resources)
    if per_fold > 0:
        return max(1, math.floor(resources.get("GPU", 0) / per_fold)), 1.0, per_fold
    return folds, float(folds), 0.0


def _measure_remote(cfg: TrainConfig, candidate: Candidate) -> StepTime:
    return TorchStepTimer(cfg).measure(candidate)


@dataclass(frozen=True)
class RayStepTimer:
    """:class:`TorchStepTimer` in a Ray task holding a fold's GPUs: when the folds run on a
    cluster's GPUs, the driver's own device (often none) is not where they train."""

    cfg: TrainConfig
    gpus: float

    def measure(self, candidate: Candidate) -> StepTime:
        import ray

        task = ray.remote(_measure_remote).options(num_gpus=self.gpus, num_cpus=1)
        return ray.get(task.remote(self.cfg, candidate))


def recorded(cfg: TrainConfig, record: Mapping[str, Any] | None) -> TrainConfig:
    """``cfg`` with the plan of a run's ``train_config.json`` (``record``) when both ask for
    the same budget: every fold, and every rerun, trains the plan that was measured once.

    Never the record's ``deadline``: an absolute time bounds only the run that set it (in
    memory). A later run reading it back (a cached prepare, a retried fold) would get a
    deadline long past and stop at once; each fold bounds itself by ``plan["fold_s"]`` from
    its own start (``segflow.train.loop.Deadline``)."""
    if not cfg.time_budget or cfg.plan is not None or not record or not record.get("plan"):
        return cfg
    if record.get("time_budget") != cfg.time_budget or record.get("dataset") != cfg.dataset:
        return cfg
    # a record written before a field was planned keeps the value that run trained with; an
    # average asked for (or refused) explicitly stays, for check_models to compare
    update = {k: record[k] for k in PLANNED_FIELDS if k in record}
    if "ema_decay" in cfg.model_fields_set:
        update.pop("ema_decay", None)
    update["size"] = tuple(update["size"])
    return cfg.model_copy(update=update)
