"""A deployment served to a real local Prefect server: trigger a run through the API and check
it completed with its artifacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment

from segflow.flows.train import train_flow
from tests.flows.conftest import tiny_config, write_sources

# The guard matters: Prefect's runner starts each flow run in a `spawn` child that re-imports
# __main__, and an unguarded serve() there starts a second runner instead of the run.
SERVE = """
import json, sys
from segflow.flows.segment import segment_flow
if __name__ == "__main__":
    segment_flow.serve(name="bulk-segment-test", parameters=json.loads(sys.argv[1]))
"""


def _wait_for_deployment(name: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"flow.serve exited early (rc {proc.returncode})")
            try:
                client.read_deployment_by_name(name)
                return
            except Exception:
                time.sleep(0.5)
    raise AssertionError(f"deployment {name} never appeared")


def test_served_deployment_runs_with_its_artifacts(local, prefect_api, tmp_path):
    raw, new = write_sources(local.store, n_train=8, n_new=3)
    config = tiny_config(train={"executor": "inline"})
    models = local.url("models")
    trained = train_flow(raw, "isic", models, config)
    params = {
        "source": new,
        "models_url": models,
        "out_url": local.url("out"),
        "config": config,
        "layout": "isic",  # predict, crops (and evaluate) name their files the ISIC way
    }
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(params)],
            env=env,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_deployment("segment/bulk-segment-test", proc)
        run = run_deployment("segment/bulk-segment-test", timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert run.state is not None and run.state.is_completed(), (run.state, log.read_text()[-4000:])
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    keys = {a.key for a in arts}
    assert {"segment-run", "predict-progress", "masks", "crops", "segment-summary"} <= keys
    summary = json.loads(next(a for a in arts if a.key == "segment-summary").data)[0]
    assert summary["images"] == 3 and summary["errors"] == 0
    assert sorted(p.name for p in Path(local.url("out"), "masks").glob("*.png")) == [
        f"ISIC_{k:07d}_segmentation.png" for k in (100, 101, 102)
    ]
    assert trained["version"] in next(a for a in arts if a.key == "segment-run").data
