"""``predict()``: the fold ensemble + TTA over a dataset or a raw archive, in resumable shards.

* Inputs are listed, then packed into shards of ``shard_size`` recorded in
  ``out/_shards/manifest.json``: existing shards keep their items, new inputs go to new
  shards, so a rerun does only unfinished or new shards. Two inputs with one id (``a.jpg``,
  ``a.png``) would write one mask: the first in path order is predicted, the others are
  reported as ``duplicate_id``, as ingest does.
* A shard (:mod:`segflow.predict.shard`) writes its masks first, its done-marker last
  (``_shards/shard-<k>.complete.json``).
* Each worker (a Ray task, :mod:`segflow.predict.workers`, or the driver with
  ``executor="inline"``) loads the ensemble once; threads decode ahead of the model and write
  masks behind it, off the model's path.
* Masks are PNG 0/255 at the original resolution: the probability frame is mapped back
  through the inverse of the ingest resize policy, then thresholded and post-processed.
* ``predictions.json`` (written last) is the run's record; it says how the masks are named
  (``layout``), which the later stages read (:mod:`segflow.predict.outputs`).
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from segflow.errors import InputError
from segflow.imaging import IMAGE_SUFFIXES
from segflow.predict.config import PredictConfig
from segflow.predict.ensemble import load_ensemble
from segflow.predict.outputs import RECORD, mask_layout, mask_name
from segflow.predict.postprocess import resolve_choice, review_threshold
from segflow.predict.shard import MANIFEST, SHARDS, ShardContext, run_shard, shard_marker
from segflow.predict.table import SUMMARY, RunColumns, concatenate, rejected_row
from segflow.storage import Store, sha256_json

__all__ = [
    "MANIFEST",
    "PredictResult",
    "ShardContext",
    "pending_shards",
    "plan_prediction",
    "predict",
    "shard_marker",
    "summarize",
]

log = logging.getLogger("segflow.predict")
REVIEW_K = 16  # the most uncertain images a run lists (and its review gallery shows)
_MASK_HINTS = ("_segmentation", "_mask", "_superpixels")

Item = list[str]  # [id, ref, output name, fingerprint]


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
    layout: str = "folder"  # the masks' naming: isic (<id>_segmentation.png) or folder (<id>.png)
    n_rejected: int = 0  # inputs not predicted (duplicate_id)
    errors: list[dict[str, str]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)  # {file, id, reason, detail}
    model_version: str | None = None
    table: str | None = None  # the per-image QA table, summary.parquet (+ summary.csv)
    n_review: int | None = None  # rows flagged needs_review (None: no calibration)
    review_threshold: float | None = None
    most_uncertain: list[dict[str, Any]] = field(default_factory=list)  # REVIEW_K, top first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Inputs:
    """What a run predicts, and what it leaves out with a reason."""

    items: list[Item]  # sorted by id, ids unique
    rejected: list[dict[str, str]]
    layout: str  # the masks' naming


# -- inputs -------------------------------------------------------------------------------------
def list_inputs(cfg: PredictConfig) -> Inputs:
    """``[id, ref, output name, fingerprint]`` for every input, sorted by id; ``ref`` is a row
    index (as a string) for a dataset, or a path relative to the source; ``fingerprint``
    changes when the input's content may have (the row's content hash, or the object's
    ETag/mtime and size)."""
    if cfg.dataset:
        from segflow.dataset import Dataset

        ds = Dataset(Store(cfg.dataset, cfg.storage))
        layout = mask_layout(str(ds.attrs.get("layout")))
        hashes = ds.column("content_hashes")
        items = [[i, str(k), mask_name(i, layout), str(hashes[k])] for k, i in enumerate(ds.ids)]
        return Inputs(items, [], layout)
    import fnmatch

    layout = mask_layout(cfg.layout)
    found = []
    for f in Store(cfg.source, cfg.storage).list():  # type: ignore[arg-type]
        stem, ext = posixpath.splitext(f.rel)
        if ext.lower() not in IMAGE_SUFFIXES or any(h in stem.lower() for h in _MASK_HINTS):
            continue
        if cfg.layout == "folder" and not fnmatch.fnmatch(f.rel, cfg.image_glob):
            continue
        image_id = posixpath.basename(stem) if cfg.layout != "folder" else stem
        found.append([image_id, f.rel, mask_name(image_id, layout), f.fingerprint])
    if not found:
        raise InputError(f"no images found under {cfg.source} (layout {cfg.layout})")
    items, rejected = _drop_duplicates(found)
    for r in rejected:
        log.warning("predict: %s not predicted: %s", r["file"], r["detail"])
    return Inputs(items, rejected, layout)


def _drop_duplicates(found: list[Item]) -> tuple[list[Item], list[dict[str, str]]]:
    """The first input of each id in path order; the others as ``duplicate_id``. Two files
    of one id would write one mask, and which one survived would depend on a thread race."""
    first: dict[str, Item] = {}
    rejected = []
    for it in sorted(found, key=lambda it: (it[0], it[1])):
        kept = first.setdefault(it[0], it)
        if kept is not it:
            detail = f"id {it[0]} is also {kept[1]}, which is predicted"
            rejected.append(
                {"file": it[1], "id": it[0], "reason": "duplicate_id", "detail": detail}
            )
    return sorted(first.values()), rejected


def plan_shards(out: Store, inputs: Inputs, size: int) -> list[dict[str, Any]]:
    """Keep the shards already planned; pack inputs not in any shard into new ones. An input
    whose fingerprint changed stays in its shard, and that shard is marked to run again."""
    manifest = out.read_json(MANIFEST) if out.exists(MANIFEST) else {"shards": []}
    shards = manifest["shards"]
    changed = _drop_repeated_ids(shards)
    where = {item[0]: (s, j) for s in shards for j, item in enumerate(s["items"])}
    fresh = []
    for it in inputs.items:
        if it[0] not in where:
            fresh.append(it)
            continue
        shard, j = where[it[0]]
        if shard["items"][j] != it:  # moved or rewritten since it was predicted
            shard["items"][j] = it
            changed.add(shard["shard"])
    for start in range(0, len(fresh), size):
        shards.append({"shard": len(shards), "items": fresh[start : start + size]})
    new = {
        "shard_size": size,
        "shards": shards,
        "rejected": inputs.rejected,
        "layout": inputs.layout,
    }
    if fresh or changed or any(manifest.get(k) != new[k] for k in ("rejected", "layout")):
        out.write_json(MANIFEST, new)
    for k in sorted(changed):  # after the manifest: a crash in between reruns, never skips
        out.clear_marker(shard_marker(k))
    return shards


def _drop_repeated_ids(shards: list[dict[str, Any]]) -> set[int]:
    """Manifests written before duplicate ids were refused may hold an id twice: keep its
    first entry; the shards that lose one run again."""
    seen: set[str] = set()
    changed = set()
    for s in shards:
        kept = [it for it in s["items"] if not (it[0] in seen or seen.add(it[0]))]
        if len(kept) < len(s["items"]):
            s["items"] = kept
            changed.add(s["shard"])
    return changed


# -- the whole run ------------------------------------------------------------------------------
def plan_prediction(cfg: PredictConfig) -> tuple[list[dict[str, Any]], ShardContext]:
    """List the inputs, (re)plan the shards, and resolve the threshold and post-processing."""
    from segflow.predict.shard import _dataset_group

    _dataset_group.cache_clear()  # a dataset may have grown since an earlier run in this process
    out = Store(cfg.out, cfg.storage)
    shards = plan_shards(out, list_inputs(cfg), cfg.shard_size)
    threshold, method = resolve_choice(cfg.models, cfg.storage, cfg.threshold, cfg.postprocess)
    _forget_other_models(out, shards, _identity(cfg, threshold, method))
    return shards, ShardContext(cfg, threshold, method)


def _identity(cfg: PredictConfig, threshold: float, method: str) -> dict[str, Any]:
    """What decides every mask besides its input: the trained folds (their done-markers
    change on retraining), the TTA and the threshold / post-processing choice."""
    models = Store(cfg.models, cfg.storage)
    markers = sorted(models.fs.glob(models.path("fold-*/fold.complete.json")))
    return {
        "models": models.url,
        "folds": cfg.folds,
        "tta": cfg.tta,
        "threshold": threshold,
        "postprocess": method,
        "ensemble": sha256_json([models.fs.cat_file(m) for m in markers]),
    }


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


def predict(
    cfg: PredictConfig,
    progress: Callable[[int, int, float], None] | None = None,
    model_version: str | None = None,
) -> PredictResult:
    t0 = time.perf_counter()
    shards, ctx = plan_prediction(cfg)
    todo = pending_shards(cfg, shards)
    todo_images = sum(len(s["items"]) for s in todo)
    log.info("predict: %d shards, %d to run (%d images)", len(shards), len(todo), todo_images)
    done_images = 0
    folds: list[int] = []

    def report(payload: dict[str, Any]) -> None:
        nonlocal done_images, folds
        folds = payload.get("folds", folds)
        done_images += len(payload["outputs"]) + len(payload["errors"])
        rate = done_images / max(time.perf_counter() - t0, 1e-9)
        log.info("predict: %d/%d images (%.1f img/s)", done_images, todo_images, rate)
        if progress:
            progress(done_images, todo_images, rate)

    if cfg.executor == "inline" or not todo:
        ensemble = load_ensemble(Store(cfg.models, cfg.storage), cfg.fold_list())
        folds = ensemble.folds
        for shard in todo:
            report(run_shard(ctx, ensemble, shard))
    else:
        from segflow.predict.workers import run_on_ray

        run_on_ray(ctx, todo, report)
    seconds = time.perf_counter() - t0
    return summarize(ctx, shards, folds, len(todo), done_images, seconds, model_version)


def summarize(
    ctx: ShardContext,
    shards: list[dict],
    folds: list[int],
    shards_run: int,
    images_run: int,
    seconds: float,
    model_version: str | None = None,
) -> PredictResult:
    """Gather the shards' markers into ``predictions.json`` (written last), and their rows
    into the QA table (``summary.parquet`` + ``summary.csv``, :mod:`segflow.predict.table`)."""
    from segflow.predict.shard import input_url, shard_table

    cfg, out = ctx.cfg, ctx.out
    manifest = out.read_json(MANIFEST) if out.exists(MANIFEST) else {}
    markers = [out.read_marker(shard_marker(s["shard"])) or {} for s in shards]
    errors = [e for m in markers for e in m.get("errors", [])]
    rejected = manifest.get("rejected", [])
    review = review_threshold(cfg.models, cfg.storage)
    run_cols = RunColumns(model_version, ctx.threshold, ctx.postprocess, review)
    extra = [
        rejected_row(r["id"], input_url(cfg, r["file"]), f"{r['reason']}: {r['detail']}")
        for r in rejected
    ]
    parts = (shard_table(s["shard"]) for s in shards)
    table = concatenate(out, parts, extra, run_cols, REVIEW_K)
    result = PredictResult(
        out=out.url,
        n_images=sum(len(m.get("outputs", [])) for m in markers),
        n_shards=len(shards),
        shards_run=shards_run,
        n_errors=len(errors),
        folds=folds,
        tta=cfg.tta,
        threshold=ctx.threshold,
        postprocess=ctx.postprocess,
        images_per_s=round(images_run / seconds, 2) if shards_run else 0.0,
        seconds=round(seconds, 2),
        layout=manifest.get("layout") or mask_layout(cfg.layout),
        n_rejected=len(rejected),
        errors=errors[:100],
        rejected=rejected[:100],
        model_version=model_version,
        table=out.uri(SUMMARY),
        n_review=None if review is None else table.n_review,
        review_threshold=review,
        most_uncertain=table.most_uncertain(),
    )
    out.write_json(RECORD, {**result.to_dict(), "config": cfg.public_dict()})
    return result
