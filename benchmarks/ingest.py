"""Ingest throughput of segflow against two references measured in the same run.

On the 32 full-resolution ISIC 2017 JPEGs (``shared/data/isic2017/fullres``), to 384x512 (H, W),
stretched, it times:

1. naive baseline: one process, full decode, resize, ``np.stack`` + ``np.save`` (the seed
   tutorials' way);
2. decode floor: every core doing DCT-scaled JPEG decode + mask decode + resize, nothing
   written; the faster of a process pool and a thread pool;
3. segflow ingest: ``segflow.ingest.ingest`` into a fresh Zarr dataset, end to end, then a
   second call on the unchanged source (a no-op, ``status == "up_to_date"``).

Each is repeated ``--repeats`` times and the best (shortest) is reported. Targets: segflow is
at least 4x the naive baseline and at least 0.9x the decode floor.

``--memory`` also runs segflow ingest in a fresh subprocess on the 32 full-resolution images,
on the last 250 of the 2,000-image train set and on all of it (all to 256x256) and reports
each child's peak RSS: from 250 to 2,000 images of the same kind it should stay flat (the
train set's masks reach 30 MP, so its peak is set by its largest files, not by its count).

    python benchmarks/ingest.py [--repeats 3] [--memory] [--json] [--check] [--data DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("SEGFLOW_BENCH_DATA", REPO.parent / "shared/data"))
SIZE = (384, 512)  # (H, W) of the throughput runs
MEMORY_SIZE = (256, 256)  # (H, W) of the memory runs
TARGET_VS_NAIVE = 4.0
TARGET_VS_FLOOR = 0.9

Pair = tuple[str, str]  # (image path, mask path)


# -- data -----------------------------------------------------------------------------------------
def find_pairs(root: Path) -> list[Pair]:
    """``root/images/ISIC_*.jpg`` with their ``root/masks/ISIC_*_segmentation.png``."""
    pairs = []
    for image in sorted((root / "images").glob("ISIC_*.jpg")):
        mask = root / "masks" / f"{image.stem}_segmentation.png"
        if mask.is_file():
            pairs.append((str(image), str(mask)))
    return pairs


def size_range(pairs: list[Pair]) -> str:
    """Smallest and largest image as ``WxH`` (header read only)."""
    sizes = []
    for image, _ in pairs:
        with Image.open(image) as im:
            sizes.append(im.size)
    lo, hi = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    return f"{lo[0]}x{lo[1]}..{hi[0]}x{hi[1]}"


def cores() -> int:
    return len(os.sched_getaffinity(0))


# -- 1. naive baseline ----------------------------------------------------------------------------
def naive_ingest(pairs: list[Pair], size: tuple[int, int], out: Path) -> None:
    """One process, full decode (no draft), resize, stack, save: the tutorials' loop."""
    h, w = size
    images, masks = [], []
    for image_path, mask_path in pairs:
        image = Image.open(image_path).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        mask = Image.open(mask_path).convert("L").resize((w, h), Image.Resampling.NEAREST)
        images.append(np.asarray(image))
        masks.append(np.asarray(mask))
    np.save(out / "images.npy", np.stack(images))
    np.save(out / "masks.npy", np.stack(masks))


def time_naive(pairs: list[Pair], size: tuple[int, int]) -> float:
    with tempfile.TemporaryDirectory(prefix="segflow-bench-naive-") as tmp:
        t0 = time.perf_counter()
        naive_ingest(pairs, size, Path(tmp))
        return time.perf_counter() - t0


# -- 2. decode floor ------------------------------------------------------------------------------
def decode_pair(pair: Pair, size: tuple[int, int]) -> None:
    """Read both files, DCT-scaled JPEG decode + resize, PNG mask decode + nearest resize."""
    h, w = size
    image_path, mask_path = pair
    image = Image.open(io.BytesIO(Path(image_path).read_bytes()))
    image.draft("RGB", (w, h))
    image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    mask = Image.open(io.BytesIO(Path(mask_path).read_bytes()))
    mask.convert("L").resize((w, h), Image.Resampling.NEAREST)


