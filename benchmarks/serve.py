"""Serving latency and throughput: ``POST /v1/segment`` over HTTP against the same predictor
called in-process, measured in the same run.

Builds a tiny fold ensemble once (``--folds`` folds of a Unet ``--encoder`` trained for one
epoch on demo images ingested at ``--size``; quality is irrelevant, this measures speed), or
reuses ``--models URL``. Inputs are the full-resolution ISIC JPEGs under
``../shared/data/isic2017/fullres`` or, where absent, ``--generated`` random JPEGs of
``--gen-size``. The server runs on a local Ray (``segflow.serve.deployment.serve``, one replica,
bound to 127.0.0.1). Three ways, each a bounded load over the same files, round robin:

1. in-process: ``segment_bytes`` plus the PNG encode the endpoint does, one call at a time
   (the floor: no HTTP, no Ray proxy, no base64);
2. HTTP, 1 client: the same requests one at a time (the per-request overhead of serving);
3. HTTP, ``--clients`` concurrent clients x ``--requests`` each (throughput under load).

Reported: requests/s, client-side p50/p99 latency, and the ratios to the in-process floor.
The first HTTP mask is checked pixel for pixel against the in-process one.

Then the junk case (``--junk-clients``, default 4): for ``--junk-seconds`` (10) that many
clients send ``--junk-mib`` (64) MiB of random bytes as ``image/jpeg``, back to back, to a
server with the default byte limit (64 MiB): half with a declared Content-Length one byte over
the limit, half chunked with no length and four times as long (``--junk-signed``: the junk
starts with a JPEG signature, so only the byte counts stop it). ``/healthz`` is polled every
20 ms from its own process, as a load balancer would, and the RSS of Ray Serve's HTTP proxy is
sampled every 10 ms. Reported: the proxy's RSS growth (peak - before; bar < 200 MB), the
``/healthz`` sample size, p50, p99 and max during the junk (bar p99 < 100 ms) and over as long
a window just before it, the CPU seconds the proxy, the replica and the junk clients spent in
the window, and the load average. On a machine of few cores the junk clients compete with the
server for the CPU (clients elsewhere would not): ``--junk-nice 19`` lowers their threads'
priority, and the CPU figures say who used it.

    python benchmarks/serve.py [--clients 4] [--requests 8] [--models URL] [--json]
    python benchmarks/serve.py --junk-only [--junk-nice 19] [--junk-signed]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict import build_models  # the same tiny ensemble as the predict bench

SHARED_DATA = Path(
    os.environ.get("SEGFLOW_BENCH_DATA", Path(__file__).resolve().parents[1].parent / "shared/data")
)
FULLRES = SHARED_DATA / "isic2017/fullres/images"
SEED = 0


# -- the ensemble and the inputs ------------------------------------------------------------------
def load_inputs(args: argparse.Namespace) -> tuple[list[bytes], str]:
    files = sorted(FULLRES.glob("*.jpg")) if FULLRES.is_dir() else []
    if files:
        return [f.read_bytes() for f in files], str(FULLRES)
    from PIL import Image

    rng = np.random.default_rng(SEED)
    h, w = args.gen_size
    out = []
    for _ in range(args.generated):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out, f"{args.generated} generated {w}x{h} JPEGs ({FULLRES} absent)"


# -- the load -------------------------------------------------------------------------------------
@dataclass
class Load:
    latencies: list[float]  # seconds, one per request
    seconds: float  # wall time of the whole load
    clients: int

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies) * 1000, q))

    def row(self) -> dict:
        return {
            "clients": self.clients,
            "requests": len(self.latencies),
            "requests_per_s": round(self.rps, 3),
            "p50_ms": round(self.ms(50), 1),
            "p99_ms": round(self.ms(99), 1),
            "seconds": round(self.seconds, 2),
        }


def run_load(call, inputs: list[bytes], clients: int, per_client: int) -> Load:
    """``clients`` threads, each making ``per_client`` calls over ``inputs`` round robin."""

    def client(c: int) -> list[float]:
        out = []
        for i in range(per_client):
            data = inputs[(c * per_client + i) % len(inputs)]
            t0 = time.perf_counter()
            call(data)
            out.append(time.perf_counter() - t0)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    return Load([x for r in results for x in r], time.perf_counter() - t0, clients)


def in_process_call(ensemble, threshold: float, method: str, args: argparse.Namespace):
    from segflow.predict.single import segment_bytes

    def call(data: bytes) -> bytes:
        res = segment_bytes(ensemble, data, "x.jpg", threshold, method, args.tta, 10**9)
        return res.mask_png()

    return call


def http_call(url: str, server_ms: list[float]):
    import threading

    import httpx

    local = threading.local()  # one connection pool per client thread, as real clients have

    def call(data: bytes) -> dict:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=300)
        resp = local.client.post(
            "/v1/segment", content=data, headers={"Content-Type": "image/jpeg"}
        )
        resp.raise_for_status()
        body = resp.json()
        server_ms.append(body["latency_ms"])
        return body

    return call


def same_mask(http_body: dict, png: bytes) -> bool:
    from PIL import Image

    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(http_body["mask_png_base64"]))))
    return bool(np.array_equal(served, np.asarray(Image.open(io.BytesIO(png)))))


# -- junk: bodies the server refuses, and what they cost it ---------------------------------------
def serve_process(actor: str):
    """A Ray Serve process started by this driver (a descendant of this process): the HTTP
    proxy (``ProxyActor``) or the model replica (``ServeReplica``)."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if actor in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    raise RuntimeError(f"no Ray Serve {actor} process among this process's descendants")


