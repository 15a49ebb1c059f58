"""``train()``: write the split once, then train the folds concurrently on Ray (one fold per
task, ``num_gpus=gpus_per_fold``), or in-process with ``executor="inline"``."""

from __future__ import annotations

import csv
import io
import logging
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

from segflow.errors import ConfigError
from segflow.ingest.dataset import Dataset
from segflow.storage import Store
from segflow.train.config import TrainConfig
from segflow.train.loop import FoldResult, ensure_oof_array, fit_fold, set_threads
from segflow.train.splits import SPLITS, load_or_create_splits
from segflow.train.warmstart import pin_init

log = logging.getLogger("segflow.train")


@dataclass
class TrainResult:
    models: str
    splits: str
    folds: list[FoldResult]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return all(f.status != "failed" for f in self.folds)


def train(cfg: TrainConfig) -> TrainResult:
    t0 = time.perf_counter()
    cfg = pin_init(cfg)  # every fold warm-starts from the same version, even if production moves
    fold_ids = prepare_run(cfg)
    if cfg.executor == "inline":
        results = [_guarded(cfg, f) for f in fold_ids]
    else:
        results = _on_ray(cfg, fold_ids)
    models = Store(cfg.models, cfg.storage)
    result = TrainResult(
        models.url, models.uri(SPLITS), results, round(time.perf_counter() - t0, 2)
    )
    models.write_json("train_summary.json", result.to_dict())
    return result


def prepare_run(cfg: TrainConfig) -> list[int]:
    """Write what every fold shares (the split, the OOF array, the config) and return the
    folds to train. The driver does this once, before any fold starts: no fold races another."""
    models = Store(cfg.models, cfg.storage)
    dataset = Dataset(Store(cfg.dataset, cfg.storage))
    if "masks" not in dataset.group or not dataset.column("has_mask").any():
        raise ConfigError(f"dataset {cfg.dataset} has no masks; training needs labelled images")
    fold_ids = _fold_ids(cfg)
    groups = [str(g) for g in dataset.column("groups")]
    load_or_create_splits(models, dataset.ids, groups, cfg.folds, cfg.seed)
    ensure_oof_array(models, dataset)
    models.write_json("train_config.json", cfg.public_dict())
    return fold_ids


def run_fold(cfg: TrainConfig, fold: int) -> FoldResult:
    """One fold, in-process (``executor="inline"``) or as one Ray task asking for
    ``gpus_per_fold`` GPUs; raises when the fold fails after its retries. Call
    :func:`prepare_run` first."""
    if cfg.executor == "inline":
        return fit_fold(cfg, fold)
    import ray

    # The fold logs in its Ray worker, out of reach of the caller's (Prefect's) logger; its
    # metrics.csv in the object store is rewritten every epoch, so relay the new rows from it.
    seen = max((epoch for epoch, _ in _epoch_rows(cfg, fold)), default=0)
    ref = _submit(cfg, fold, len(_fold_ids(cfg)))
    while not ray.wait([ref], timeout=EPOCH_POLL_S)[0]:
        seen = _log_new_epochs(cfg, fold, seen)
    result = ray.get(ref)
    _log_new_epochs(cfg, fold, seen)
    return result


EPOCH_POLL_S = 5.0


def _epoch_rows(cfg: TrainConfig, fold: int) -> list[tuple[int, str]]:
    """``(epoch, progress line)`` per row of the fold's metrics.csv, as far as it can be read."""
    out = Store(cfg.models, cfg.storage).child(f"fold-{fold}")
    try:
        if not out.exists("metrics.csv"):
            return []
        rows = csv.DictReader(io.StringIO(out.read_bytes("metrics.csv").decode()))
        return [
            (
                int(r["epoch"]),
                f"train {r['train_loss']} val {r['val_loss']} dice {r['val_dice']} "
                f"({r['images_per_s']} img/s)",
            )
            for r in rows
        ]
    except Exception as e:  # progress lines must never cost the fold (a retry would rerun it)
        log.debug("fold %d: metrics.csv unreadable for now: %s", fold, e)
        return []


def _log_new_epochs(cfg: TrainConfig, fold: int, seen: int) -> int:
    """Log the epochs of ``fold/metrics.csv`` after epoch ``seen``; returns the last one."""
    for epoch, line in _epoch_rows(cfg, fold):
        if epoch > seen:
            log.info("fold %d epoch %d/%d: %s", fold, epoch, cfg.epochs, line)
            seen = epoch
    return seen


def _fold_ids(cfg: TrainConfig) -> list[int]:
    ids = cfg.fold_ids if cfg.fold_ids is not None else list(range(cfg.folds))
    bad = [f for f in ids if not 0 <= f < cfg.folds]
    if bad or not ids:
        raise ConfigError(
            f"fold ids {ids} invalid for {cfg.folds} folds; allowed 0..{cfg.folds - 1}"
        )
    return sorted(set(ids))


def _guarded(cfg: TrainConfig, fold: int) -> FoldResult:
    """One fold, with its failure turned into a result: one bad fold never kills the others."""
    try:
        return fit_fold(cfg, fold)
    except Exception as e:
        log.exception("fold %d failed", fold)
        return FoldResult(fold, "failed", error=f"{type(e).__name__}: {e}")


def _remote_fold(cfg: TrainConfig, fold: int, cpus: int) -> FoldResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_threads(cpus)
    return fit_fold(cfg, fold)


def _submit(cfg: TrainConfig, fold: int, n_concurrent: int):
    import ray

    from segflow.cluster import connect_ray, gpus_per_task

    resources = connect_ray(cfg.ray_address)
    gpus = gpus_per_task(cfg.gpus_per_fold, resources)
    # concurrent folds on one machine share its cores instead of each taking all of them
    cpus = cfg.cpus_per_fold or max(1, int(resources.get("CPU", 1)) // n_concurrent)
    log.info("fold %d on Ray: %s GPU and %s CPU", fold, gpus, cpus)
    opts = {"num_gpus": gpus, "num_cpus": cpus, "max_retries": cfg.max_retries}
    task = ray.remote(_remote_fold).options(
        name=f"train-fold-{fold}", retry_exceptions=True, **opts
    )
    return task.remote(cfg, fold, cpus)


def _on_ray(cfg: TrainConfig, fold_ids: list[int]) -> list[FoldResult]:
    import ray

    refs = {f: _submit(cfg, f, len(fold_ids)) for f in fold_ids}
    results = []
    for fold, ref in refs.items():
        try:
            results.append(ray.get(ref))
        except Exception as e:  # the task failed after its retries: report, don't raise
            cause = e.cause if hasattr(e, "cause") and e.cause else e
            detail = "".join(traceback.format_exception_only(type(cause), cause)).strip()
            results.append(FoldResult(fold, "failed", error=detail[-2000:]))
    return results
