"""``make cluster-demo``: the production path on one machine, every part a separate process.

S3 (a moto server), a Prefect server, a Ray head (no GPU) and two Ray nodes that declare one
GPU each, a Dask scheduler with two workers and a Prefect process worker. The deployments of
deployments/prefect.yaml are registered with ``prefect deploy`` and triggered with ``prefect
deployment run``, the way docs/cluster.md describes the cluster; then two faults:

1. a GPU node's raylet is SIGKILLed while its fold is past epoch 2; the node is started again,
   Ray retries the fold and it resumes from its last epoch saved in the object store;
2. the Prefect worker and its flow-run process are killed mid-run; the worker is started again,
   the deployment triggered again: finished folds come from the cache, nothing trains twice;

and a last retrain run with unchanged data must be all cache hits. Every process is stopped by
its PID on success and on failure (SIGINT/SIGTERM included), leftovers fail the run. The last line
of output is one JSON object (runs, fold_nodes, head_node, dask_workers, resumed_epoch,
leftover_processes, seconds, ...).

Run from the repository root with the project's environment: ``.venv/bin/python
scripts/cluster_demo.py`` (``make cluster-demo``). No GPU is needed: Ray schedules by the
declared resource and each fold says in its log that it falls back to the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
WORKER = [PY, "-m", "prefect", "worker", "start"]
T0 = time.monotonic()
BUCKET = "segflow"  # the production bucket name: the deployments' URLs are used unchanged
#: training small enough for 2 shared cores; every other option is the production one
TINY_TRAIN = {
    "folds": 2,
    "epochs": 5,
    "encoder": "resnet18",
    "encoder_depth": 3,
    "decoder_channels": [32, 16, 8],
    "batch_size": 4,
    "lr": 0.003,
    "early_stopping": None,
    "max_retries": 2,
}
TINY_SIZE = [48, 48]


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class DemoError(RuntimeError):
    """A check of the demo failed; the message says which and what was seen."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    if not url.startswith("http://127.0.0.1:"):
        raise DemoError(f"not a local service: {url}")
    with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 (checked just above)
        return r.status < 500


