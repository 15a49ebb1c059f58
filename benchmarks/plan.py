"""Planning a bulk predict run over a million objects: time and peak memory.

A synthetic listing of ``--objects`` N objects (default 1,000,000; ``img/<k>/ISIC_<n>.jpg``,
100 per folder) goes through the same planning code as ``segflow predict``
(``list_inputs`` + ``plan_shards``), with a fake lister in place of the storage listing (the
``lister`` seam of :func:`segflow.predict.run.list_inputs`), into a local output folder:

1. plan: the first plan, every object new;
2. replan: one object's fingerprint changed (its shard must run again).

Each phase runs in a fresh subprocess, so its peak RSS (VmHWM) is its own. Targets: plan
< 60 s and < 1.5 GB; replan < 20 s. The last line printed is JSON with ``objects``, ``plan_s``,
``replan_s``, ``peak_rss_mb`` (the larger of the two phases), each phase's CPU seconds and
the load average (on a shared machine, wall time is CPU time times the contention).

    python benchmarks/plan.py [--objects N] [--shard-size 256] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TARGET_PLAN_S = 60.0
TARGET_REPLAN_S = 20.0
TARGET_RSS_MB = 1536.0


def synthetic_listing(n: int, changed: int | None = None) -> Iterator:
    """``n`` objects, sorted as a store lists them; object ``changed`` has a new ETag."""
    from segflow.storage import FileInfo

    for k in range(n):
        etag = "new" if k == changed else f"{k:032x}"
        yield FileInfo(f"img/{k // 100:06d}/ISIC_{k:07d}.jpg", 50_000, f"etag:{etag}:50000")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def phase(out: str, n: int, shard_size: int, changed: int | None) -> dict:
    """One plan in this process: the figures of ``plan_shards`` over the synthetic listing."""
    from segflow.predict.config import PredictConfig
    from segflow.predict.run import list_inputs, pending_shards, plan_shards
    from segflow.storage import Store

    cfg = PredictConfig(
        models="unused", source="synthetic://", out=out, layout="isic", shard_size=shard_size
    )
    base = vm_hwm_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    inputs = list_inputs(cfg, lister=lambda url, storage: synthetic_listing(n, changed))
    shards = plan_shards(Store(out), inputs, shard_size)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),  # this process's CPU time: what the load average does not skew
        "shards": len(shards),
        "items": sum(s["n"] for s in shards),
        "to_run": len(pending_shards(cfg, shards)),
        "peak_rss_mb": round(vm_hwm_mb(), 1),
        "baseline_rss_mb": round(base, 1),
    }


def run_phase(out: str, n: int, shard_size: int, changed: int | None) -> dict:
    cmd = [sys.executable, __file__, "--phase", out, str(n), str(shard_size), str(changed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"plan phase failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mark_all_done(out: str, shards: int) -> None:
    """Done-markers for every shard, as after a finished run: the replan must clear one."""
    from segflow.predict.shard import shard_marker
    from segflow.storage import Store

    store = Store(out)
    for k in range(shards):
        store.write_json(f"{shard_marker(k)}.complete.json", {"outputs": [], "errors": []}, False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=1_000_000, help="objects in the listing")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--phase", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        out, n, size, changed = args.phase
        figures = phase(out, int(n), int(size), None if changed == "None" else int(changed))
        print(json.dumps(figures))
        return
    if args.objects < 1 or args.shard_size < 1:
        p.error("--objects and --shard-size must be at least 1")
    with tempfile.TemporaryDirectory(prefix="segflow-bench-plan-") as tmp:
        out = os.path.join(tmp, "out")
        first = run_phase(out, args.objects, args.shard_size, None)
        print(f"plan:   {json.dumps(first)}", file=sys.stderr)
        mark_all_done(out, first["shards"])
        again = run_phase(out, args.objects, args.shard_size, args.objects // 2)
        print(f"replan: {json.dumps(again)}", file=sys.stderr)
    peak = max(first["peak_rss_mb"], again["peak_rss_mb"])
    rep = {
        "objects": args.objects,
        "shard_size": args.shard_size,
        "shards": first["shards"],
        "plan_s": first["seconds"],
        "replan_s": again["seconds"],
        "plan_cpu_s": first["cpu_s"],
        "replan_cpu_s": again["cpu_s"],
        "replan_shards_to_run": again["to_run"],
        "peak_rss_mb": peak,
        "plan_peak_rss_mb": first["peak_rss_mb"],
        "replan_peak_rss_mb": again["peak_rss_mb"],
        "baseline_rss_mb": first["baseline_rss_mb"],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpus": len(os.sched_getaffinity(0)),
    }
    rep["pass"] = (
        rep["plan_s"] < TARGET_PLAN_S
        and rep["replan_s"] < TARGET_REPLAN_S
        and peak < TARGET_RSS_MB
        and again["to_run"] == 1
    )
    print(json.dumps(rep))
    if args.check and not rep["pass"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
