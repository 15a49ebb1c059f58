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

from segflow.dataset import Dataset
from segflow.errors import ConfigError
from segflow.storage import Store
from segflow.train.config import TrainConfig
from segflow.train.loop import DONE, FoldResult, ensure_oof_array, fit_fold, set_threads
from segflow.train.plan import parse_budget, plan_run
from segflow.train.splits import SPLITS, load_or_create_splits
from segflow.train.state import RECORD, check_models, claim_fold, model_spec, with_plan
from segflow.train.warmstart import pin_init

log = logging.getLogger("segflow.train")


@dataclass
class TrainResult:
    models: str
    splits: str
    folds: list[FoldResult]
    seconds: float
    # the version's threshold and post-processing chosen on the folds' OOF (postprocess.json;
    # segflow.predict.postprocess.Choice as a dict, with "seconds"), None when not made
    choice: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return all(f.status != "failed" for f in self.folds)


def train(cfg: TrainConfig) -> TrainResult:
    t0 = time.perf_counter()
    cfg = pin_init(cfg)  # every fold warm-starts from the same version, even if production moves
    started = time.time()  # a --time-budget counts from here (prepare_run plans after it)
    fold_ids = prepare_run(cfg)
    cfg = with_plan(cfg)  # the plan prepare_run recorded, if it made one
    if cfg.plan is not None and cfg.time_budget:
        # this run's end, in memory only: a stored absolute time would bound later runs too
        cfg = cfg.model_copy(update={"deadline": started + parse_budget(cfg.time_budget)})
    if cfg.executor == "inline":
        results = [_guarded(cfg, f) for f in fold_ids]
    else:
        results = _on_ray(cfg, fold_ids)
    models = Store(cfg.models, cfg.storage)
    result = TrainResult(models.url, models.uri(SPLITS), results, 0.0)
    models.write_json("train_summary.json", result.to_dict())  # the folds', whatever comes next
    result.choice = choose_version(cfg, results)
    result.seconds = round(time.perf_counter() - t0, 2)
    models.write_json("train_summary.json", result.to_dict())
    return result


def choose_version(cfg: TrainConfig, results: list[FoldResult]) -> dict[str, Any] | None:
    """Choose the threshold and post-processing on the OOF of every finished fold once this
    run's folds are done (inside a --time-budget: the plan keeps time for it), so a trained
    models folder is ready to predict. Skipped when a fold failed, or when every fold was
    already finished and the choice exists. A choice that fails (a dataset it cannot use, a
    storage error) is logged, never fatal: predict chooses on first use and says why."""
    from segflow.errors import SegflowError
    from segflow.predict.postprocess import CHOICE_FILE, choose_from_models

    if any(f.status == "failed" for f in results):
        return None
    if all(f.status == "skipped" for f in results) and Store(cfg.models, cfg.storage).exists(
        CHOICE_FILE
    ):
        return None
    t0 = time.perf_counter()
    try:
        choice = choose_from_models(cfg.models, cfg.dataset, cfg.storage)
    except SegflowError as e:
        log.warning("post-processing not chosen after training: %s", e)
        return None
    except Exception:  # the folds are trained and saved: the choice must never cost them
        log.warning("post-processing not chosen after training", exc_info=True)
        return None
    return {**choice.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}


def prepare_run(cfg: TrainConfig) -> list[int]:
    """Write what every fold shares (the split, the OOF array, the config) and return the
    folds to train. The driver does this once, before any fold starts: no fold races another."""
    started = time.time()  # a --time-budget counts from here
    models = Store(cfg.models, cfg.storage)
    dataset = Dataset(Store(cfg.dataset, cfg.storage))
    if "masks" not in dataset.group or not dataset.column("has_mask").any():
        raise ConfigError(f"dataset {cfg.dataset} has no masks; training needs labelled images")
    fold_ids = _fold_ids(cfg)
    if cfg.time_budget and cfg.plan is None:
        # before anything is written: a budget too small is refused with nothing trained
        planned = with_plan(cfg)  # a rerun keeps the plan measured the first time
        cfg = planned if planned.plan else plan_run(cfg, dataset, started)
        cfg = cfg.model_copy(update={"deadline": started + parse_budget(cfg.time_budget)})
    # before anything is written: train_config.json must keep describing the folds beside it
    check_models(cfg, models, dataset)
    groups = [str(g) for g in dataset.column("groups")]
    load_or_create_splits(models, dataset.ids, groups, cfg.folds, cfg.seed)
    ensure_oof_array(models, dataset)
    # without the deadline: it bounds this run only (see segflow.train.plan.recorded)
    models.write_json(RECORD, cfg.model_copy(update={"deadline": None}).public_dict())
    return fold_ids


def run_fold(cfg: TrainConfig, fold: int) -> FoldResult:
    """One fold, in-process (``executor="inline"``) or as one Ray task asking for
    ``gpus_per_fold`` GPUs; raises when the fold fails after its retries. Call
    :func:`prepare_run` first."""
    cfg = with_plan(cfg)
    if cfg.executor == "inline":
        return fit_fold(cfg, fold)
    import ray

    # The fold logs in its Ray worker, out of reach of the caller's (Prefect's) logger; its
    # metrics.csv in the object store is rewritten every epoch, so relay the new rows from it.
    seen = max((epoch for epoch, _ in _epoch_rows(cfg, fold)), default=0)
    ref = _submit(cfg, fold, len(_fold_ids(cfg)), relayed=True)
    while not ray.wait([ref], timeout=EPOCH_POLL_S)[0]:
        seen = _log_new_epochs(cfg, fold, seen)
    result = ray.get(ref)
    _log_new_epochs(cfg, fold, seen)
    if (refusal := result.extra.pop(REFUSED, None)) is not None:
        raise ConfigError(refusal)
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


