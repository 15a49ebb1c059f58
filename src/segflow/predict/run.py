"""``predict()``: the fold ensemble + TTA over a dataset or a raw archive, in resumable shards.

* Inputs are listed, then packed into shards of ``shard_size`` recorded in
  ``out/_shards/manifest.json``: existing shards keep their items, new inputs go to new
  shards, so a rerun does only unfinished or new shards.
* A shard's masks are written first, its done-marker last (``_shards/shard-<k>.complete.json``).
* Each worker (a Ray actor, or the driver with ``executor="inline"``) loads the ensemble once;
  threads decode ahead of the model and write masks behind it, off the model's path.
* Masks are PNG 0/255 at the original resolution: the probability frame is mapped back
  through the inverse of the ingest resize policy, then thresholded and post-processed.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from segflow import png
from segflow.cluster import cpu_count
from segflow.errors import InputError
from segflow.geometry import Placement, place
from segflow.imaging import IMAGE_SUFFIXES, Rejected, decode_image, image_to_frame
from segflow.predict.config import PredictConfig
from segflow.predict.ensemble import Ensemble, load_ensemble
from segflow.predict.postprocess import full_size_mask
from segflow.storage import StorageOptions, Store, sha256_json

log = logging.getLogger("segflow.predict")
SHARDS = "_shards"
MANIFEST = f"{SHARDS}/manifest.json"
_MASK_HINTS = ("_segmentation", "_mask", "_superpixels")


@dataclass
class PredictResult:
    out: str
    n_images: int
    n_shards: int
    shards_run: int
    n_errors: int
    folds: list[int]
    tta: str
    threshold: float
    postprocess: str
    images_per_s: float
    seconds: float
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- inputs -------------------------------------------------------------------------------------
def list_inputs(cfg: PredictConfig) -> list[list[str]]:
    """``[id, ref, output name, fingerprint]`` for every input, sorted by id; ``ref`` is a row
    index (as a string) for a dataset, or a path relative to the source; ``fingerprint``
    changes when the input's content may have (the row's content hash, or the object's
    ETag/mtime and size)."""
    if cfg.dataset:
        from segflow.dataset import Dataset

        ds = Dataset(Store(cfg.dataset, cfg.storage))
        isic = ds.attrs.get("layout") == "isic"
        hashes = ds.column("content_hashes")
        return [[i, str(k), _out_name(i, isic), str(hashes[k])] for k, i in enumerate(ds.ids)]
    import fnmatch

    items = []
    for f in Store(cfg.source, cfg.storage).list():  # type: ignore[arg-type]
        stem, ext = posixpath.splitext(f.rel)
        if ext.lower() not in IMAGE_SUFFIXES or any(h in stem.lower() for h in _MASK_HINTS):
            continue
        if cfg.layout == "folder" and not fnmatch.fnmatch(f.rel, cfg.image_glob):
            continue
        image_id = posixpath.basename(stem) if cfg.layout != "folder" else stem
        items.append([image_id, f.rel, _out_name(image_id, cfg.layout == "isic"), f.fingerprint])
    if not items:
        raise InputError(f"no images found under {cfg.source} (layout {cfg.layout})")
    return sorted(items)


def _out_name(image_id: str, isic: bool) -> str:
    return f"{image_id}_segmentation.png" if isic else f"{image_id}.png"


def plan_shards(out: Store, items: list[list[str]], size: int) -> list[dict[str, Any]]:
    """Keep the shards already planned; pack inputs not in any shard into new ones. An input
    whose fingerprint changed stays in its shard, and that shard is marked to run again."""
    manifest = out.read_json(MANIFEST) if out.exists(MANIFEST) else {"shards": []}
    shards = manifest["shards"]
    where = {item[0]: (s, j) for s in shards for j, item in enumerate(s["items"])}
    fresh, changed = [], set()
    for it in items:
        if it[0] not in where:
            fresh.append(it)
            continue
        shard, j = where[it[0]]
        if shard["items"][j] != it:  # moved or rewritten since it was predicted
            shard["items"][j] = it
            changed.add(shard["shard"])
    for start in range(0, len(fresh), size):
        shards.append({"shard": len(shards), "items": fresh[start : start + size]})
    if fresh or changed or not out.exists(MANIFEST):
        out.write_json(MANIFEST, {"shard_size": size, "shards": shards})
    for k in sorted(changed):  # after the manifest: a crash in between reruns, never skips
        out.clear_marker(shard_marker(k))
    return shards


def shard_marker(k: int) -> str:
    return f"{SHARDS}/shard-{k:05d}"


# -- one shard ----------------------------------------------------------------------------------
@dataclass
class ShardContext:
    cfg: PredictConfig
    threshold: float
    postprocess: str


def run_shard(ctx: ShardContext, ensemble: Ensemble, shard: dict[str, Any]) -> dict[str, Any]:
    """Predict one shard and commit it; returns its done-marker payload."""
    cfg, out = ctx.cfg, Store(ctx.cfg.out, ctx.cfg.storage)
    t0 = time.perf_counter()
    threads = cfg.io_threads or max(2, cpu_count())
    outputs, errors, probs_rows = [], [], []
    with ThreadPoolExecutor(threads) as readers, ThreadPoolExecutor(threads) as writers:
        pending = []
        for batch in _batches(readers, ctx, ensemble, shard["items"]):
            good = [b for b in batch if "error" not in b]
            errors += [{"id": b["id"], "error": b["error"]} for b in batch if "error" in b]
            if not good:
                continue
            probs = ensemble.predict(np.stack([b["frame"] for b in good]), cfg.tta)
            for b, p in zip(good, probs, strict=True):
                pending.append(writers.submit(_write_mask, out, ctx, b, p))
                if cfg.save_probabilities:
                    probs_rows.append((b, p))
        outputs = [f.result() for f in pending]
    if cfg.save_probabilities and probs_rows:
        _write_probabilities(out, shard["shard"], probs_rows)
    seconds = time.perf_counter() - t0
    payload = {"shard": shard["shard"], "outputs": outputs, "errors": errors, "seconds": seconds}
    out.mark_complete(shard_marker(shard["shard"]), payload)  # last: the shard is done
    return payload


def _batches(pool, ctx: ShardContext, ensemble: Ensemble, items) -> Iterator[list[dict]]:
    """Decoded inputs in model batches; the pool decodes a few batches ahead."""
    size = ctx.cfg.batch_size
    ahead = size * 3
    futures = [pool.submit(_load, ctx, ensemble, it) for it in items[:ahead]]
    nxt = ahead
    batch: list[dict] = []
    for i in range(len(items)):
        batch.append(futures[i].result())
        futures[i] = None  # type: ignore[call-overload]  # free the frame once consumed
        if nxt < len(items):
            futures.append(pool.submit(_load, ctx, ensemble, items[nxt]))
            nxt += 1
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _load(ctx: ShardContext, ensemble: Ensemble, item: list[str]) -> dict[str, Any]:
    image_id, ref, name = item[:3]  # [3], the fingerprint, only matters to the planner
    spec = ensemble.spec
    try:
        if ctx.cfg.dataset:
            return _load_row(ctx, image_id, int(ref), name)
        store = Store(ctx.cfg.source, ctx.cfg.storage)  # type: ignore[arg-type]
        img = decode_image(
            store.read_bytes(ref), ref, ctx.cfg.max_pixels, spec.dataset_size, spec.resize
        )  # type: ignore[arg-type]
        placement = place(img.orig_size, spec.dataset_size, spec.resize)  # type: ignore[arg-type]
        return {"id": image_id, "name": name, "frame": image_to_frame(img, placement),
                "placement": placement}  # fmt: skip
    except Rejected as r:
        return {"id": image_id, "error": f"{r.reason}: {r.detail}"}
    except Exception as e:  # one bad input never stops a shard
        return {"id": image_id, "error": f"{type(e).__name__}: {e}"}


@functools.lru_cache(maxsize=4)
def _dataset_group(url: str, storage: StorageOptions):
    """Opened once per process: every row of a shard reads from the same group."""
    from segflow.dataset import open_group

    return open_group(Store(url, storage))


def _load_row(ctx: ShardContext, image_id: str, row: int, name: str) -> dict[str, Any]:
    group = _dataset_group(ctx.cfg.dataset, ctx.cfg.storage)  # type: ignore[arg-type]
    size = tuple(group.attrs["size"])
    orig = tuple(int(v) for v in group["orig_size"][row])
    box = tuple(int(v) for v in group["pad_box"][row])
    placement = Placement(size, orig, box)  # type: ignore[arg-type]
    return {"id": image_id, "name": name, "frame": group["images"][row], "placement": placement}


def _write_mask(out: Store, ctx: ShardContext, item: dict, prob: np.ndarray) -> dict[str, Any]:
    mask = full_size_mask(prob, item["placement"], ctx.threshold, ctx.postprocess)
    rel = f"masks/{item['name']}"
    # segflow.png: ~20x faster than Pillow on a 6 MP mask (2.5 vs 50 ms), within 5% of its size
    out.write_bytes(rel, png.encode(mask.astype(np.uint8) * 255), durable=False)
    return {"id": item["id"], "mask": rel, "foreground": float(mask.mean())}


def _write_probabilities(out: Store, shard: int, rows: list[tuple[dict, np.ndarray]]) -> None:
    """uint8 probabilities (x255) in the dataset frame, one array per shard (one writer)."""
    import zarr

    group = zarr.open_group(out.zarr_store(), mode="a")
    data = np.stack([np.round(p * 255).astype(np.uint8) for _, p in rows])
    name = f"probabilities.zarr/shard-{shard:05d}"
    arr = group.create_array(name, shape=data.shape, chunks=(1, *data.shape[1:]), dtype="uint8",
                             overwrite=True)  # fmt: skip
    arr[:] = data
    arr.attrs.update({
        "ids": [b["id"] for b, _ in rows], "scale": 1 / 255,
        "orig_size": [list(b["placement"].orig_size) for b, _ in rows],
        "pad_box": [list(b["placement"].pad_box) for b, _ in rows],
    })  # fmt: skip


# -- the whole run ------------------------------------------------------------------------------
def resolve_choice(cfg: PredictConfig) -> tuple[float, str]:
    """The threshold and post-processing: given, or chosen on out-of-fold probabilities."""
    threshold, method = cfg.threshold, cfg.postprocess
    if threshold == "auto" or method == "auto":
        models = Store(cfg.models, cfg.storage)
        if models.exists("postprocess.json"):
            choice = models.read_json("postprocess.json")
        else:
            from segflow.predict.postprocess import choose_from_models

            train_cfg = models.read_json("train_config.json")
            choice = asdict(choose_from_models(cfg.models, train_cfg["dataset"], cfg.storage))
        threshold = choice["threshold"] if threshold == "auto" else threshold
        method = choice["postprocess"] if method == "auto" else method
    return float(threshold), str(method)


def plan_prediction(cfg: PredictConfig) -> tuple[list[dict[str, Any]], ShardContext]:
    """List the inputs, (re)plan the shards, and resolve the threshold and post-processing."""
    _dataset_group.cache_clear()  # a dataset may have grown since an earlier run in this process
    items = list_inputs(cfg)
    out = Store(cfg.out, cfg.storage)
    shards = plan_shards(out, items, cfg.shard_size)
    threshold, method = resolve_choice(cfg)
    _forget_other_models(out, shards, _identity(cfg, threshold, method))
    return shards, ShardContext(cfg, threshold, method)


def _identity(cfg: PredictConfig, threshold: float, method: str) -> dict[str, Any]:
    """What decides every mask besides its input: the trained folds (their done-markers
    change on retraining), the TTA and the threshold / post-processing choice."""
    models = Store(cfg.models, cfg.storage)
    markers = sorted(models.fs.glob(models.path("fold-*/fold.complete.json")))
    return {
        "models": models.url, "folds": cfg.folds, "tta": cfg.tta, "threshold": threshold,
        "postprocess": method, "ensemble": sha256_json([models.fs.cat_file(m) for m in markers]),
    }  # fmt: skip


def _forget_other_models(out: Store, shards: list[dict], identity: dict[str, Any]) -> None:
    """Masks written by another model (or choice) are stale: every shard runs again."""
    rel = f"{SHARDS}/identity.json"
    if out.exists(rel) and out.read_json(rel) == identity:
        return
    for s in shards:
        out.clear_marker(shard_marker(s["shard"]))
    out.write_json(rel, identity)


def pending_shards(cfg: PredictConfig, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = Store(cfg.out, cfg.storage)
    return [s for s in shards if out.read_marker(shard_marker(s["shard"])) is None]


def predict(cfg: PredictConfig, progress: Callable[[int, int, float], None] | None = None):
    t0 = time.perf_counter()
    shards, ctx = plan_prediction(cfg)
    todo = pending_shards(cfg, shards)
    todo_images = sum(len(s["items"]) for s in todo)
    log.info("predict: %d shards, %d to run (%d images)", len(shards), len(todo), todo_images)
    done_images = 0

    def report(payload: dict[str, Any]) -> None:
        nonlocal done_images
        done_images += len(payload["outputs"]) + len(payload["errors"])
        rate = done_images / max(time.perf_counter() - t0, 1e-9)
        log.info("predict: %d/%d images (%.1f img/s)", done_images, todo_images, rate)
        if progress:
            progress(done_images, todo_images, rate)

    folds = _run(cfg, ctx, todo, report)
    return summarize(ctx, shards, folds, len(todo), done_images, time.perf_counter() - t0)


def summarize(
    ctx: ShardContext, shards: list[dict], folds: list[int], shards_run: int, images_run: int,
    seconds: float,
) -> PredictResult:  # fmt: skip
    """Gather the shards' markers into ``predictions.json`` (written last)."""
    cfg, out = ctx.cfg, Store(ctx.cfg.out, ctx.cfg.storage)
    markers = [out.read_marker(shard_marker(s["shard"])) or {} for s in shards]
    errors = [e for m in markers for e in m.get("errors", [])]
    result = PredictResult(
        out=out.url, n_images=sum(len(m.get("outputs", [])) for m in markers),
        n_shards=len(shards), shards_run=shards_run, n_errors=len(errors), folds=folds,
        tta=cfg.tta, threshold=ctx.threshold, postprocess=ctx.postprocess,
        images_per_s=round(images_run / seconds, 2) if shards_run else 0.0,
        seconds=round(seconds, 2), errors=errors[:100],
    )  # fmt: skip
    out.write_json("predictions.json", {**result.to_dict(), "config": cfg.public_dict()})
    return result


def _run(cfg: PredictConfig, ctx: ShardContext, todo: list[dict], report) -> list[int]:
    if cfg.executor == "inline" or not todo:
        ensemble = load_ensemble(Store(cfg.models, cfg.storage), cfg.fold_list())
        for shard in todo:
            report(run_shard(ctx, ensemble, shard))
        return ensemble.folds
    from segflow.predict.workers import run_on_ray

    return run_on_ray(cfg, ctx, todo, report)
