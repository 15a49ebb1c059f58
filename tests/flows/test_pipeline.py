"""End to end on a moto S3 server, a real local Prefect API and local Ray: the first run
completes, the second is all cache hits and writes nothing, one changed input reruns only
what depends on it, the dashboard artifacts exist, and a storage outage is ridden out."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from types import SimpleNamespace

import boto3
import numpy as np
import pytest
from PIL import Image

from segflow.flows.pipeline import pipeline_flow
from segflow.flows.segment import segment_flow
from segflow.storage import StorageOptions, Store
from tests.conftest import make_bucket
from tests.flows.conftest import tiny_config, write_sources
from tests.flows.helpers import (
    FlakyProxy,
    kinds,
    latest_artifact,
    new_states,
    run_logs,
    task_runs,
)
from tests.makers import coded_pair, jpeg_bytes

pytestmark = pytest.mark.s3


def _objects(endpoint: str, bucket: str, prefix: str) -> dict[str, tuple[str, str]]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], o["LastModified"].isoformat())
    return out


@pytest.fixture(scope="module")
def run(s3_endpoint, prefect_api):
    import ray

    bucket = make_bucket(s3_endpoint)
    base = f"s3://{bucket}/p"
    storage = StorageOptions(endpoint_url=s3_endpoint)
    raw, new = write_sources(lambda n: Store(f"{base}/{n}", storage))
    params = {
        "dataset_source": raw,
        "layout": "isic",
        "models_url": f"{base}/models",
        "source": new,
        "out_url": f"{base}/out",
        "config": tiny_config({"endpoint_url": s3_endpoint}, truth=new),
    }
    before = task_runs()
    result = pipeline_flow(**params)  # folds on a local Ray, started by the fold tasks
    ns = SimpleNamespace(
        params=params,
        result=result,
        first=new_states(before),
        bucket=bucket,
        endpoint=s3_endpoint,
        storage=storage,
        base=base,
    )
    yield ns
    ray.shutdown()


def test_first_run_completes_with_named_tasks_and_a_version(run):
    states = run.first
    assert kinds(states, "train-fold") == {"train-fold-0": "Completed", "train-fold-1": "Completed"}
    shards = kinds(states, "predict-shard")
    assert sorted(shards) == ["predict-shard-0000", "predict-shard-0001", "predict-shard-0002"]
    assert set(states.values()) == {"Completed"}
    vid = run.result["train"]["version"]
    models = Store(run.params["models_url"], run.storage)
    record = models.read_json(f"versions/{vid}.json")
    assert models.read_json("versions/latest.json") == record
    assert record["dataset"]["n_images"] == 12 and len(record["dataset"]["hash"]) == 64
    assert record["folds"] == [0, 1] and 0 < record["choice"]["threshold"] < 1
    assert record["config"]["epochs"] == 1 and "key" not in json.dumps(record["config"]["storage"])
    seg = run.result["segment"]
    assert seg["version"] == vid
    assert seg["predictions"]["n_images"] == 5 and seg["crops"]["n_images"] == 5
    assert seg["evaluation"]["n"] == 5 and 0 <= seg["evaluation"]["mean_dice"] <= 1


def test_second_run_is_all_cached_and_writes_nothing(run):
    before_objects = _objects(run.endpoint, run.bucket, "p/")
    before = task_runs()
    t0 = time.perf_counter()
    again = pipeline_flow(**run.params)
    seconds = time.perf_counter() - t0
    states = new_states(before)
    assert set(states.values()) == {"Cached"}, states
    assert sorted(states) == sorted(run.first)  # the same tasks, every one a cache hit
    assert _objects(run.endpoint, run.bucket, "p/") == before_objects
    assert again["train"]["version"] == run.result["train"]["version"]
    assert seconds < 60, f"an all-cached run took {seconds:.1f} s"


def test_one_changed_input_reruns_only_its_shard(run):
    new = Store(run.params["source"], run.storage)
    img, _ = coded_pair(7, h=40, w=48)
    new.write_bytes("ISIC_0000103.jpg", jpeg_bytes(img))  # shard 1 holds 102 and 103
    masks_before = _objects(run.endpoint, run.bucket, "p/out/masks/")
    before = task_runs()
    config = {**run.params["config"], "version": run.result["train"]["version"]}
    res = segment_flow(
        run.params["source"], run.params["models_url"], run.params["out_url"], config, "isic"
    )
    states = new_states(before)
    assert kinds(states, "predict-shard") == {
        "predict-shard-0000": "Cached",
        "predict-shard-0001": "Completed",
        "predict-shard-0002": "Cached",
    }
    assert states["resolve-model-version"] == "Cached"
    assert states["plan-shards"] == "Completed"  # the listing changed
    after = _objects(run.endpoint, run.bucket, "p/out/masks/")
    pngs = [k for k in after if k.endswith(".png")]
    rewritten = sorted(k.rsplit("/", 1)[-1][:12] for k in pngs if after[k] != masks_before[k])
    content = sorted(k.rsplit("/", 1)[-1][:12] for k in pngs if after[k][0] != masks_before[k][0])
    assert rewritten == ["ISIC_0000102", "ISIC_0000103"]  # shard 1 only, the unit of work
    assert content == ["ISIC_0000103"]
    assert res["crops"]["n_skipped"] == 4  # the crops stage redid one image too


def test_dashboard_artifacts(run):
    table = json.loads(latest_artifact("fold-metrics").data)
    assert [r["fold"] for r in table] == [0, 1, "all"]
    assert all(0 <= r["oof_dice"] <= 1 for r in table) and table[-1]["oof_n"] == 12
    report = latest_artifact("training-report").data
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", report)
    assert len(pngs) == 3  # two folds' curves and the overlay grid
    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(pngs[-1]))))
    assert grid.shape == (256, 512, 3)  # 8 OOF tiles of 128 px, 4 per row
    version = latest_artifact("model-version").data
    assert f"versions/{run.result['train']['version']}.json" in version
    assert float(latest_artifact("predict-progress").data) == 100.0
    summary = json.loads(latest_artifact("segment-summary").data)[0]
    assert summary["images"] == 5 and summary["errors"] == 0
    described = latest_artifact("train-run").data
    assert run.result["train"]["dataset"]["hash"] in described and "secret" not in described


def test_stage_logs_reach_the_run_log_view(run):
    logs = run_logs()
    ours = {(log.name, log.message.split(":")[0]) for log in logs if log.name.startswith("segflow")}
    assert {("segflow.ingest", "ingest"), ("segflow.crops", "crops")} <= ours
    epochs = {log.message.split(":")[0] for log in logs if log.name == "segflow.train"}
    assert {"fold 0 epoch 1/1", "fold 1 epoch 1/1"} <= epochs  # relayed from the Ray workers
    assert all(log.flow_run_id for log in logs if log.name.startswith("segflow"))


def test_a_storage_outage_mid_run_is_ridden_out(run):
    host, port = run.endpoint.removeprefix("http://").split(":")
    proxy = FlakyProxy((host, int(port)))
    via_proxy = {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}
    config = {
        **run.params["config"],
        "storage": via_proxy,
        "version": run.result["train"]["version"],
        "predict": {**run.params["config"]["predict"], "shard_size": 1},
    }
    out = f"{run.base}/out-outage"
    direct = Store(out, run.storage)

    def cut_when_planned() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not direct.exists("_shards/manifest.json"):
            time.sleep(0.05)
        proxy.outage(5.0)

    cutter = threading.Thread(target=cut_when_planned, daemon=True)
    cutter.start()
    res = segment_flow(run.params["source"], run.params["models_url"], out, config, "isic")
    cutter.join(timeout=30)
    proxy.close()
    assert proxy.outages == 1
    assert res["predictions"]["n_images"] == 5 and res["predictions"]["n_errors"] == 0
    # nothing lost or duplicated: the same masks as the run without an outage, once each
    clean = Store(run.params["out_url"], run.storage)
    names = sorted(f.rel for f in direct.list("masks", pattern="*.png"))
    assert names == sorted(f.rel for f in clean.list("masks", pattern="*.png"))
    assert len(names) == 5
    for rel in names:
        assert direct.read_bytes(rel) == clean.read_bytes(rel), rel
    rows = direct.read_bytes("crops/crops.csv").decode().strip().splitlines()[1:]
    assert len(rows) == 5 and len({r.split(",")[0] for r in rows}) == 5