def proxy_process():
    return serve_process("ProxyActor")


def _cpu_seconds(procs: dict) -> dict[str, float]:
    """CPU time (user + system) of each process so far: where the load's work goes."""
    out = {}
    for name, p in procs.items():
        t = p.cpu_times()
        out[name] = t.user + t.system
    return out


# /healthz polled from its own process: a prober thread here would also time this process's
# upload threads (the GIL), not only the server
_PROBE = """
import json, os, sys, time
import httpx
url, stop, out = sys.argv[1], sys.argv[2], []
with httpx.Client(base_url=url, timeout=30) as c:
    while not os.path.exists(stop):
        t0 = time.monotonic()
        c.get("/healthz").raise_for_status()
        out.append((t0, time.monotonic() - t0))
        time.sleep(0.02)
print(json.dumps(out))
"""


def junk_load(
    url: str,
    clients: int,
    mib: int,
    max_bytes: int,
    seconds: float,
    nice: int = 0,
    signed: bool = False,
) -> dict:
    """``clients`` clients send junk back to back for ``seconds`` while ``/healthz`` is probed
    from another process; the figures count only the checks that started inside that window."""
    import subprocess
    import threading
    from collections import Counter

    import httpx
    import psutil

    proxy = proxy_process()
    procs = {
        "proxy": proxy,
        "replica": serve_process("ServeReplica"),
        "junk_clients": psutil.Process(),  # this process: the uploading threads
    }
    rss_before = proxy.memory_info().rss
    stop = threading.Event()
    rss: list[int] = []
    stop_file = Path(tempfile.mkdtemp(prefix="segflow-bench-probe-")) / "stop"
    prober = subprocess.Popen(
        [sys.executable, "-c", _PROBE, url, str(stop_file)], stdout=subprocess.PIPE, text=True
    )

    def sample() -> None:
        while not stop.is_set():
            rss.append(proxy.memory_info().rss)
            time.sleep(0.01)

    junk = np.random.default_rng(SEED).integers(0, 256, mib * 2**20, dtype=np.uint8).tobytes()
    if signed:  # junk that passes the first-bytes check: only the byte counts stop it
        junk = b"\xff\xd8\xff\xe0" + junk[4:]
    declared = junk + b"\0" if len(junk) == max_bytes else junk

    def pieces(body: bytes, times: int = 1):
        # streamed 1 MiB at a time, as an uploading client does: handed whole, httpx (h11)
        # copies all 64 MiB per upload, and that copy, not the server, then eats the CPU
        view = memoryview(body)
        for _ in range(times):
            for i in range(0, len(view), 2**20):
                yield view[i : i + 2**20]

    def send_once(c: int, client: httpx.Client) -> int:
        headers = {"Content-Type": "image/jpeg"}
        if c % 2 == 0:  # declared, and over the limit when the junk is as large as the limit
            content = pieces(declared)
            headers["Content-Length"] = str(len(declared))
        else:  # chunked, no length: four times the junk, cut by the server at the limit
            content = pieces(junk, 4)
        try:
            return client.post("/v1/segment", content=content, headers=headers).status_code
        except httpx.HTTPError:  # the server closed the connection mid-upload
            return 0

    def send(c: int) -> Counter:
        # back to back until the window ends: one upload is refused in milliseconds, so a
        # single round would leave a window too short to time more than a few health checks
        out: Counter = Counter()
        if nice:  # Linux: the niceness of this thread only; the server and the prober keep 0
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                out[send_once(c, client)] += 1
        return out

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(seconds)  # a baseline of health checks: the machine may be busy without junk
    cpu0 = _cpu_seconds(procs)
    t0 = time.monotonic()
    deadline = t0 + seconds
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(send, range(clients)))
    t1 = time.monotonic()
    cpu1 = _cpu_seconds(procs)
    stop.set()
    sampler.join()
    stop_file.touch()
    health = json.loads(prober.communicate(timeout=60)[0])
    during = np.asarray([s for at, s in health if t0 <= at < t1]) * 1000
    base = np.asarray([s for at, s in health if at < t0]) * 1000
    statuses = sum(counts, Counter())
    return {
        "clients": clients,
        "mib": mib,
        "seconds": round(t1 - t0, 2),
        "uploads": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "proxy_rss_before_mb": round(rss_before / 2**20, 1),
        "proxy_rss_growth_mb": round((max(rss) - rss_before) / 2**20, 1),
        "healthz": _summary(during),
        "healthz_baseline": _summary(base),
        # CPU seconds each process spent in the window: over (window x cores) means queueing
        "junk_nice": nice,
        "signed": signed,
        "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _summary(ms: np.ndarray) -> dict:
    if not len(ms):
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
    }


