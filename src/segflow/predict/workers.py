"""Predictor actors on Ray: each loads the fold ensemble once and takes shards from a queue."""

from __future__ import annotations

import functools
import logging
from typing import Any

from segflow.cluster import connect_ray, cpu_count, gpus_per_task
from segflow.predict.config import PredictConfig
from segflow.storage import Store

log = logging.getLogger("segflow.predict")


class Predictor:
    """One per GPU (or one per CPU machine): holds the ensemble for its whole life."""

    def __init__(self, cfg: PredictConfig, cpus: int) -> None:
        import torch

        from segflow.predict.ensemble import load_ensemble

        torch.set_num_threads(max(1, cpus))
        self.ensemble = load_ensemble(Store(cfg.models, cfg.storage), cfg.fold_list())

    def folds(self) -> list[int]:
        return self.ensemble.folds

    def run(self, ctx, shard: dict[str, Any]) -> dict[str, Any]:
        from segflow.predict.run import run_shard

        return run_shard(ctx, self.ensemble, shard)


def run_on_ray(cfg: PredictConfig, ctx, todo: list[dict], report) -> list[int]:
    import ray
    from ray.util import ActorPool

    resources = connect_ray(cfg.ray_address)
    gpus = gpus_per_task(cfg.gpus_per_worker, resources)
    n = cfg.workers or (max(1, int(resources.get("GPU", 0) // max(gpus, 1e-9))) if gpus else 1)
    cpus = max(1, int(resources.get("CPU", 1)) // n)
    actor = ray.remote(Predictor).options(num_gpus=gpus, num_cpus=cpus, max_restarts=1)
    actors = [actor.remote(cfg, cpus) for _ in range(n)]
    folds = ray.get(actors[0].folds.remote())
    log.info("predict on Ray: %d worker(s), %s GPU and %s CPU each", n, gpus, cpus)
    pool = ActorPool(actors)
    for payload in pool.map_unordered(lambda a, s: a.run.remote(ctx, s), todo):
        report(payload)
    for a in actors:
        ray.kill(a)
    return folds


# -- one shard per call (the Prefect flow's predict-shard-<k> tasks) ---------------------------
@functools.lru_cache(maxsize=2)
def _cached_ensemble(models: str, storage, folds: tuple[int, ...] | None):
    """Loaded once per process: Ray reuses its worker processes, so consecutive shards on a
    worker skip the load."""
    from segflow.predict.ensemble import load_ensemble

    return load_ensemble(Store(models, storage), list(folds) if folds is not None else None)


def _shard_task(ctx, shard: dict[str, Any], cpus: int) -> dict[str, Any]:
    import torch

    from segflow.predict.run import run_shard

    torch.set_num_threads(max(1, cpus))
    cfg = ctx.cfg
    folds = tuple(cfg.fold_list()) if cfg.fold_list() is not None else None
    return run_shard(ctx, _cached_ensemble(cfg.models, cfg.storage, folds), shard)


def predict_shard(ctx, shard: dict[str, Any]) -> dict[str, Any]:
    """Run one planned shard unless it is done; returns its done-marker payload. On Ray it is
    one task asking for ``gpus_per_worker`` GPUs; ``executor="inline"`` runs it here."""
    from segflow.predict.run import shard_marker

    cfg = ctx.cfg
    done = Store(cfg.out, cfg.storage).read_marker(shard_marker(shard["shard"]))
    if done is not None:
        return done
    if cfg.executor == "inline":
        return _shard_task(ctx, shard, cpu_count())
    import ray

    resources = connect_ray(cfg.ray_address)
    gpus = gpus_per_task(cfg.gpus_per_worker, resources)
    n = cfg.workers or (max(1, int(resources.get("GPU", 0) // max(gpus, 1e-9))) if gpus else 1)
    cpus = max(1, int(resources.get("CPU", 1)) // n)
    # max_calls=0: keep the worker process (and its loaded ensemble) for the next shard; Ray
    # recycles GPU workers after every call by default
    task = ray.remote(max_calls=0)(_shard_task).options(
        name=f"predict-shard-{shard['shard']:04d}", num_gpus=gpus, num_cpus=cpus,
        max_retries=1, retry_exceptions=True,
    )  # fmt: skip
    return ray.get(task.remote(ctx, shard, cpus))
