"""Prediction throughput, JPEG file to PNG mask at the original size, against two references.

Builds a tiny fold ensemble once (``--folds`` folds of a Unet ``--encoder`` trained for one
epoch on demo images ingested at ``--size``; quality is irrelevant, this measures speed), or
reuses ``--models URL``. Inputs are the full-resolution ISIC JPEGs under
``../shared/data/isic2017/fullres`` (skipped cleanly when absent), each linked ``--replicate``
times under new ids. Three ways of predicting the same inputs are timed, alternating, best of
``--repeats``:

1. segflow: ``predict(PredictConfig(..., executor="inline"))`` end to end (fixed threshold and
   no post-processing, so no out-of-fold pass is timed), a fresh output folder each time;
2. naive: a per-image loop: batch of 1, every fold and TTA view a separate forward pass, PIL
   full decode, resize, forward, invert, resize back, threshold, write the PNG;
3. model-only: ``Ensemble.predict`` on in-memory random frames, batches of the same size and
   count: the compute bound.

Targets: segflow / model-only >= 0.8, segflow faster than naive (the ratio is reported).
``--memory N`` also predicts N small generated JPEGs in a fresh subprocess and reports its
peak RSS (VmHWM from /proc/self/status): target < 2 GB.

``--scale`` checks that memory is flat in the number of inputs: it predicts 2,000 and then
20,000 tiny 32x32 PNGs (``--scale-sizes``), each in a fresh subprocess, with a tiny model
(two resnet18 folds trained at 32x32 unless ``--models`` is given; fold 0 predicts) and
reports both peak RSS figures: target large / small <= 1.1.

    python benchmarks/predict.py [--replicate R] [--repeats 2] [--size H W] [--models URL]
                                 [--memory N] [--scale] [--skip-speed] [--json] [--check]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARED_DATA = Path(
    os.environ.get("SEGFLOW_BENCH_DATA", Path(__file__).resolve().parents[1].parent / "shared/data")
)
FULLRES = SHARED_DATA / "isic2017/fullres/images"
TARGET_MODEL_RATIO = 0.8
TARGET_RSS_BYTES = 2 * 1024**3
TARGET_SCALE_RATIO = 1.1  # peak RSS of the large run / the small one
THRESHOLD = 0.5
SEED = 0


# -- the ensemble ---------------------------------------------------------------------------------
def build_models(root: Path, args: argparse.Namespace) -> str:
    """A tiny trained ensemble in ``root/models``: demo data, ingest, one epoch per fold."""
    from segflow.demo_data import generate_demo_data
    from segflow.ingest import IngestConfig, ingest
    from segflow.train import TrainConfig, train

    raw, dataset, models = root / "demo", str(root / "ds.zarr"), str(root / "models")
    generate_demo_data(str(raw), args.train_n, (256, 256), seed=SEED)
    ingest(IngestConfig(layout="isic", source=str(raw), dataset=dataset, size=tuple(args.size)))
    result = train(
        TrainConfig(
            dataset=dataset,
            models=models,
            folds=args.folds,
            epochs=1,
            encoder=args.encoder,
            batch_size=8,
            executor="inline",
            early_stopping=None,
        )
    )
    if not result.ok:
        raise RuntimeError(f"training failed: {result.to_dict()}")
    return models


# -- inputs ---------------------------------------------------------------------------------------
def fullres_files() -> list[Path]:
    if not FULLRES.is_dir():
        return []
    return sorted(p for p in FULLRES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))


def replicate(files: list[Path], times: int, folder: Path) -> list[Path]:
    """Each file linked ``times`` times into ``folder`` under new ids ``ISIC_<n>``."""
    folder.mkdir(parents=True)
    out = []
    for n, src in enumerate(f for _ in range(times) for f in files):
        dst = folder / f"ISIC_{n:07d}{src.suffix.lower()}"
        dst.symlink_to(src.resolve())
        out.append(dst)
    return out


def write_small_jpegs(folder: Path, n: int, size: tuple[int, int] = (48, 64)) -> None:
    """``n`` small JPEGs (H, W) = ``size``: 16 distinct random images, written round robin."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    encoded = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            buf, "JPEG", quality=80
        )
        encoded.append(buf.getvalue())
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"ISIC_{i:07d}.jpg").write_bytes(encoded[i % len(encoded)])