def decode_all(pool: Executor, pairs: list[Pair], size: tuple[int, int]) -> None:
    list(pool.map(decode_pair, pairs, [size] * len(pairs)))


def warm_up(pool: Executor, pairs: list[Pair], size: tuple[int, int], workers: int) -> None:
    """Start every worker and let it decode once, outside any timed region."""
    decode_all(pool, (pairs * workers)[: 2 * workers], size)


def time_floor(pool: Executor, pairs: list[Pair], size: tuple[int, int]) -> float:
    t0 = time.perf_counter()
    decode_all(pool, pairs, size)
    return time.perf_counter() - t0


# -- 3. segflow ingest ----------------------------------------------------------------------------
def segflow_config(images: Path, masks: Path, dataset: Path, size: tuple[int, int]):
    from segflow.ingest import IngestConfig

    return IngestConfig(
        layout="isic",
        source=str(images),
        masks=str(masks),
        dataset=str(dataset),
        size=size,
        allow_external_links=True,  # the memory runs' sources are links into the data folder
    )


def time_segflow(root: Path, n: int, size: tuple[int, int]) -> tuple[float, float]:
    """Seconds of a fresh ingest and of a second, no-op, ingest of the unchanged source."""
    from segflow.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="segflow-bench-ingest-") as tmp:
        cfg = segflow_config(root / "images", root / "masks", Path(tmp) / "ds.zarr", size)
        t0 = time.perf_counter()
        first = ingest(cfg)
        t1 = time.perf_counter()
        again = ingest(cfg)
        t2 = time.perf_counter()
    if first.status != "ingested" or first.n_images != n:
        raise RuntimeError(f"segflow ingest: expected {n} images ingested, got {first}")
    if again.status != "up_to_date":
        raise RuntimeError(f"segflow re-ingest: expected up_to_date, got {again.status}")
    return t1 - t0, t2 - t1


def preload_segflow() -> None:
    """Import what ingest imports lazily (``dask.compute`` imports ``distributed`` whenever it
    is installed), so that memory measured after this is a baseline."""
    import dask
    import dask.delayed
    import dask.threaded
    import zarr

    import segflow.ingest

    with contextlib.suppress(ImportError):
        import distributed  # noqa: F401

    del dask, zarr, segflow


def warm_up_segflow(pairs: list[Pair], size: tuple[int, int]) -> None:
    """One untimed ingest of two images, like the pools' warm-up: lazy imports (Dask's
    scheduler pulls in ``distributed``) and first-call set-up happen here, not in a repeat."""
    from segflow.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="segflow-bench-warm-") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "masks").mkdir()
        for image, mask in pairs[:2]:
            shutil.copy(image, root / "images")
            shutil.copy(mask, root / "masks")
        ingest(segflow_config(root / "images", root / "masks", root / "ds.zarr", size))


# -- throughput run -------------------------------------------------------------------------------
@dataclass
class Timings:
    """Seconds of every repeat, per measurement."""

    runs: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.runs.setdefault(name, []).append(seconds)

    def best(self, name: str) -> float:
        return min(self.runs[name])


def measure(root: Path, pairs: list[Pair], repeats: int, workers: int) -> Timings:
    """All measurements, interleaved per repeat so background load hits them alike."""
    timings = Timings()
    # Pools first: the process pool forks before any Dask thread exists.
    with ProcessPoolExecutor(workers) as procs, ThreadPoolExecutor(workers) as threads:
        warm_up(procs, pairs, SIZE, workers)
        warm_up(threads, pairs, SIZE, workers)
        warm_up_segflow(pairs, SIZE)
        steps: dict[str, Callable[[], float]] = {
            "naive": lambda: time_naive(pairs, SIZE),
            "floor_processes": lambda: time_floor(procs, pairs, SIZE),
            "floor_threads": lambda: time_floor(threads, pairs, SIZE),
        }
        for r in range(repeats):
            for name, step in steps.items():
                timings.add(name, step())
            first, again = time_segflow(root, len(pairs), SIZE)
            timings.add("segflow", first)
            timings.add("segflow_rerun", again)
            print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr)
    return timings