def wait_for(what: str, ok: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if got := ok():
                return got
        time.sleep(every)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- processes ------------------------------------------------------------------------------------
@dataclass
class Procs:
    """Every process the demo starts: each in its own session (so its children can be found
    and stopped with it), its output in logs/<name>.log."""

    logs: Path
    env: dict[str, str]
    started: dict[str, subprocess.Popen] = field(default_factory=dict)
    sessions: set[int] = field(default_factory=set)
    offsets: dict[str, int] = field(default_factory=dict)  # log size when each was started

    def start(self, name: str, cmd: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        self.offsets[name] = log.tell()
        p = subprocess.Popen(
            cmd,
            cwd=cwd or ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started[name] = p
        self.sessions.add(p.pid)
        return p

    def wait_line(self, name: str, text: str, timeout: float) -> bool:
        """Wait until ``name``'s latest start logs ``text``; False if it exits first."""
        p, log = self.started[name], self.logs / f"{name}.log"
        start = self.offsets[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with log.open("rb") as f:
                f.seek(start)
                if text.encode() in f.read():
                    return True
            if p.poll() is not None:
                return False
            time.sleep(0.5)
        return False

    def run(self, cmd: list[str], timeout: float = 300, cwd: Path | None = None) -> str:
        done = subprocess.run(
            cmd, cwd=cwd or ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode:
            raise DemoError(
                f"{' '.join(cmd[:5])}... failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done.stdout

    def members(self, name: str) -> list[psutil.Process]:
        """The processes of ``name``'s session (itself and everything it started)."""
        return self.members_of(self.started[name].pid)

    @staticmethod
    def members_of(sid: int) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(p.pid) == sid:
                    found.append(p)
        return found

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 20) -> None:
        p = self.started.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        # the rest of its session: Ray's workers, for one, run in process groups of their own
        for q in self.members_of(p.pid):
            with contextlib.suppress(psutil.Error):
                q.kill()

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            with contextlib.suppress(Exception):
                self.stop(name)

    def leftovers(self, tmp: Path) -> list[str]:
        """Processes of any session the demo started, or working under its temporary folder."""
        me = os.getpid()
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if p.pid == me:
                    continue
                text = " ".join(p.info["cmdline"] or []) + " " + (p.info["cwd"] or "")
                if os.getsid(p.pid) in self.sessions or str(tmp) in text:
                    found.append(f"{p.pid} {text[:120]}")
        return found


# -- the services ---------------------------------------------------------------------------------
@dataclass
class Cluster:
    procs: Procs
    tmp: Path
    ports: dict[str, int]
    ray_cli: list[str] = field(default_factory=lambda: [PY, "-m", "ray.scripts.scripts"])

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.ports['ray']}"

    def start_s3(self) -> None:
        self.procs.start(
            "s3", [PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.ports["s3"])]
        )

    def start_prefect_server(self) -> None:
        self.procs.start(
            "prefect-server",
            [
                PY,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports["prefect"]),
            ],
        )

    def start_ray_head(self) -> None:
        # No CPU and no GPU on the head: it runs the GCS and the Ray client server, every task
        # goes to the GPU nodes (as the compose head: --num-gpus=0)
        self.procs.start(
            "ray-head",
            [
                *self.ray_cli,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={self.ports['ray']}",
                f"--ray-client-server-port={self.ports['ray_client']}",
                f"--temp-dir={self.tmp / 'ray'}",
                "--num-cpus=0",
                "--num-gpus=0",
                "--include-dashboard=false",
                "--disable-usage-stats",
                "--object-store-memory=100000000",
            ],
        )

    def start_gpu_node(self, name: str, tries: int = 3) -> str:
        """Start a node that declares one GPU; returns its node id once it has joined. Ray gives
        a joining raylet 30 s to register, which a loaded machine can miss: then it tries again."""
        for attempt in range(1, tries + 1):
            self.procs.start(
                name,
                [
                    *self.ray_cli,
                    "start",
                    f"--address={self.gcs}",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    "--num-cpus=1",
                    "--num-gpus=1",
                    "--disable-usage-stats",
                    "--object-store-memory=100000000",
                ],
            )
            if self.procs.wait_line(name, "Ray runtime started", 240):
                return wait_for(f"{name}'s raylet", lambda: self.node_id(name), 60)
            say(f"{name} did not join (try {attempt}/{tries}); starting it again")
            self.procs.stop(name)
        raise DemoError(f"{name} never joined the Ray cluster; see {self.procs.logs}/{name}.log")

    def raylet(self, name: str) -> psutil.Process | None:
        for p in self.procs.members(name):
            with contextlib.suppress(psutil.Error):
                if p.name() == "raylet":
                    return p
        return None

    def node_id(self, name: str) -> str | None:
        p = self.raylet(name)
        if p is None:
            return None
        (nid,) = [a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--node_id=")]
        return nid

    def start_dask(self) -> None:
        addr = f"tcp://127.0.0.1:{self.ports['dask']}"
        self.procs.start(
            "dask-scheduler",
            [
                PY,
                "-m",
                "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports["dask"]),
                "--no-dashboard",
            ],
        )
        for i in (1, 2):
            self.procs.start(
                f"dask-worker-{i}",
                [
                    PY,
                    "-m",
                    "dask",
                    "worker",
                    addr,
                    "--host",
                    "127.0.0.1",
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--name",
                    f"dask-worker-{i}",
                    "--local-directory",
                    str(self.tmp / f"dask-{i}"),
                ],
            )

    def start_worker(self, work: Path) -> None:
        # The flow-run subprocesses inherit this environment (RAY_ADDRESS, DASK_SCHEDULER_ADDRESS,
        # AWS_*, SEGFLOW_HOME): the compose prefect-worker's set-up. Its folder is no checkout.
        self.procs.start(
            "prefect-worker",
            [*WORKER, "--pool", "cluster", "--type", "process", "--name", "demo-worker"],
            cwd=work,
        )


# -- Prefect --------------------------------------------------------------------------------------
def trigger(procs: Procs, deployment: str, params: dict[str, Any], work: Path) -> str:
    out = procs.run(
        [PY, "-m", "prefect", "deployment", "run", deployment, "--params", json.dumps(params)],
        cwd=work,
    )
    (run_id,) = re.findall(r"UUID:\s*([0-9a-f-]{36})", out)
    return run_id


def flow_run(run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def wait_run(run_id: str, timeout: float, watch: Callable[[], None] | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = flow_run(run_id)
        if run.state and run.state.is_final():
            return run.state.name
        if watch:
            watch()
        time.sleep(1)
    raise DemoError(f"flow run {run_id} not finished after {timeout:.0f}s")


def crash(run_id: str, why: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Crashed(message=why), force=True)


def task_states(run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    return {r.name: r.state.name for r in runs if r.state}


def artifacts(run_id: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    return {a.key: a.data for a in arts if a.key}


# -- object store ---------------------------------------------------------------------------------
def s3():
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], use_listings_cache=False)


def fold_files(fs, name: str) -> dict[tuple[str, int], str]:
    """``{(run folder, fold): url}`` of every ``fold-k/<name>`` under the models URL."""
    found = {}
    for path in fs.glob(f"{BUCKET}/models/isic/runs/*/fold-*/{name}"):
        run, fold = path.split("/")[-3], int(path.split("/")[-2].split("-")[1])
        found[(run, fold)] = path
    return found


def epochs_done(fs, path: str) -> list[int]:
    return [int(r["epoch"]) for r in csv.DictReader(io.StringIO(fs.cat(path).decode()))]


def state_saved(fs, metrics: str) -> bool:
    """The fold's last.pt is newer than its metrics.csv: the latest epoch row has its state."""
    last = metrics.rsplit("/", 1)[0] + "/last.pt"
    return fs.exists(last) and fs.info(last)["LastModified"] >= fs.info(metrics)["LastModified"]


def attempts(fs, run: str, fold: int) -> list[dict[str, Any]]:
    path = f"{BUCKET}/models/isic/runs/{run}/fold-{fold}/placement.json"
    return json.loads(fs.cat(path))["attempts"] if fs.exists(path) else []


# -- the demo -------------------------------------------------------------------------------------
def production_params(name: str) -> dict[str, Any]:
    (d,) = [
        d
        for d in yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
        if d["name"] == name
    ]
    return copy.deepcopy(d["parameters"])


def tiny_retrain(**train: Any) -> dict[str, Any]:
    """The production retrain parameters with the training (and image size) made tiny."""
    params = production_params("retrain")
    params["config"]["ingest"]["size"] = TINY_SIZE
    params["config"]["train"].update({**TINY_TRAIN, **train})
    return params


def build_env(tmp: Path, ports: dict[str, int], token: Path) -> dict[str, str]:
    drop = ("PREFECT_", "RAY_", "DASK_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != "PYTHONPATH"}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # no weekly runs queued here
            "RAY_ADDRESS": f"ray://127.0.0.1:{ports['ray_client']}",
            "RAY_AUTH_MODE": "token",  # every Ray connection needs the cluster's token...
            "RAY_AUTH_TOKEN_PATH": str(token),  # ...from this file, not ~/.ray (no stray joiners)
            "RAY_USAGE_STATS_ENABLED": "0",
            "DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{ports['dask']}",
            "AWS_ACCESS_KEY_ID": "demo",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "SEGFLOW_HOME": str(tmp / "work"),
        }
    )
    return env


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP end the demo like Ctrl-C: through the ``finally`` that stops everything."""

    def bail(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, bail) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sfc-", dir="/tmp"))  # short: Ray's socket paths
    (tmp / "logs").mkdir()
    (tmp / "work").mkdir()
    token = tmp / "ray-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    ports = {k: free_port() for k in ("s3", "prefect", "ray", "ray_client", "dask")}
    env = build_env(tmp, ports, token)
    os.environ.update({k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"})
    procs = Procs(tmp / "logs", env)
    cluster = Cluster(procs, tmp, ports)
    summary: dict[str, Any] = {}
    ok = False
    say(f"demo folder {tmp} (logs in {tmp / 'logs'}), ports {ports}")
    try:
        with stop_on_signals():
            summary = demo(cluster, tmp)
        ok = True
    except (DemoError, KeyboardInterrupt) as e:
        say(f"FAILED: {e}")
        summary.setdefault("error", str(e))
    except Exception as e:  # anything else: still stop everything and end on the JSON line
        say(f"FAILED: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stdout)
        summary.setdefault("error", f"{type(e).__name__}: {e}")
    finally:
        say("stopping every process the demo started, by PID")
        procs.stop_all()
        left = wait_for_none(lambda: procs.leftovers(tmp), 30)
        if left:
            say(f"leftover processes: {left}")
            for line in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[0]), signal.SIGKILL)
            ok = False
        summary["leftover_processes"] = len(left)
        summary["seconds"] = round(time.monotonic() - T0, 1)
        summary["ok"] = ok
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _tail_logs(tmp / "logs")
        print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if ok else 1


def wait_for_none(get: Callable[[], list[str]], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    left = get()
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = get()
    return left


def _tail_logs(logs: Path) -> None:
    for log in sorted(logs.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-15:]
        print(f"---- {log.name} (last {len(lines)} lines)", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr)


def demo(cluster: Cluster, tmp: Path) -> dict[str, Any]:
    procs, work = cluster.procs, tmp / "work"
    say("starting S3 (moto), Prefect server, Ray head + 2 GPU nodes, Dask scheduler + 2 workers")
    cluster.start_s3()
    cluster.start_prefect_server()
    cluster.start_ray_head()
    cluster.start_dask()
    if not procs.wait_line("ray-head", "Ray runtime started", 240):
        raise DemoError("the Ray head did not start")
    s3_url = os.environ["AWS_ENDPOINT_URL"]
    wait_for("S3", lambda: http_ok(s3_url), 120)
    import boto3

    boto3.client("s3", endpoint_url=s3_url).create_bucket(Bucket=BUCKET)
    from segflow.demo_data import generate_demo_data

    generate_demo_data(f"s3://{BUCKET}/raw/isic", 24, size=(64, 64), seed=0)
    generate_demo_data(f"s3://{BUCKET}/incoming", 4, size=(64, 64), seed=1)
    say("demo archive in s3://segflow/raw/isic (24 images), held-back set in s3://segflow/incoming")
    api = os.environ["PREFECT_API_URL"]
    wait_for("the Prefect server", lambda: http_ok(f"{api}/health"), 300)
    head = cluster.node_id("ray-head")
    # one after the other: two raylets registering at once on 2 loaded cores can time out
    gpu_nodes = {n: cluster.start_gpu_node(n) for n in ("ray-gpu-a", "ray-gpu-b")}
    say(f"Ray head {head[:12]}, GPU nodes {[v[:12] for v in gpu_nodes.values()]}")

    procs.run([PY, "-m", "prefect", "work-pool", "create", "cluster", "--type", "process"])
    deploy = [PY, "-m", "prefect", "--no-prompt", "deploy", "-n", "retrain", "-n", "bulk-segment"]
    procs.run([*deploy, "--prefect-file", "deployments/prefect.yaml"])
    say("deployments retrain and bulk-segment registered on pool `cluster` (a process pool here)")
    cluster.start_worker(work)
    fs = s3()
    runs: dict[str, str] = {}
    checks: dict[str, Any] = {}

    # -- 1. retrain; a GPU node's raylet is killed mid-training ------------------------------
    run_a = trigger(procs, "train/retrain", tiny_retrain(), work)
    killed: dict[str, Any] = {}

    def kill_a_node() -> None:
        if killed:
            return
        for (run, fold), path in fold_files(fs, "metrics.csv").items():
            att = attempts(fs, run, fold)
            if (
                len(epochs_done(fs, path)) >= 2
                and att
                and att[-1]["status"] == "running"
                and state_saved(fs, path)
            ):
                (name,) = [n for n, nid in gpu_nodes.items() if nid == att[-1]["node"]]
                raylet = cluster.raylet(name)
                # A lost node takes its processes with it: the raylet's workers (the fold) do not
                # notice its death while they compute, so they die here with it.
                workers = raylet.children(recursive=True)
                raylet.send_signal(signal.SIGKILL)
                for w in workers:
                    with contextlib.suppress(psutil.Error):
                        w.send_signal(signal.SIGKILL)
                say(
                    f"SIGKILL raylet {raylet.pid} of {name} ({att[-1]['node'][:12]}): fold {fold}"
                    f" was in epoch {len(epochs_done(fs, path)) + 1}"
                )
                killed.update(run=run, fold=fold, node=att[-1]["node"], name=name)
                procs.stop(name, grace=30)  # its `ray start --block` ends with the raylet
                gpu_nodes[name] = cluster.start_gpu_node(name)
                say(f"{name} started again as node {gpu_nodes[name][:12]}")
                return

    runs["retrain"] = wait_run(run_a, 420, watch=kill_a_node)
    say(f"retrain: {runs['retrain']}")
    if runs["retrain"] != "Completed" or not killed:
        raise DemoError(f"retrain {runs['retrain']}, node killed: {bool(killed)}")
    arts = artifacts(run_a)
    missing = {"train-run", "fold-metrics", "training-report"} - set(arts)
    if missing:
        raise DemoError(f"retrain artifacts missing: {sorted(missing)} (has {sorted(arts)})")
    history = {f: attempts(fs, killed["run"], f) for f in range(TINY_TRAIN["folds"])}
    retry = history[killed["fold"]][-1]
    resumed_epoch = retry["start_epoch"] + 1
    say(f"fold {killed['fold']} resumed at epoch {resumed_epoch} on node {retry['node'][:12]}")
    # killed with 2+ epochs in metrics.csv, so last.pt held epoch 1 at least (it is written
    # right after each epoch's row: a kill between the two resumes one epoch earlier)
    if retry["start_epoch"] < 1 or len(history[killed["fold"]]) < 2:
        raise DemoError(f"fold {killed['fold']} restarted from epoch 1: {history}")
    ep = epochs_done(
        fs, f"{BUCKET}/models/isic/runs/{killed['run']}/fold-{killed['fold']}/metrics.csv"
    )
    if ep != list(range(1, TINY_TRAIN["epochs"] + 1)):
        raise DemoError(f"fold {killed['fold']}'s metrics.csv has epochs {ep}")
    fold_nodes = {str(f): h[0]["node"] for f, h in history.items()}
    if len(set(fold_nodes.values())) != len(fold_nodes) or head in fold_nodes.values():
        raise DemoError(f"folds did not start on different GPU nodes: {fold_nodes}, head {head}")
    # the fold-metrics artifact names the node and GPU slot of the attempt that finished each fold
    rows = {str(r["fold"]): r for r in json.loads(arts["fold-metrics"]) if r["fold"] != "all"}
    finished = {str(f): (h[-1]["node"], ",".join(h[-1]["gpus"])) for f, h in history.items()}
    shown = {f: (r.get("ray_node"), r.get("gpu_slot")) for f, r in rows.items()}
    if shown != finished:
        raise DemoError(f"fold-metrics shows placements {shown}, the folds ran on {finished}")
    dask_after_ingest = dask_keys()

    # -- 2. bulk-segment on the held-back set ------------------------------------------------
    run_b = trigger(procs, "segment/bulk-segment", production_params("bulk-segment"), work)
    runs["bulk-segment"] = wait_run(run_b, 300)
    say(f"bulk-segment: {runs['bulk-segment']}")
    seg_arts = artifacts(run_b)
    if runs["bulk-segment"] != "Completed" or not {"masks", "crops"} <= set(seg_arts):
        raise DemoError(f"bulk-segment {runs['bulk-segment']}, artifacts {sorted(seg_arts)}")
    dask_workers = _dask_usage(dask_after_ingest, dask_keys())

    # -- 3. the worker and its flow run are killed mid-run; the rerun takes finished folds
    #       from the cache (3 folds on 2 GPUs: two at once, then the third) -------------------
    params_c = tiny_retrain(folds=3, epochs=4)
    run_c = trigger(procs, "train/retrain", params_c, work)
    state: dict[str, Any] = {}

    def kill_worker() -> None:
        if state:
            return
        done = fold_files(fs, "fold.complete.json")
        for (run, fold), path in fold_files(fs, "metrics.csv").items():
            # the last fold (3 folds on 2 GPUs) past its first epoch, the other two done
            if (
                (run, fold) not in done
                and 1 <= len(epochs_done(fs, path)) < params_c["config"]["train"]["epochs"]
                and sum(r == run for r, _ in done) >= 2
            ):
                # the worker and its flow-run subprocess (Prefect may start that in a session
                # of its own, so it is found as the worker's child)
                worker = psutil.Process(procs.started["prefect-worker"].pid)
                victims = [*worker.children(recursive=True), *procs.members("prefect-worker")]
                flow_pids = sorted({v.pid for v in victims})
                procs.stop("prefect-worker", sig=signal.SIGKILL)
                for v in victims:
                    with contextlib.suppress(psutil.Error):
                        v.kill()
                state.update(
                    run=run,
                    finished=sorted(f for r, f in done if r == run),
                    running=fold,
                    pids=flow_pids,
                )
                say(
                    f"SIGKILL Prefect worker + flow run ({len(flow_pids)} processes): folds "
                    f"{state['finished']} finished, fold {fold} mid-training"
                )
                return

    deadline = time.monotonic() + 420
    while not state and time.monotonic() < deadline:
        kill_worker()
        if (r := flow_run(run_c)).state and r.state.is_final():
            raise DemoError(f"retrain finished ({r.state.name}) before it could be killed")
        time.sleep(1)
    if not state:
        raise DemoError("no moment with a finished and a running fold to kill the worker in")
    # Prefect cannot see a killed process: its run stays Running and keeps retrain's concurrency
    # slot (concurrency_limit: 1) until the lease runs out (300 s). Mark it Crashed, as an operator
    # (or a zombie-run automation on flow-run heartbeats) would.
    crash(run_c, "its flow-run process and worker were killed (cluster-demo fault)")
    # the folds whose task run completed before the kill: their results are in the cache
    state["finished"] = sorted(
        int(n.rsplit("-", 1)[1])
        for n, st in task_states(run_c).items()
        if n.startswith("train-fold-") and st == "Completed"
    )
    # the killed driver's Ray tasks end when Ray drops its client session; wait for them, or
    # the rerun's fold would share its folder with a ghost
    orphans = fold_processes(cluster)
    wait_for("the killed run's Ray fold tasks to end", lambda: not fold_processes(cluster), 120)
    say(f"the killed run's {len(orphans)} fold process(es) on Ray have ended")
    cluster.start_worker(work)
    run_c2 = trigger(procs, "train/retrain", params_c, work)
    runs["retrain-after-kill"] = wait_run(run_c2, 420)
    say(f"retrain after the kill: {runs['retrain-after-kill']}")
    tasks_c2 = task_states(run_c2)
    cached_folds = sorted(
        int(n.rsplit("-", 1)[1])
        for n, s in tasks_c2.items()
        if n.startswith("train-fold-") and s == "Cached"
    )
    if runs["retrain-after-kill"] != "Completed" or cached_folds != state["finished"]:
        raise DemoError(
            f"rerun {runs['retrain-after-kill']}: cached folds {cached_folds}, "
            f"finished before the kill {state['finished']} ({tasks_c2})"
        )
    trained_twice = {}
    for f in range(3):
        ep = epochs_done(fs, f"{BUCKET}/models/isic/runs/{state['run']}/fold-{f}/metrics.csv")
        if ep != sorted(set(ep)) or len(ep) != 4:
            trained_twice[f] = ep
        done = [a for a in attempts(fs, state["run"], f) if a["status"] == "done"]
        if len(done) != 1:
            trained_twice[f] = done
    if trained_twice:
        raise DemoError(f"epochs or folds trained twice: {trained_twice}")
    placement_c = {f: attempts(fs, state["run"], f) for f in range(3)}
    checks["max_concurrent_folds"] = _max_overlap(placement_c)

    # -- 4. unchanged data: all cache hits ---------------------------------------------------
    run_d = trigger(procs, "train/retrain", params_c, work)
    runs["retrain-cached"] = wait_run(run_d, 300)
    tasks_d = task_states(run_d)
    not_cached = {n: s for n, s in tasks_d.items() if s != "Cached"}
    say(
        f"retrain again, unchanged: {runs['retrain-cached']}, {len(tasks_d) - len(not_cached)}/"
        f"{len(tasks_d)} tasks cached"
    )
    if runs["retrain-cached"] != "Completed" or not_cached:
        raise DemoError(f"second retrain not all cache hits: {not_cached}")

    objects = len(fs.find(BUCKET))
    cpu_fallback = _grep_logs(tmp, "CUDA is not available there")
    if not cpu_fallback:
        raise DemoError("no fold said it fell back to the CPU")
    return {
        "runs": runs,
        "fold_nodes": fold_nodes,
        "head_node": head,
        "dask_workers": dask_workers,
        "resumed_epoch": resumed_epoch,
        "killed": {"node": killed["node"], "fold": killed["fold"], "retried_on": retry["node"]},
        "worker_kill": {"finished_folds_cached": cached_folds, "fold_resumed": state["running"]},
        "cached_tasks": len(tasks_d),
        "bucket_objects": objects,
        "cpu_fallback_logged": cpu_fallback,
        **checks,
    }


def fold_processes(cluster: Cluster) -> list[int]:
    """Ray workers that run a fold (Ray titles them ``ray::train-fold-<k>``)."""
    pids = []
    for name in [n for n in cluster.procs.started if n.startswith("ray-gpu")]:
        for p in cluster.procs.members(name):
            with contextlib.suppress(psutil.Error):
                if re.search(r"train-fold|_remote_fold", " ".join(p.cmdline())):
                    pids.append(p.pid)
    return pids


def dask_keys() -> dict[str, set[str]]:
    """Per Dask worker address: the keys of the batch tasks it ran (ingest and crops)."""
    from distributed import Client

    def ran(dask_worker) -> list[str]:
        return sorted(
            {str(e[0]) for e in dask_worker.state.log if str(e[0]).startswith("process_batch")}
        )

    with Client(os.environ["DASK_SCHEDULER_ADDRESS"], timeout=30) as client:
        return {addr: set(keys) for addr, keys in client.run(ran).items()}


def _dask_usage(
    after_ingest: dict[str, set[str]], after_crops: dict[str, set[str]]
) -> dict[str, Any]:
    usage = {
        addr: {
            "ingest": len(after_ingest.get(addr, set())),
            "crops": len(keys - after_ingest.get(addr, set())),
        }
        for addr, keys in after_crops.items()
    }
    if not any(u["ingest"] for u in usage.values()) or not any(u["crops"] for u in usage.values()):
        raise DemoError(f"ingest and crops did not both run on the Dask workers: {usage}")
    return usage


def _max_overlap(history: dict[int, list[dict[str, Any]]]) -> int:
    spans = [
        (a["started_at"], a["finished_at"])
        for atts in history.values()
        for a in atts
        if a.get("finished_at")
    ]
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans) if spans else 0


def _grep_logs(tmp: Path, needle: str) -> bool:
    """In the services' logs or Ray's worker logs (the driver relays them, when it is alive)."""
    files = [*tmp.glob("logs/*.log"), *tmp.glob("ray/session_*/logs/worker-*")]
    return any(needle in p.read_text(errors="replace") for p in files)


if __name__ == "__main__":
    sys.exit(main())