PLACEMENT = "placement.json"  # fold-k/placement.json: every attempt's Ray node and GPU slot
REFUSED = "refused"  # FoldResult.extra key, on the way back from Ray only: the ConfigError text


def _remote_fold(cfg: TrainConfig, fold: int, cpus: int, relayed: bool = False) -> FoldResult:
    # Ray copies the worker's console to the driver's; when run_fold relays the epoch lines
    # already, the worker keeps to warnings so that each line is printed once.
    level = logging.WARNING if relayed else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    set_threads(cpus)
    out = Store(cfg.models, cfg.storage).child(f"fold-{fold}")
    try:
        # before placement.json is written: a fold of another config is refused untouched
        claim_fold(cfg, out, model_spec(cfg, Dataset(Store(cfg.dataset, cfg.storage))))
        return _placed_fit(cfg, fold, out)
    except ConfigError as e:
        # returned, not raised: Ray retries a task that raises (retry_exceptions), and every
        # retry would be refused the same way; the driver raises it again (run_fold)
        return FoldResult(fold, "failed", error=f"{type(e).__name__}: {e}", extra={REFUSED: str(e)})


def _placed_fit(cfg: TrainConfig, fold: int, out: Store) -> FoldResult:
    """:func:`fit_fold`, with where this attempt ran recorded in ``fold-k/placement.json``."""
    import ray
    import torch

    # Where this attempt runs: the Ray node and its GPU slot ids there (CUDA_VISIBLE_DEVICES is
    # set to them; Ray hands a slot to one task at a time). Every attempt is kept, so a fold
    # retried after a node loss shows both nodes.
    here = {
        "node": ray.get_runtime_context().get_node_id(),
        "gpus": [str(g) for g in ray.get_gpu_ids()],
        "started_at": time.time(),
    }
    earlier = out.read_json(PLACEMENT)["attempts"] if out.exists(PLACEMENT) else []
    if out.read_marker(DONE) is None:
        out.write_json(PLACEMENT, {"attempts": [*earlier, {**here, "status": "running"}]})
    if here["gpus"] and not torch.cuda.is_available():
        log.warning(
            "fold %d: Ray gave it GPU slot %s on node %s, but CUDA is not available there: "
            "training on the CPU",
            fold,
            ",".join(here["gpus"]),
            here["node"],
        )
    result = fit_fold(cfg, fold)
    if result.status == "skipped":  # trained earlier: it ran where that attempt ran
        done = [a for a in earlier if a.get("status") == "done"]
        result.extra["placement"] = done[-1] if done else None
        return result
    attempt = {
        **here,
        "status": result.status,
        "start_epoch": result.start_epoch,
        "finished_at": time.time(),
    }
    out.write_json(PLACEMENT, {"attempts": [*earlier, attempt]})
    result.extra["placement"] = attempt
    return result


def fold_cpus(cfg: TrainConfig, gpus: float, resources: dict[str, float], n_folds: int) -> int:
    """CPUs per fold task. A GPU fold takes its GPUs' share of one GPU node's cores, so it fits on
    one node and min(folds, GPUs) run at once; CPU folds share the cluster's cores."""
    if cfg.cpus_per_fold:
        return cfg.cpus_per_fold
    if gpus > 0:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        per_gpu = min((n.get("CPU", 0) / n["GPU"] for n in nodes), default=1.0)
        return max(1, int(per_gpu * gpus))
    return max(1, int(resources.get("CPU", 1)) // n_folds)


def _submit(cfg: TrainConfig, fold: int, n_concurrent: int, relayed: bool = False):
    import ray

    from segflow.cluster import connect_ray, gpus_per_task

    resources = connect_ray(cfg.ray_address)
    gpus = gpus_per_task(cfg.gpus_per_fold, resources)
    cpus = fold_cpus(cfg, gpus, resources, n_concurrent)
    log.info("fold %d on Ray: %s GPU and %s CPU", fold, gpus, cpus)
    opts = {"num_gpus": gpus, "num_cpus": cpus, "max_retries": cfg.max_retries}
    task = ray.remote(_remote_fold).options(
        name=f"train-fold-{fold}", retry_exceptions=True, **opts
    )
    return task.remote(cfg, fold, cpus, relayed)


def _on_ray(cfg: TrainConfig, fold_ids: list[int]) -> list[FoldResult]:
    import ray

    refs = {f: _submit(cfg, f, len(fold_ids)) for f in fold_ids}
    results = []
    for fold, ref in refs.items():
        try:
            result = ray.get(ref)
            result.extra.pop(REFUSED, None)  # a failed fold like any other; its error says why
            results.append(result)
        except Exception as e:  # the task failed after its retries: report, don't raise
            cause = e.cause if hasattr(e, "cause") and e.cause else e
            detail = "".join(traceback.format_exception_only(type(cause), cause)).strip()
            results.append(FoldResult(fold, "failed", error=detail[-2000:]))
    return results