def throughput_report(timings: Timings, n: int) -> dict:
    best = {name: timings.best(name) for name in timings.runs}
    best["floor"] = min(best["floor_processes"], best["floor_threads"])
    ips = {name: n / s for name, s in best.items()}
    vs_naive = ips["segflow"] / ips["naive"]
    vs_floor = ips["segflow"] / ips["floor"]
    return {
        "seconds": {k: round(v, 4) for k, v in best.items()},
        "images_per_s": {k: round(v, 2) for k, v in ips.items() if k != "segflow_rerun"},
        "all_seconds": {k: [round(s, 4) for s in v] for k, v in timings.runs.items()},
        "segflow_vs_naive": round(vs_naive, 3),
        "segflow_vs_floor": round(vs_floor, 3),
        "pass_vs_naive": vs_naive >= TARGET_VS_NAIVE,
        "pass_vs_floor": vs_floor >= TARGET_VS_FLOOR,
    }


def print_throughput(rep: dict, n: int, sizes: str, workers: int, repeats: int) -> None:
    sec, ips = rep["seconds"], rep["images_per_s"]
    floor_kind = "processes" if sec["floor_processes"] <= sec["floor_threads"] else "threads"
    rows = [
        ("naive baseline (1 process)", "naive"),
        (f"decode floor, {workers} processes", "floor_processes"),
        (f"decode floor, {workers} threads", "floor_threads"),
        (f"decode floor (best: {floor_kind})", "floor"),
        ("segflow ingest", "segflow"),
    ]
    print(
        f"ingest: {n} images ({sizes}) -> {SIZE[0]}x{SIZE[1]} (HxW) stretch, "
        f"{workers} cores, best of {repeats}"
    )
    print(f"{'':34}{'seconds':>10}{'img/s':>10}")
    for label, key in rows:
        print(f"{label:34}{sec[key]:10.3f}{ips[key]:10.2f}")
    print(f"{'segflow re-run (up_to_date no-op)':34}{sec['segflow_rerun']:10.3f}")
    print()
    print(_verdict("segflow / naive", rep["segflow_vs_naive"], TARGET_VS_NAIVE))
    print(_verdict("segflow / floor", rep["segflow_vs_floor"], TARGET_VS_FLOOR))


def _verdict(label: str, ratio: float, target: float) -> str:
    mark = "PASS" if ratio >= target else "FAIL"
    return f"{label:17}= {ratio:6.2f}x  (target >= {target}x)  {mark}"


# -- peak memory ----------------------------------------------------------------------------------
# Peak RSS is the child's own VmHWM (/proc/self/status), read by the child itself. Not
# ``ru_maxrss``: Linux carries the parent's high-water mark over fork + exec into the child's
# ru_maxrss, so every child would report at least this (large) process's peak.
def proc_status_mib(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since exec) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def run_child(images: Path, masks: Path, size: tuple[int, int]) -> dict:
    """Ingest in a fresh subprocess and return the JSON line it prints."""
    with tempfile.TemporaryDirectory(prefix="segflow-bench-memory-") as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child"]
        cmd += [str(images), str(masks), str(Path(tmp) / "ds.zarr"), str(size[0]), str(size[1])]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    child["images_per_s"] = round(child["n_images"] / child["seconds"], 2)
    return child


def child_main(images: str, masks: str, dataset: str, h: int, w: int) -> None:
    """The ``--_child`` mode: one ingest, one JSON line on stdout."""
    preload_segflow()
    from segflow.ingest import ingest

    before = proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    result = ingest(segflow_config(Path(images), Path(masks), Path(dataset), (h, w)))
    seconds = time.perf_counter() - t0
    figures = {
        "status": result.status,
        "n_images": result.n_images,
        "n_rejected": result.n_rejected,
        "seconds": round(seconds, 3),
        "rss_after_imports_mib": round(before, 1),
        "peak_rss_mib": round(proc_status_mib("VmHWM"), 1),
    }
    print(json.dumps(figures))