def write_small_pngs(folder: Path, n: int, size: tuple[int, int] = (32, 32)) -> None:
    """``n`` tiny PNGs: 16 distinct random images, written round robin."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    encoded = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
        encoded.append(buf.getvalue())
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"ISIC_{i:07d}.png").write_bytes(encoded[i % len(encoded)])


# -- the three ways -------------------------------------------------------------------------------
@dataclass
class Timed:
    seconds: float
    images: int

    @property
    def ips(self) -> float:
        return self.images / self.seconds


def run_segflow(models: str, source: Path, out: Path, args: argparse.Namespace) -> Timed:
    from segflow.predict.config import PredictConfig
    from segflow.predict.run import predict

    cfg = PredictConfig(
        models=models,
        source=str(source),
        out=str(out),
        layout="isic",
        tta=args.tta,
        threshold=THRESHOLD,
        postprocess="none",
        executor="inline",
        batch_size=args.batch_size,
    )
    t0 = time.perf_counter()
    result = predict(cfg)
    seconds = time.perf_counter() - t0
    if result.n_errors:
        raise RuntimeError(f"segflow predict: {result.n_errors} errors: {result.errors[:3]}")
    return Timed(seconds, result.n_images)


def load_naive_models(models: str):
    """Every fold's model (``load_model``) and spec, on the CPU, as the naive loop uses them."""
    from segflow.predict.ensemble import finished_folds
    from segflow.storage import Store
    from segflow.train.model import load_model, load_spec

    store = Store(models)
    folds = finished_folds(store)
    return [
        (
            load_model(store.child(f"fold-{k}"), "best.pt", "cpu"),
            load_spec(store.child(f"fold-{k}")),
        )
        for k in folds
    ]