# -- main -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    import ray
    import torch

    from segflow.predict.ensemble import load_ensemble
    from segflow.serve import ServeConfig
    from segflow.serve.config import DEFAULT_MAX_BYTES
    from segflow.serve.deployment import serve, stop
    from segflow.storage import Store

    cpus = len(os.sched_getaffinity(0))
    models = args.models or build_models(tmp, args)
    inputs, source = load_inputs(args)
    # serve() starts the local Ray, with the upload guard in its HTTP proxy; the default byte
    # limit (64 MiB): the full-resolution JPEGs are a few MB each
    started = serve(ServeConfig(models=models, port=_free_port(), tta=args.tta, max_pixels=10**9))

    def junk() -> dict[str, Any]:
        return junk_load(
            started.url,
            args.junk_clients,
            args.junk_mib,
            DEFAULT_MAX_BYTES,
            args.junk_seconds,
            args.junk_nice,
            args.junk_signed,
        )

    try:
        if args.junk_only:
            return {"junk": junk()}
        ensemble = load_ensemble(Store(models), None)
        torch.set_num_threads(started.cpus_per_replica)  # the replica's thread count
        local = in_process_call(ensemble, started.threshold, started.postprocess, args)
        server_ms: list[float] = []
        remote = http_call(started.url, server_ms)
        check = same_mask(remote(inputs[0]), local(inputs[0]))  # also the warm-up of both
        for data in inputs[1:3]:
            local(data), remote(data)
        server_ms.clear()
        loads = {
            "in_process": run_load(local, inputs, 1, max(1, args.requests * args.clients // 2)),
            "http_1": run_load(remote, inputs, 1, max(1, args.requests * args.clients // 2)),
        }
        single_ms = list(server_ms)
        loads["http_n"] = run_load(remote, inputs, args.clients, args.requests)
        junk_figures = junk()
    finally:
        stop()
        ray.shutdown()
    floor = loads["in_process"]
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpus": cpus,
        "source": source,
        "n_files": len(inputs),
        "pixels": [min(_pixels(d) for d in inputs), max(_pixels(d) for d in inputs)],
        "tta": args.tta,
        "folds": ensemble.folds,
        "encoder": ensemble.spec.encoder,
        "frame": list(ensemble.spec.dataset_size),
        "replicas": 1,
        "torch_threads": started.cpus_per_replica,
        "same_mask": check,
        "loads": {k: v.row() for k, v in loads.items()},
        "server_p50_ms": round(float(np.median(single_ms)), 1),
        "http_1_over_in_process": round(loads["http_1"].rps / floor.rps, 3),
        "http_n_over_in_process": round(loads["http_n"].rps / floor.rps, 3),
        "junk": junk_figures,
    }


def _pixels(data: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.width * im.height


def print_report(rep: dict) -> None:
    if "loads" in rep:
        print_speed(rep)
    j = rep["junk"]
    h, b = j["healthz"], j["healthz_baseline"]
    print(
        f"junk{' (JPEG signature first)' if j['signed'] else ''}: {j['clients']} clients x "
        f"{j['mib']} MiB back to back for {j['seconds']:.1f}s "
        f"({j['uploads']} uploads, statuses {j['statuses']}): proxy RSS "
        f"{j['proxy_rss_before_mb']:.0f} MB + {j['proxy_rss_growth_mb']:.0f} MB (bar < 200)"
    )
    print(
        f"CPU seconds in the {j['seconds']:.1f}s window: {j['cpu_s']} (junk clients at nice "
        f"{j['junk_nice']}); load average "
        f"{j['load_average']} on {os.cpu_count()} cpus"
    )
    if not j["uploads"]:
        print("no junk upload finished in the window: these /healthz figures do not measure it")
    for label, x in (("during the junk", h), ("before (baseline)", b)):
        print(
            f"/healthz {label}: n {x['n']}, p50 {x.get('p50_ms', 0):.1f} ms, p99 "
            f"{x.get('p99_ms', 0):.1f} ms, max {x.get('max_ms', 0):.1f} ms"
            + (" (bar p99 < 100)" if x is h else "")
        )


def print_speed(rep: dict) -> None:
    h, w = rep["frame"]
    print(
        f"serve: Unet {rep['encoder']} {h}x{w}, {len(rep['folds'])} folds x tta {rep['tta']}, "
        f"1 replica, torch threads {rep['torch_threads']}, {rep['device']}, "
        f"{rep['cpus']} cpus"
    )
    print(
        f"inputs: {rep['n_files']} JPEGs, {rep['pixels'][0]:,}..{rep['pixels'][1]:,} pixels, "
        f"{rep['source']}"
    )
    print(f"{'way':34}{'clients':>8}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    labels = {
        "in_process": "in-process segment_bytes + PNG",
        "http_1": "HTTP POST /v1/segment",
        "http_n": "HTTP POST /v1/segment",
    }
    for key, label in labels.items():
        r = rep["loads"][key]
        print(
            f"{label:34}{r['clients']:>8}{r['requests']:>9}{r['requests_per_s']:>9.2f}"
            f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
        )
    print(
        f"HTTP (1 client) / in-process req/s: {rep['http_1_over_in_process']:.3f}; "
        f"HTTP ({rep['loads']['http_n']['clients']} clients) / in-process: "
        f"{rep['http_n_over_in_process']:.3f}; server-side p50 (1 client) "
        f"{rep['server_p50_ms']:.1f} ms; same mask: {rep['same_mask']}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="URL of trained models to reuse (default: train a tiny set)")
    p.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--train-n", type=int, default=32, help="demo images to train on")
    p.add_argument("--tta", default="flips", choices=("none", "flips", "d4"))
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--generated", type=int, default=8, help="JPEGs to make without real data")
    p.add_argument("--gen-size", type=int, nargs=2, default=(768, 1024), metavar=("H", "W"))
    p.add_argument("--junk-clients", type=int, default=4, help="clients sending junk at once")
    p.add_argument("--junk-mib", type=int, default=64, help="MiB of junk per client")
    p.add_argument(
        "--junk-seconds", type=float, default=10.0, help="how long the junk keeps coming"
    )
    p.add_argument(
        "--junk-nice",
        type=int,
        default=0,
        help="niceness of the junk clients' threads: on a machine of few cores they compete "
        "with the server for CPU, which clients elsewhere would not",
    )
    p.add_argument(
        "--junk-signed", action="store_true", help="junk that starts with a JPEG signature"
    )
    p.add_argument("--junk-only", action="store_true", help="only the junk case")
    p.add_argument("--json", action="store_true", help="print all figures as one JSON line")
    args = p.parse_args(argv)
    for name in ("folds", "train_n", "clients", "requests", "generated"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="segflow-bench-serve-") as tmp:
        rep = benchmark(args, Path(tmp))
    print_report(rep)
    if args.json:
        print(json.dumps(rep))
    if not rep.get("same_mask", True):
        sys.exit(1)


if __name__ == "__main__":
    main()
