"""Training throughput fed from the Zarr dataset against the compute bound, in one run.

Builds one training ``Run`` (``segflow.train.loop.setup_run``) and times full training steps
(``train_step``: host-to-device copy, augmentation, forward, loss, backward, optimiser) fed
two ways:

1. zarr: batches streamed from the dataset by ``FoldData(store, rows, cache_mb=0,
   prefetch=4).batches(...)`` (a background thread reading ``prefetch`` batches ahead), epoch
   after epoch with a new shuffle each, a fresh iterator per timed run (so each run pays one
   epoch start, as training does);
2. memory: the same number of steps on pre-made random uint8 arrays of the same shapes: the
   compute bound, what training would reach if reading cost nothing.

The two alternate (zarr, memory, zarr, memory, ...) for ``--repeats`` rounds and the best of
each is kept, so background load hits both alike. Targets: zarr / memory >= 0.9 everywhere;
on a GPU also >= 1,500 img/s (reference: resnet34 Unet, 256x256, bf16, one H100).

The dataset is ``--n`` synthetic demo images ingested into a temporary Zarr dataset (128x128
on CPU, 256x256 with CUDA), or ``--dataset URL``. Rows are all labelled rows of the dataset.

    python benchmarks/train.py [--n 256] [--steps N] [--repeats 2] [--encoder resnet34]
                               [--batch-size B] [--dataset URL] [--json] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TARGET_RATIO = 0.9
TARGET_GPU_IPS = 1500.0
PREFETCH = 4
SEED = 0

Batches = Iterator[tuple[np.ndarray, np.ndarray]]  # (images B,H,W,3 uint8, masks B,H,W uint8)


# -- dataset --------------------------------------------------------------------------------------
def build_dataset(root: Path, n: int, size: tuple[int, int]) -> str:
    """``n`` demo images generated and ingested (isic layout) into ``root/ds.zarr``."""
    from segflow.demo_data import generate_demo_data
    from segflow.ingest import IngestConfig, ingest

    raw = root / "raw"
    generate_demo_data(str(raw), n, size, seed=SEED)
    url = str(root / "ds.zarr")
    result = ingest(IngestConfig(layout="isic", source=str(raw), dataset=url, size=size))
    if result.n_images != n:
        raise RuntimeError(f"ingest: expected {n} images, got {result.n_images}")
    return url


def labelled_rows(dataset) -> list[int]:
    return [i for i, has in enumerate(dataset.column("has_mask")) if has]


# -- training run ---------------------------------------------------------------------------------
def make_run(args: argparse.Namespace, dataset_url: str, models: Path):
    """The training ``Run`` of fold 0 (of 2), built once and shared by both feeds."""
    from segflow.ingest import Dataset
    from segflow.storage import Store
    from segflow.train import TrainConfig
    from segflow.train.loop import setup_run

    cfg = TrainConfig(
        dataset=dataset_url,
        models=str(models),
        folds=2,
        arch="Unet",
        encoder=args.encoder,
        batch_size=args.batch_size,
        amp=args.amp,
        executor="inline",
        cache_mb=0,
        prefetch=PREFETCH,
    )
    dataset = Dataset(Store(dataset_url))
    run = setup_run(cfg, 0, dataset)
    run.model.train()
    return run, dataset


# -- the two feeds --------------------------------------------------------------------------------
def zarr_batches(data, batch_size: int) -> Batches:
    """Full batches streamed from Zarr, epoch after epoch (a new shuffle each)."""
    for epoch in itertools.count():
        for images, masks, _ in data.batches(batch_size, SEED + epoch, drop_last=True):
            yield images, masks


def memory_batches(shape: tuple[int, int, int], count: int = 4) -> Batches:
    """A few pre-made random batches of ``shape`` (B, H, W), cycled."""
    rng = np.random.default_rng(SEED)
    made = [
        (
            rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
            rng.integers(0, 2, shape, dtype=np.uint8),
        )
        for _ in range(count)
    ]
    yield from itertools.cycle(made)  # a generator, like the zarr feed: closing is uniform


# -- timing ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timed:
    """One timed run of one feed."""

    seconds: float
    images: int
    wait: float  # seconds blocked waiting for the next batch (the data stall)

    @property
    def ips(self) -> float:
        return self.images / self.seconds


def time_steps(run, batches: Batches, steps: int) -> Timed:
    """``steps`` training steps; ``batches`` is closed afterwards (stopping a prefetch thread).
    ``train_step`` reads the loss back, so each step has finished on the device when it
    returns and the time blocked in ``next`` is the data stall alone."""
    from segflow.train.loop import train_step

    gen = torch.Generator().manual_seed(SEED)  # same augmentations for both feeds
    images_seen, wait = 0, 0.0
    with contextlib.closing(batches):
        sync(run.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            images, masks = next(batches)
            wait += time.perf_counter() - t
            train_step(run, images, masks, gen)
            images_seen += len(images)
        sync(run.device)
        seconds = time.perf_counter() - t0
    return Timed(seconds, images_seen, wait)


def measure(run, data, shape: tuple[int, int, int], args) -> dict[str, list[Timed]]:
    """Every timed run per feed, alternating feeds, after an untimed warm-up of each."""
    feeds = {
        "zarr": lambda: zarr_batches(data, args.batch_size),
        "memory": lambda: memory_batches(shape),
    }
    for make in feeds.values():
        time_steps(run, make(), args.warmup)
    runs: dict[str, list[Timed]] = {name: [] for name in feeds}
    for r in range(args.repeats):
        for name, make in feeds.items():
            t = time_steps(run, make(), args.steps)
            runs[name].append(t)
            print(
                f"  repeat {r + 1}/{args.repeats} {name:6}: {t.ips:9.1f} img/s, "
                f"data wait {t.wait:.3f}s of {t.seconds:.1f}s",
                file=sys.stderr,
            )
    return runs


# -- report ---------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def make_report(runs: dict[str, list[Timed]], run, info: dict) -> dict:
    fastest = {name: max(v, key=lambda t: t.ips) for name, v in runs.items()}
    best = {name: t.ips for name, t in fastest.items()}
    ratio = best["zarr"] / best["memory"]
    on_gpu = run.device.type == "cuda"
    return {
        **info,
        "device": device_name(run.device),
        "torch_threads": torch.get_num_threads(),
        "amp": str(run.amp_dtype).removeprefix("torch.") if run.amp_dtype else "off",
        "images_per_s": {k: round(v, 2) for k, v in best.items()},
        "all_images_per_s": {k: [round(t.ips, 2) for t in v] for k, v in runs.items()},
        "zarr_data_wait_s": round(fastest["zarr"].wait, 4),
        "zarr_seconds": round(fastest["zarr"].seconds, 4),
        "ratio": round(ratio, 4),
        "pass_ratio": ratio >= TARGET_RATIO,
        "pass_gpu_target": best["zarr"] >= TARGET_GPU_IPS if on_gpu else None,
    }


def print_report(rep: dict) -> None:
    h, w = rep["size"]
    print(
        f"train: Unet {rep['encoder']}, {h}x{w}, batch {rep['batch_size']}, amp {rep['amp']}, "
        f"{rep['steps']} steps, best of {rep['repeats']}"
    )
    print(
        f"data: {rep['rows']} rows ({rep['steps_per_epoch']} steps/epoch), "
        f"cache_mb=0, prefetch={PREFETCH}, {rep['dataset']}"
    )
    print(f"device: {rep['device']}, torch threads: {rep['torch_threads']}")
    ips = rep["images_per_s"]
    wait = f"data wait {rep['zarr_data_wait_s']:.3f}s of {rep['zarr_seconds']:.1f}s"
    print(f"{'zarr (streamed)':24}{ips['zarr']:10.1f} img/s  ({wait})")
    print(f"{'memory (compute bound)':24}{ips['memory']:10.1f} img/s")
    print(_verdict("zarr / memory", f"{rep['ratio']:.3f}", f">= {TARGET_RATIO}", rep["pass_ratio"]))
    if rep["pass_gpu_target"] is not None:
        print(
            _verdict(
                "zarr img/s",
                f"{ips['zarr']:.0f}",
                f">= {TARGET_GPU_IPS:.0f} (resnet34 256x256 bf16, one H100)",
                rep["pass_gpu_target"],
            )
        )


def _verdict(label: str, value: str, target: str, ok: bool) -> str:
    return f"{label:24}{value:>10}  (target {target})  {'PASS' if ok else 'FAIL'}"


# -- main -----------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """``256`` or ``HxW``."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")
    h, w = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    return h, w


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", help="URL of an existing Zarr dataset (default: build one)")
    p.add_argument("--n", type=int, default=256, help="demo images to build the dataset from")
    p.add_argument(
        "--size",
        type=parse_size,
        default=(256, 256) if gpu else (128, 128),
        help="demo dataset size, N or HxW (default 256 on GPU, 128 on CPU)",
    )
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--batch-size", type=int, default=64 if gpu else 16)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--steps", type=int, default=200 if gpu else 20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per feed first")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per feed; best is kept")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print all figures as one JSON line")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    for name in ("n", "batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    from segflow.storage import Store
    from segflow.train.data import FoldData

    url = args.dataset
    if url is None:
        t0 = time.perf_counter()
        url = build_dataset(tmp, args.n, args.size)
        seconds = time.perf_counter() - t0
        print(f"  dataset: {args.n} demo images in {seconds:.1f}s", file=sys.stderr)
    run, dataset = make_run(args, url, tmp / "models")
    rows = labelled_rows(dataset)
    if len(rows) < args.batch_size:
        raise SystemExit(f"the dataset has {len(rows)} labelled rows, fewer than one batch")
    data = FoldData(Store(url), rows, cache_mb=0, prefetch=PREFETCH)
    runs = measure(run, data, (args.batch_size, *dataset.size), args)
    info = {
        "dataset": url if args.dataset else f"{args.n} demo images (temporary)",
        "size": list(dataset.size),
        "encoder": args.encoder,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": len(rows),
        "steps_per_epoch": len(rows) // args.batch_size,
    }
    return make_report(runs, run, info)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="segflow-bench-train-") as tmp:
        rep = benchmark(args, Path(tmp))
    print_report(rep)
    if args.json:
        print(json.dumps(rep))
    if args.check and not (rep["pass_ratio"] and rep["pass_gpu_target"] is not False):
        sys.exit(1)


if __name__ == "__main__":
    main()
