"""Predict shards on Ray: one path for the bulk run and for the flow's per-shard tasks.

Each shard is one Ray task asking for ``gpus_per_worker`` GPUs (and the CPUs that go with
them). The task keeps its worker process (``max_calls=0``) and that process keeps the loaded
ensemble (:func:`_cached_ensemble`), so consecutive shards on a worker load the folds once, as
a long-lived actor would, and again only when the folds' weights change; Ray's scheduler runs
as many shards at once as the GPUs allow.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from segflow.cluster import connect_ray, cpu_count, gpus_per_task
from segflow.errors import ModelChangedError
from segflow.predict.config import PredictConfig
from segflow.predict.ensemble import Ensemble, load_ensemble
from segflow.predict.manifest import read_shard
from segflow.predict.shard import ShardContext, run_shard, shard_marker
from segflow.storage import StorageOptions, Store, sha256_json

log = logging.getLogger("segflow.predict")

Shard = dict[str, Any]


@dataclass(frozen=True)
class WorkerResources:
    """What one predict worker asks of the cluster; ``n`` workers share its CPUs."""

    n: int
    gpus: float
    cpus: int


def worker_resources(cfg: PredictConfig, cluster: dict[str, float]) -> WorkerResources:
    """``workers`` (default: one per GPU, or one on a CPU cluster), ``gpus_per_worker``
    (default: 1 with GPUs, else 0) and the cluster's CPUs shared out among the workers."""
    gpus = gpus_per_task(cfg.gpus_per_worker, cluster)
    n = cfg.workers or (max(1, int(cluster.get("GPU", 0) // max(gpus, 1e-9))) if gpus else 1)
    return WorkerResources(n, gpus, max(1, int(cluster.get("CPU", 1)) // n))


#: loaded ensembles of this process: (models, storage, folds) -> (weights fingerprint, ensemble)
_LOADED: dict[tuple[str, StorageOptions, tuple[int, ...] | None], tuple[str, Ensemble]] = {}
_KEEP = 2  # ensembles held at once (a worker alternating between two model versions)
_FOLD_FILES = ("fold.complete.json", "best.pt", "config.json")


def weights_fingerprint(models: Store, folds: tuple[int, ...] | None) -> str:
    """What a load of ``folds`` (None: every finished fold) would read, as stored now: each
    fold's done-marker, model config and best checkpoint (ETag or mtime, and size). A retrain
    into the same URL (``segflow train --overwrite``) rewrites them, so the fingerprint moves."""
    if not models.exists():
        return ""  # nothing to load: load_ensemble says so
    if folds is None:
        names = models.fs.ls(models.path(), detail=False, refresh=True)  # not a cached listing
        folds = tuple(
            sorted(
                int(n.rsplit("-", 1)[1])
                for n in (posixpath.basename(str(x).rstrip("/")) for x in names)
                if n.startswith("fold-") and n.removeprefix("fold-").isdigit()
            )
        )
    seen = []
    for k in folds:
        for f in models.list(f"fold-{k}"):
            if posixpath.basename(f.rel) in _FOLD_FILES:
                seen.append((f.rel, f.fingerprint))
    return sha256_json(seen)


def _cached_ensemble(
    models: str,
    storage: StorageOptions,
    folds: tuple[int, ...] | None,
    planned: str | None = None,
) -> Ensemble:
    """Loaded once per process and kept while its folds' weights are unchanged: consecutive
    shards on a worker skip the load, and a retrain into the same URL is picked up by the
    next shard instead of serving the stale model for the worker's lifetime. ``planned``:
    the run's pinned fingerprint; weights that differ from it raise, since the run's other
    shards (and its identity.json) are the planned model's."""
    store = Store(models, storage)
    key = (store.url, storage, folds)
    fingerprint = weights_fingerprint(store, folds)
    if planned is not None and fingerprint != planned:
        raise ModelChangedError(
            f"the weights at {store.url} changed while this prediction ran (planned with "
            f"fingerprint {planned[:12]}, now {fingerprint[:12]}): a retrain into the same "
            "URL. Run the prediction again: its plan takes the new weights and redoes every "
            "shard, so no mask mixes the two models"
        )
    held = _LOADED.pop(key, None)
    if held is not None and held[0] == fingerprint:
        _LOADED[key] = held  # most recently used last
        return held[1]
    if held is not None:
        log.info("predict: the weights at %s changed since they were loaded; reloading", store.url)
    ensemble = load_ensemble(store, list(folds) if folds is not None else None)
    _LOADED[key] = (fingerprint, ensemble)
    while len(_LOADED) > _KEEP:
        _LOADED.pop(next(iter(_LOADED)))
    return ensemble


def planned_weights(cfg: PredictConfig) -> str:
    """The fingerprint a run pins when planned (:class:`ShardContext` ``weights``)."""
    return weights_fingerprint(Store(cfg.models, cfg.storage), _folds(cfg))


def _folds(cfg: PredictConfig) -> tuple[int, ...] | None:
    folds = cfg.fold_list()
    return tuple(folds) if folds is not None else None


def ensemble_for(cfg: PredictConfig, planned: str | None = None) -> Ensemble:
    return _cached_ensemble(cfg.models, cfg.storage, _folds(cfg), planned)


def _shard_task(ctx: ShardContext, shard: Shard, cpus: int) -> Shard:
    import torch

    torch.set_num_threads(max(1, cpus))
    # the driver sends the shard's ref; its items are read here, one shard at a time
    return run_shard(ctx, ensemble_for(ctx.cfg, ctx.weights), read_shard(ctx.out, shard))


def _remote(ctx: ShardContext, shard: Shard, res: WorkerResources):
    import ray

    # max_calls=0: keep the worker process (and its loaded ensemble) for the next shard; Ray
    # recycles GPU workers after every call by default
    task = ray.remote(max_calls=0)(_shard_task).options(
        name=f"predict-shard-{shard['shard']:04d}",
        num_gpus=res.gpus,
        num_cpus=res.cpus,
        max_retries=1,
        retry_exceptions=True,
    )
    return task.remote(ctx, shard, res.cpus)


def run_on_ray(ctx: ShardContext, todo: list[Shard], report: Callable[[Shard], None]) -> None:
    """Every shard of ``todo`` as a Ray task; ``report`` gets each done-marker payload as
    its shard finishes."""
    import ray

    res = worker_resources(ctx.cfg, connect_ray(ctx.cfg.ray_address))
    log.info(
        "predict on Ray: up to %d worker(s), %s GPU and %s CPU each", res.n, res.gpus, res.cpus
    )
    pending = [_remote(ctx, shard, res) for shard in todo]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        report(ray.get(done[0]))


def predict_shard(ctx: ShardContext, shard: Shard) -> Shard:
    """Run one planned shard unless it is done; returns its done-marker payload. On Ray it is
    one task (:func:`run_on_ray`'s); ``executor="inline"`` runs it here."""
    cfg = ctx.cfg
    done = ctx.out.read_marker(shard_marker(shard["shard"]))
    if done is not None:
        return done
    if cfg.executor == "inline":
        return _shard_task(ctx, shard, cpu_count())
    import ray

    res = worker_resources(cfg, connect_ray(cfg.ray_address))
    return ray.get(_remote(ctx, shard, res))