def linked_subset(root: Path, n: int, tmp: Path) -> Path:
    """The last ``n`` image/mask pairs of ``root`` (by name) as symlinks under ``tmp``."""
    for sub in ("images", "masks"):
        (tmp / sub).mkdir(parents=True)
    for image, mask in find_pairs(root)[-n:]:
        (tmp / "images" / Path(image).name).symlink_to(image)
        (tmp / "masks" / Path(mask).name).symlink_to(mask)
    return tmp


# the last 250 train pairs (by name) hold the largest masks (up to 30 MP), as the full set does
MEMORY_RUNS = {  # name -> (label, folder under isic2017, last n pairs or None for all)
    "fullres": ("fullres (32, big JPEGs)", "fullres", None),
    "train_250": ("train, last 250", "train", 250),
    "train": ("train (2000)", "train", None),
}


def memory_report(isic: Path) -> dict | None:
    missing = [
        str(isic / d) for _, d, _ in MEMORY_RUNS.values() if not (isic / d / "images").is_dir()
    ]
    if missing:
        print(f"memory: skipped, data not found: {', '.join(missing)}")
        return None
    out: dict = {}
    for name, (_, folder, n) in MEMORY_RUNS.items():
        print(f"  memory run: {name} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="segflow-bench-subset-") as tmp:
            root = linked_subset(isic / folder, n, Path(tmp)) if n else isic / folder
            out[name] = run_child(root / "images", root / "masks", MEMORY_SIZE)
    # the same kind of images (the same largest ones), 8x as many: what grows with N
    out["peak_rss_ratio"] = round(
        out["train"]["peak_rss_mib"] / out["train_250"]["peak_rss_mib"], 3
    )
    return out


def print_memory(mem: dict) -> None:
    h, w = MEMORY_SIZE
    print()
    print(f"peak memory: segflow ingest in a fresh subprocess, to {h}x{w}, {cores()} cores")
    print(f"{'':24}{'images':>8}{'seconds':>10}{'img/s':>10}{'peak RSS':>12}{'after import':>14}")
    for name, (label, _, _) in MEMORY_RUNS.items():
        r = mem[name]
        print(
            f"{label:24}{r['n_images']:8d}{r['seconds']:10.2f}{r['images_per_s']:10.2f}"
            f"{r['peak_rss_mib']:8.1f} MiB{r['rss_after_imports_mib']:10.1f} MiB"
        )
    print(f"peak RSS ratio, train 2000 / train 250 = {mem['peak_rss_ratio']:.2f}x")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="shared data root (holds isic2017/)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; best is kept")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS vs dataset size")
    p.add_argument("--json", action="store_true", help="print all figures as one JSON line")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child:
        images, masks, dataset, h, w = args._child
        child_main(images, masks, dataset, int(h), int(w))
        return
    isic = args.data / "isic2017"
    fullres = isic / "fullres"
    pairs = find_pairs(fullres) if (fullres / "images").is_dir() else []
    if not pairs:
        print(f"ingest benchmark: skipped, no ISIC images under {fullres}")
        sys.exit(0)

    workers = cores()
    rep = throughput_report(measure(fullres, pairs, args.repeats, workers), len(pairs))
    print_throughput(rep, len(pairs), size_range(pairs), workers, args.repeats)
    mem = memory_report(isic) if args.memory else None
    if mem:
        print_memory(mem)
    if args.json:
        figures = {"cores": workers, "n_images": len(pairs), "size": SIZE, **rep}
        print(json.dumps({**figures, "memory": mem}))
    if args.check and not (rep["pass_vs_naive"] and rep["pass_vs_floor"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
