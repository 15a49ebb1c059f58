"""Predictor actors on Ray: each loads the fold ensemble once and takes shards from a queue."""

from __future__ import annotations

import logging
from typing import Any

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

    from segflow.cluster import connect_ray, gpus_per_task

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