def naive_one(path: Path, nets, tta: str, out: Path) -> None:
    """One image, the obvious way: batch of 1, each fold and view its own forward pass."""
    import torch
    from PIL import Image

    from segflow.predict.tta import TTA_MODES, apply, invert

    img = Image.open(path).convert("RGB")  # full decode, no draft
    w, h = img.size
    total, count = None, 0
    for model, spec in nets:
        ih, iw = spec.input_size
        arr = np.asarray(img.resize((iw, ih), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        x = torch.from_numpy((arr - np.float32(spec.mean)) / np.float32(spec.std))
        x = x.permute(2, 0, 1)[None].contiguous()
        for view in TTA_MODES[tta]:
            with torch.no_grad():
                p = invert(torch.sigmoid(model(apply(x, view))), view)[0, 0].numpy()
            total = p if total is None else total + p
            count += 1
    prob = Image.fromarray((total / count).astype(np.float32), mode="F")
    full = np.asarray(prob.resize((w, h), Image.Resampling.BILINEAR)) >= THRESHOLD
    Image.fromarray(full.astype(np.uint8) * 255).save(out / f"{path.stem}_segmentation.png")


def run_naive(nets, files: list[Path], out: Path, tta: str) -> Timed:
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    for path in files:
        naive_one(path, nets, tta, out)
    return Timed(time.perf_counter() - t0, len(files))


def run_model_only(ensemble, n: int, args: argparse.Namespace) -> Timed:
    """``Ensemble.predict`` on in-memory frames: ``n`` images in batches of ``batch_size``."""
    h, w = ensemble.spec.dataset_size
    rng = np.random.default_rng(SEED)
    frames = rng.integers(0, 256, (args.batch_size, h, w, 3), dtype=np.uint8)
    sizes = [min(args.batch_size, n - s) for s in range(0, n, args.batch_size)]
    t0 = time.perf_counter()
    for b in sizes:
        ensemble.predict(frames[:b], args.tta)
    return Timed(time.perf_counter() - t0, n)


def measure(models: str, files: list[Path], tmp: Path, args) -> dict[str, list[Timed]]:
    """Every timed run of each way, alternating, after an untimed warm-up of the models."""
    from segflow.predict.ensemble import load_ensemble
    from segflow.storage import Store

    source = tmp / "source"
    inputs = replicate(files, args.replicate, source)
    ensemble = load_ensemble(Store(models), None)
    nets = load_naive_models(models)
    run_model_only(ensemble, min(len(inputs), args.batch_size), args)  # warm-up
    runs: dict[str, list[Timed]] = {"segflow": [], "naive": [], "model_only": []}
    for r in range(args.repeats):
        ways = {
            "segflow": lambda r=r: run_segflow(models, source, tmp / f"out-{r}", args),
            "naive": lambda r=r: run_naive(nets, inputs, tmp / f"naive-{r}", args.tta),
            "model_only": lambda: run_model_only(ensemble, len(inputs), args),
        }
        for name, fn in ways.items():
            t = fn()
            runs[name].append(t)
            print(
                f"  repeat {r + 1}/{args.repeats} {name:10}: {t.ips:8.2f} img/s "
                f"({t.images} images in {t.seconds:.1f}s)",
                file=sys.stderr,
            )
    return runs


# -- peak memory, in a fresh process -------------------------------------------------------------
def vm_hwm_bytes() -> int:
    """This process's peak resident set (VmHWM); ``ru_maxrss`` of children is no good on Linux
    (a forked child starts from the parent's high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(models: str, source: str, out: str, tta: str, folds: str, shard: int) -> None:
    """Run in the subprocess: predict ``source`` and print one JSON line of figures."""
    import torch  # noqa: F401  (counted in the baseline, as any predictor imports it)

    from segflow.predict.config import PredictConfig
    from segflow.predict.run import predict

    base = vm_hwm_bytes()
    cfg = PredictConfig(
        models=models,
        source=source,
        out=out,
        layout="isic",
        tta=tta,
        folds=folds,
        threshold=THRESHOLD,
        postprocess="none",
        executor="inline",
        shard_size=shard,
    )
    t0 = time.perf_counter()
    result = predict(cfg)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "images": result.n_images,
                "errors": result.n_errors,
                "shards": result.n_shards,
                "seconds": round(seconds, 2),
                "images_per_s": round(result.n_images / seconds, 2),
                "peak_rss_bytes": vm_hwm_bytes(),
                "baseline_rss_bytes": base,
            }
        )
    )


def memory_run(models: str, source: Path, out: Path, args: argparse.Namespace) -> dict:
    """Predict ``source`` in a fresh subprocess (:func:`memory_child`); its figures."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        models,
        str(source),
        str(out),
        args.memory_tta,
        args.memory_folds,
        str(args.memory_shard),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(models: str, tmp: Path, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    source = tmp / "small"
    write_small_jpegs(source, args.memory)
    made = time.perf_counter() - t0
    print(f"  memory: {args.memory} 64x48 JPEGs written in {made:.1f}s", file=sys.stderr)
    rep = memory_run(models, source, tmp / "small-out", args)
    ok = rep["peak_rss_bytes"] < TARGET_RSS_BYTES and not rep["errors"]
    rep.update(
        {
            "n": args.memory,
            "tta": args.memory_tta,
            "folds": args.memory_folds,
            "shard_size": args.memory_shard,
            "pass": ok,
        }
    )
    return rep


def measure_scale(models: str, tmp: Path, args: argparse.Namespace) -> dict:
    """Peak RSS of a small and a large run of tiny PNGs, each in its own process: what
    grows with the number of inputs (plans, result lists, per-item records) shows here."""
    runs = {}
    for label, n in zip(("small", "large"), args.scale_sizes, strict=True):
        source = tmp / f"scale-{n}"
        write_small_pngs(source, n)
        rep = memory_run(models, source, tmp / f"scale-{n}-out", args)
        print(f"  scale: {n} 32x32 PNGs: {json.dumps(rep)}", file=sys.stderr)
        runs[label] = {"n": n, **rep}
    small, large = runs["small"]["peak_rss_bytes"], runs["large"]["peak_rss_bytes"]
    ratio = large / small
    growth = (large - small) / max(args.scale_sizes[1] - args.scale_sizes[0], 1)
    return {
        **runs,
        "rss_ratio": round(ratio, 4),
        "bytes_per_extra_image": round(growth, 1),
        "tta": args.memory_tta,
        "folds": args.memory_folds,
        "shard_size": args.memory_shard,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "pass": ratio <= TARGET_SCALE_RATIO
        and not runs["small"]["errors"]
        and not runs["large"]["errors"],
    }


def print_scale(scale: dict) -> None:
    s, g = scale["small"], scale["large"]
    mib = 1024**2
    print(
        f"scale: {s['n']} vs {g['n']} 32x32 PNGs: peak RSS {s['peak_rss_bytes'] / mib:.0f} vs "
        f"{g['peak_rss_bytes'] / mib:.0f} MiB ({g['images_per_s']:.1f} img/s; "
        f"{scale['bytes_per_extra_image']:.0f} B per extra image)"
    )
    ok = scale["pass"]
    print(_verdict("RSS large / small", f"{scale['rss_ratio']:.3f}", "<= 1.1", ok))


# -- report ---------------------------------------------------------------------------------------
def make_report(runs: dict[str, list[Timed]], info: dict) -> dict:
    import torch

    best = {name: max(v, key=lambda t: t.ips) for name, v in runs.items()}
    ips = {name: t.ips for name, t in best.items()}
    model_ratio = ips["segflow"] / ips["model_only"]
    naive_ratio = ips["segflow"] / ips["naive"]
    return {
        **info,
        "torch_threads": torch.get_num_threads(),
        "images_per_s": {k: round(v, 3) for k, v in ips.items()},
        "seconds": {k: round(t.seconds, 2) for k, t in best.items()},
        "all_images_per_s": {k: [round(t.ips, 3) for t in v] for k, v in runs.items()},
        "segflow_over_model_only": round(model_ratio, 4),
        "segflow_over_naive": round(naive_ratio, 4),
        "pass_model_ratio": model_ratio >= TARGET_MODEL_RATIO,
        "pass_naive": naive_ratio > 1.0,
    }


def print_report(rep: dict) -> None:
    h, w = rep["size"]
    print(
        f"predict: Unet {rep['encoder']} {h}x{w}, {len(rep['folds'])} folds x tta "
        f"{rep['tta']}, batch {rep['batch_size']}, best of {rep['repeats']}"
    )
    print(
        f"inputs: {rep['n_inputs']} JPEGs ({rep['n_files']} files x {rep['replicate']}), "
        f"{rep['min_pixels']}..{rep['max_pixels']} pixels, {rep['source']}"
    )
    print(f"device: {rep['device']}, torch threads: {rep['torch_threads']}, cpus: {rep['cpus']}")
    labels = {
        "segflow": "segflow (end to end)",
        "naive": "naive loop",
        "model_only": "model-only (bound)",
    }
    for k, label in labels.items():
        print(f"{label:24}{rep['images_per_s'][k]:10.2f} img/s  ({rep['seconds'][k]:.1f}s)")
    print(
        _verdict(
            "segflow / model-only",
            f"{rep['segflow_over_model_only']:.3f}",
            f">= {TARGET_MODEL_RATIO}",
            rep["pass_model_ratio"],
        )
    )
    print(_verdict("segflow / naive", f"{rep['segflow_over_naive']:.3f}", "> 1", rep["pass_naive"]))


def print_memory(mem: dict) -> None:
    gib = mem["peak_rss_bytes"] / 1024**3
    print(
        f"memory: {mem['images']} of {mem['n']} 64x48 JPEGs, folds {mem['folds']} x tta "
        f"{mem['tta']}, shard {mem['shard_size']}: {mem['images_per_s']:.1f} img/s "
        f"({mem['seconds']:.1f}s), baseline RSS "
        f"{mem['baseline_rss_bytes'] / 1024**2:.0f} MiB"
    )
    print(_verdict("peak RSS (VmHWM)", f"{gib:.3f} GiB", "< 2 GiB", mem["pass"]))


def _verdict(label: str, value: str, target: str, ok: bool) -> str:
    return f"{label:24}{value:>10}  (target {target})  {'PASS' if ok else 'FAIL'}"


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="URL of trained models to reuse (default: train a tiny set)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(256, 256),
        metavar=("H", "W"),
        help="ingest/model size of the tiny ensemble",
    )
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--folds", type=int, default=2, help="folds of the tiny ensemble")
    p.add_argument("--train-n", type=int, default=32, help="demo images to train on")
    p.add_argument("--tta", default="flips", choices=("none", "flips", "d4"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--replicate", type=int, default=1, help="copies of each full-res JPEG")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per way; best is kept")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--memory", type=int, default=0, help="peak RSS over N small images")
    p.add_argument(
        "--memory-tta",
        default="none",
        choices=("none", "flips", "d4"),
        help="TTA of the memory run (default none: it is about memory)",
    )
    p.add_argument("--memory-folds", default="0", help="folds of the memory run ('all' or 0,1)")
    p.add_argument("--memory-shard", type=int, default=64, help="shard size of the memory run")
    p.add_argument("--skip-speed", action="store_true", help="only the --memory measurement")
    p.add_argument(
        "--scale", action="store_true", help="peak RSS of a small vs a large run of 32x32 PNGs"
    )
    p.add_argument(
        "--scale-sizes",
        type=int,
        nargs=2,
        default=(2000, 20000),
        metavar=("SMALL", "LARGE"),
        help="image counts of the --scale runs",
    )
    p.add_argument("--json", action="store_true", help="print all figures as one JSON line")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("folds", "train_n", "batch_size", "replicate", "repeats", "memory_shard"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.memory < 0:
        p.error("--memory must be at least 0")
    return args


def input_info(files: list[Path], args: argparse.Namespace) -> dict:
    from PIL import Image

    pixels = []
    for f in files:
        with Image.open(f) as im:
            pixels.append(im.width * im.height)
    return {
        "n_files": len(files),
        "n_inputs": len(files) * args.replicate,
        "replicate": args.replicate,
        "min_pixels": min(pixels),
        "max_pixels": max(pixels),
        "source": str(FULLRES),
    }


def benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    import torch

    from segflow.storage import Store
    from segflow.train.model import load_spec

    rep: dict = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpus": len(os.sched_getaffinity(0)),
    }
    models = args.models
    if models is None:
        t0 = time.perf_counter()
        # --scale alone: a tiny model at 32x32 (one fold), the inputs' own size
        only_scale = args.scale and args.skip_speed and not args.memory
        tiny = {"size": (32, 32), "folds": 2, "train_n": 16} if only_scale else {}
        models = build_models(tmp, argparse.Namespace(**{**vars(args), **tiny}))
        print(
            f"  models: tiny ensemble trained in {time.perf_counter() - t0:.1f}s", file=sys.stderr
        )
    from segflow.predict.ensemble import finished_folds

    folds = finished_folds(Store(models))
    spec = load_spec(Store(models).child(f"fold-{folds[0]}"))
    rep.update(
        {
            "models": args.models or "tiny ensemble (temporary)",
            "folds": folds,
            "encoder": spec.encoder,
            "size": list(spec.input_size),
            "tta": args.tta,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
        }
    )
    files = fullres_files()
    if args.skip_speed:
        rep["speed"] = "skipped (--skip-speed)"
    elif not files:
        rep["speed"] = f"skipped: no full-res JPEGs under {FULLRES}"
        print(f"  {rep['speed']}", file=sys.stderr)
    else:
        rep.update(input_info(files, args))
        rep = make_report(measure(models, files, tmp, args), rep)
    if args.memory:
        rep["memory"] = measure_memory(models, tmp, args)
    if args.scale:
        rep["scale"] = measure_scale(models, tmp, args)
    return rep


def passed(rep: dict) -> bool:
    ok = [rep.get("pass_model_ratio", True), rep.get("pass_naive", True)]
    return (
        all(ok)
        and rep.get("memory", {}).get("pass", True)
        and rep.get("scale", {}).get("pass", True)
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.memory_child:
        models, source, out, tta, folds, shard = args.memory_child
        memory_child(models, source, out, tta, folds, int(shard))
        return
    with tempfile.TemporaryDirectory(prefix="segflow-bench-predict-") as tmp:
        rep = benchmark(args, Path(tmp))
    if "images_per_s" in rep:
        print_report(rep)
    else:
        print(f"predict: {rep['speed']}")
    if "memory" in rep:
        print_memory(rep["memory"])
    if "scale" in rep:
        print_scale(rep["scale"])
    if args.json:
        print(json.dumps(rep))
    if args.check and not passed(rep):
        sys.exit(1)


if __name__ == "__main__":
    main()
