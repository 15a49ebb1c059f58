"""segflow.cluster: with no address configured, a process gets a private local Ray, never a
``ray start`` cluster that happens to run on the same machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from segflow.cluster import dask_address

PROBE = """
import json, ray
from segflow.cluster import connect_ray
resources = connect_ray(None)
print(json.dumps({"resources": resources, "gcs": ray.get_runtime_context().gcs_address}))
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unset_address_starts_a_private_ray_not_the_machines_ray_start_cluster(
    tmp_path: Path,
) -> None:
    # Short base folder: Ray's Unix sockets live under it (108-byte path limit). RAY_TMPDIR
    # makes this cluster "the last `ray start` on the machine" for the probe, in a folder of
    # its own, so no other process here can see it.
    base = Path(f"/tmp/ray-h5-t{os.getpid()}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(base), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]  # `ray`, with this interpreter
    start = ["start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1"]
    start += [f"--temp-dir={base}/ray", "--num-cpus=1", "--include-dashboard=false"]
    start += ['--resources={"ray_start_cluster": 1}']
    head = subprocess.Popen(
        [*ray_cli, *start],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "head.log").open("wb"),
    )
    try:
        address_file = base / "ray" / "ray_current_cluster"
        deadline = time.time() + 180
        while not address_file.is_file() and head.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert address_file.is_file(), (tmp_path / "head.log").read_text()[-3000:]
        started = address_file.read_text().strip()
        probe = subprocess.run(
            [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        got = json.loads(probe.stdout.strip().splitlines()[-1])
        assert "ray_start_cluster" not in got["resources"], "joined the `ray start` cluster"
        assert got["gcs"] != started
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_dask_address_comes_from_config_then_environment(monkeypatch) -> None:
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert dask_address(None) is None
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    assert dask_address(None) == "tcp://127.0.0.1:8786"
    assert dask_address("tcp://h:1") == "tcp://h:1"
