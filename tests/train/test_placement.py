"""Fold placement on Ray: with ``gpus_per_fold: 1``, K folds on N GPUs run min(K, N) at a time,
never two on one GPU slot, and each fold records the node and slot it ran on. The GPUs are
declared to a local Ray (no device needed): the folds train on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segflow.errors import ConfigError
from segflow.train import train
from segflow.train.run import fold_cpus, run_fold
from segflow.train.state import fold_record
from tests.train.conftest import small_config


@pytest.mark.parametrize("gpus", [1, 2])
def test_folds_take_one_gpu_slot_each_and_record_it(tiny_dataset, local, gpus):
    import ray

    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, configure_logging=False)
    try:
        node = ray.get_runtime_context().get_node_id()
        cfg = small_config(
            tiny_dataset, local.url("models"), executor="ray", epochs=1, gpus_per_fold=1
        )
        assert fold_cpus(cfg, 1.0, ray.cluster_resources(), 2) == 2 // gpus  # a node's share
        res = train(cfg)
    finally:
        ray.shutdown()
    assert [f.status for f in res.folds] == ["done", "done"], [f.error for f in res.folds]
    a, b = res.folds
    overlapped = max(a.started_at, b.started_at) < min(a.finished_at, b.finished_at)
    assert overlapped == (gpus == 2)  # min(K, N) folds at once
    slots = [f.extra["placement"]["gpus"] for f in res.folds]
    assert sorted(slots) == ([["0"], ["1"]] if gpus == 2 else [["0"], ["0"]])
    for f in res.folds:
        placement = f.extra["placement"]
        assert placement["node"] == node and placement["status"] == "done"
        saved = json.loads(Path(local.url(f"models/fold-{f.fold}/placement.json")).read_text())
        assert saved["attempts"] == [placement]  # one attempt, as the fold reported it


def test_a_fold_of_another_config_is_refused_once_on_ray_and_left_untouched(
    tiny_dataset, local, local_ray
):
    from ray.exceptions import RayTaskError

    models = local.store("models")
    cfg = small_config(tiny_dataset, models.url, executor="ray", max_retries=2)
    fold = models.child("fold-0")
    fold.write_json("train_config.json", fold_record(cfg.model_copy(update={"lr": 1e-2})))
    with pytest.raises(ConfigError, match=r"lr: 0.01 -> 0.003") as refused:
        run_fold(cfg, 0)  # a Prefect stage's call: no prepare_run check in this driver
    # the task returned the refusal: nothing raised in it, so nothing for Ray to retry
    assert not isinstance(refused.value, RayTaskError)
    assert [f.rel for f in fold.list()] == ["train_config.json"]  # no placement.json
