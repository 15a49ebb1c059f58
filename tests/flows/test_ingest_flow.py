"""The ingest flow on a real local Prefect API (prefect_test_harness starts a server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect.client.orchestration import get_client

from segflow.flows.ingest import ingest_flow
from segflow.ingest import Dataset
from tests.flows.helpers import task_runs
from tests.makers import write_isic

ROOT = Path(__file__).resolve().parents[2]


def test_ingest_flow_runs_on_a_local_prefect_api(local, prefect_api):
    src = local.store("raw")
    write_isic(src, range(3))
    config = {"layout": "isic", "source": src.url, "dataset": local.url("ds"), "size": [32, 32]}
    first = ingest_flow(config)
    second = ingest_flow(config)
    assert (first["status"], first["n_images"]) == ("ingested", 3)
    assert second == first  # a cache hit: the same manifest, no work
    assert Dataset.open(local.url("ds")).n == 3


def test_bad_input_fails_without_retries_and_flow_run_retry_completes_it(local, prefect_api):
    src = local.store("raw")
    config = {"layout": "isic", "source": src.url, "dataset": local.url("ds"), "size": [32, 32]}
    before = task_runs()
    state = ingest_flow(config, return_state=True)
    assert state.is_failed()
    (run,) = [r for i, r in task_runs().items() if i not in before]
    assert run.run_count == 1  # a ConfigError is not worth the I/O retries
    assert "holds no files" in run.state.message

    write_isic(src, range(2))  # the user fixes the source, then retries the same flow run
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    run_id = state.state_details.flow_run_id
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "flow-run",
        "retry",
        str(run_id),
        "--entrypoint",
        "segflow.flows.ingest.ingest_flow",
    ]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with get_client(sync_client=True) as client:
        retried = client.read_flow_run(run_id)
    assert retried.state.is_completed()
    assert Dataset.open(local.url("ds")).n == 2
