"""train_flow's gate on a moto S3 server and a real local Prefect API: the first version is
promoted, a retrain on masks shuffled between images is refused and its run still ends
Completed with "not promoted" in its state message, the `promotion` artifact says why, and a
benchmark that shares images with the training data stops the run before any fold trains."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from segflow.flows.train import train_flow
from segflow.storage import StorageOptions, Store
from segflow.versions import PRODUCTION, read_aliases, read_history
from tests.conftest import make_bucket
from tests.flows.conftest import tiny_config
from tests.flows.helpers import kinds, latest_artifact, new_states, task_runs
from tests.lifecycle.helpers import write_lesions

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def runs(s3_endpoint, prefect_api):
    import ray

    base = f"s3://{make_bucket(s3_endpoint)}/gate"
    storage = StorageOptions(endpoint_url=s3_endpoint)
    write_lesions(Store(f"{base}/raw-good", storage), list(range(24)))
    write_lesions(Store(f"{base}/raw-bad", storage), list(range(24)), shuffle=True)
    write_lesions(Store(f"{base}/bench", storage), list(range(200, 212)))
    models = f"{base}/models"
    config = tiny_config(
        {"endpoint_url": s3_endpoint},
        train={"epochs": 6, "fold_ids": [0], "size": [32, 32], "executor": "inline"},
        predict={"tta": "none"},
        gate={"benchmark": f"{base}/bench", "bootstrap": 200},
    )
    first = train_flow(f"{base}/raw-good", "isic", models, config, return_state=True)
    before = task_runs()
    bad_config = {
        **config,
        "dataset": f"{models}/dataset-bad.zarr",
        # at the full rate (not the warm-start default of a tenth), so that 6 epochs of
        # shuffled masks make a challenger that is worse on the benchmark
        "train": {**config["train"], "init_from": "production", "init_lr_scale": 1.0},
    }
    second = train_flow(f"{base}/raw-bad", "isic", models, bad_config, return_state=True)
    ns = SimpleNamespace(
        base=base,
        storage=storage,
        models=models,
        config=config,
        first=first,
        second=second,
        second_tasks=new_states(before),
    )
    yield ns
    ray.shutdown()


def test_first_version_is_promoted(runs):
    assert runs.first.is_completed()
    result = runs.first.result()
    assert result["promotion"]["decision"] == "promoted", result["promotion"]["reason"]
    assert "first version" in result["promotion"]["reason"]
    assert runs.first.message.startswith("promoted")
    assert read_aliases(runs.models, runs.storage)[PRODUCTION] == result["version"]


def test_worse_retrain_is_not_promoted_and_still_completes(runs):
    first, second = runs.first.result(), runs.second
    assert second.is_completed() and second.type.value == "COMPLETED"
    assert second.message.startswith("not promoted: challenger thresholded Jaccard")
    promo = second.result()["promotion"]
    assert promo["decision"] == "not promoted" and promo["champion"] == first["version"]
    assert promo["production"] == first["version"] != second.result()["version"]
    assert kinds(runs.second_tasks, "evaluate-gate") == {"evaluate-gate": "Completed"}
    st = runs.storage
    assert read_aliases(runs.models, st)[PRODUCTION] == first["version"]
    assert [e.version for e in read_history(runs.models, st)] == [first["version"]]
    gate = Store(runs.models, st).read_json(f"versions/{second.result()['version']}.json")["gate"]
    assert gate["paired"]["mean_difference"] < 0 and len(gate["per_image"]) == 12
    art = latest_artifact("promotion")
    assert "Not promoted" in art.data and "data:image/png;base64" in art.data
    assert latest_artifact("promotion-scores").type == "table"


def test_benchmark_overlapping_training_is_refused_before_training(runs):
    from segflow.gate import BenchmarkError

    before = task_runs()
    leaky = {**runs.config, "gate": {"benchmark": f"{runs.base}/raw-good"}}
    with pytest.raises(BenchmarkError, match="shares 24 image"):
        train_flow(f"{runs.base}/raw-good", "isic", runs.models, leaky)
    assert not kinds(new_states(before), "train-fold")


def test_pipeline_skips_segment_when_the_first_version_is_refused(s3_endpoint, prefect_api):
    """gate.min_score 1.0 refuses any first version: no production exists, so pipeline_flow
    trains and gates, then skips segmentation (result ``segment: None`` and why) instead of
    segmenting with the refused version; no segment task runs and nothing is written to out."""
    from segflow.flows.pipeline import pipeline_flow

    base = f"s3://{make_bucket(s3_endpoint)}/skip"
    storage = StorageOptions(endpoint_url=s3_endpoint)
    write_lesions(Store(f"{base}/raw", storage), list(range(8)))
    write_lesions(Store(f"{base}/bench", storage), list(range(300, 304)))
    write_lesions(Store(f"{base}/new", storage), list(range(400, 402)))
    config = tiny_config(
        {"endpoint_url": s3_endpoint},
        train={"epochs": 1, "fold_ids": [0], "size": [32, 32], "executor": "inline"},
        predict={"tta": "none"},
        gate={"benchmark": f"{base}/bench", "bootstrap": 100, "min_score": 1.0},
    )
    before = task_runs()
    result = pipeline_flow(
        f"{base}/raw", "isic", f"{base}/models", f"{base}/new", f"{base}/out", config
    )
    promotion = result["train"]["promotion"]
    assert promotion["decision"] == "not promoted" and promotion["production"] is None
    assert "gate.min_score 1.0000" in promotion["reason"]
    assert result["segment"] is None
    assert "no production model" in result["skipped"]
    assert result["train"]["version"] in result["skipped"]
    states = new_states(before)
    assert kinds(states, "evaluate-gate") == {"evaluate-gate": "Completed"}
    segment_tasks = ("resolve-model-version", "plan-shards", "predict-shard")
    assert not [n for n in states if n.startswith(segment_tasks)], states
    assert not Store(f"{base}/out", storage).exists()
    assert read_aliases(f"{base}/models", storage).get(PRODUCTION) is None
