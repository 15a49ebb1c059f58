"""A flow killed mid-training (SIGKILL, a subprocess) and run again: the finished fold is not
retrained, the unfinished one continues from its last completed epoch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml

from segflow.flows.train import train_flow
from tests.flows.conftest import TINY_TRAIN
from tests.makers import write_isic

EPOCHS = 5


def _wait_for_one_done_one_started(runs: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 400
    while time.time() < deadline:
        done = list(runs.glob("*/fold-*/fold.complete.json"))
        started = [
            p
            for p in runs.glob("*/fold-*/last.pt")
            if not (p.parent / "fold.complete.json").exists()
        ]
        if done and started:
            return
        if proc.poll() is not None:
            tail = log.read_text()[-3000:]
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill:\n{tail}")
        time.sleep(0.05)
    raise AssertionError("no fold finished within the time limit")


def _kill_tree(pid: int) -> None:
    """SIGKILL the run and every process it started at once, as when its machine dies. Killing
    only the process group would leave local Ray's workers (their own sessions) training on."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def test_killed_flow_rerun_keeps_finished_folds_and_resumes_the_other(local, prefect_api):
    import ray

    raw = local.store("raw")
    write_isic(raw, range(16), h=32, w=32)
    models = Path(local.url("models"))
    # cpus_per_fold = all of Ray's 2 CPUs: the folds run one after the other, so one is done
    # while the other is mid-way when the kill lands
    train = {**TINY_TRAIN, "epochs": EPOCHS, "cpus_per_fold": 2}
    params = {
        "dataset_source": raw.url,
        "layout": "isic",
        "models_url": str(models),
        "config": {"ingest": {"size": [32, 32]}, "train": train},
    }
    spec = Path(local.url("run.yaml"))
    spec.write_text(yaml.safe_dump({"flow": "train", **params}))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    log = Path(local.url("run.log"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "segflow.cli", "run", "--config", str(spec)],
            env=env,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_one_done_one_started(models / "runs", proc, log)
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    (done_marker,) = list((models / "runs").glob("*/fold-*/fold.complete.json"))
    done_dir = done_marker.parent
    (other,) = [p for p in done_dir.parent.glob("fold-*") if p != done_dir]
    before = {f: (done_dir / f).read_bytes() for f in ("metrics.csv", "best.pt", "last.pt")}
    # the epochs whose full state was saved (metrics.csv may hold one more row: the kill can
    # land between an epoch's metrics row and its last.pt; resume redoes that epoch)
    epochs_before = torch.load(other / "last.pt", map_location="cpu", weights_only=True)["epoch"]
    assert 1 <= epochs_before < EPOCHS

    try:
        result = train_flow(**params)
    finally:
        ray.shutdown()
    assert result["version"] == done_dir.parent.name
    assert {f: (done_dir / f).read_bytes() for f in before} == before  # not retrained
    marker = json.loads((other / "fold.complete.json").read_text())
    assert marker["start_epoch"] == epochs_before  # continued after its last finished epoch
    assert marker["epochs_run"] == EPOCHS - epochs_before
    rows = (other / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, EPOCHS + 1))
