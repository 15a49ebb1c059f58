"""``predict()``: the fold ensemble + TTA over a dataset or a raw archive, in resumable shards.

* Inputs are listed page by page, then packed into shards of ``shard_size``, recorded in a
  sharded manifest (``out/_shards/manifest.json``, an index, and one items file per shard:
  :mod:`segflow.predict.manifest`): existing shards keep their items, new inputs go to new
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

import fnmatch
import logging
import posixpath
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from segflow.errors import InputError
from segflow.imaging import IMAGE_SUFFIXES
from segflow.predict.config import PredictConfig
from segflow.predict.ensemble import load_ensemble
from segflow.predict.manifest import Item, ShardRef, plan, read_shard
from segflow.predict.outputs import RECORD, mask_layout, mask_name
from segflow.predict.postprocess import resolve_choice, review_threshold
from segflow.predict.shard import MANIFEST, SHARDS, ShardContext, run_shard, shard_marker
from segflow.predict.table import SUMMARY, RunColumns, concatenate, rejected_row
from segflow.predict.workers import planned_weights
from segflow.progress import ProgressFigures, progress_figures
from segflow.storage import FileInfo, StorageOptions, Store, sha256_json

__all__ = [
    "MANIFEST",
    "Lister",
    "PredictResult",
    "ShardContext",
    "list_inputs",
    "list_source",
    "pending_shards",
    "plan_prediction",
    "predict",
    "read_shard",
    "shard_marker",
    "summarize",
]

log = logging.getLogger("segflow.predict")
REVIEW_K = 16  # the most uncertain images a run lists (and its review gallery shows)
_MASK_HINT = re.compile("_segmentation|_mask|_superpixels", re.IGNORECASE)


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

    items: Iterable[Item]  # any order, streamed; an id twice: the first in path order is kept
    rejected: list[dict[str, str]]
    layout: str  # the masks' naming


#: how a run lists its source: ``(url, storage) -> FileInfo``s, sorted or not (the seam that
#: benchmarks/plan.py feeds a synthetic million-object listing through)
Lister = Callable[[str, StorageOptions], Iterable[FileInfo]]


def list_source(url: str, storage: StorageOptions) -> Iterator[FileInfo]:
    """The source's objects, one listing page at a time."""
    for page in Store(url, storage).iter_list():
        yield from page


# -- inputs -------------------------------------------------------------------------------------
def list_inputs(cfg: PredictConfig, lister: Lister | None = None) -> Inputs:
    """``[id, ref, output name, fingerprint]`` for every input, streamed; ``ref`` is a row
    index (as a string) for a dataset, or a path relative to the source; ``fingerprint``
    changes when the input's content may have (the row's content hash, or the object's
    ETag/mtime and size)."""
    if cfg.dataset:
        from segflow.dataset import Dataset

        ds = Dataset(Store(cfg.dataset, cfg.storage))
        layout = mask_layout(str(ds.attrs.get("layout")))
        hashes = ds.column("content_hashes")
        items = ([i, str(k), mask_name(i, layout), str(hashes[k])] for k, i in enumerate(ds.ids))
        return Inputs(items, [], layout)
    layout = mask_layout(cfg.layout)
    if cfg.image_pattern or cfg.pairs:  # the same pairing options as ingest and evaluate
        from segflow.pairing import list_images

        named, rejected = list_images(
            str(cfg.source), cfg.storage, cfg.image_glob, cfg.image_pattern, cfg.pairs
        )
        # repeated ids are settled by the plan, as for a plain listing (first path wins)
        items = ([i, r, mask_name(i, layout), fp] for i, r, fp in named)
        return Inputs(items, rejected, layout)
    return Inputs(_source_items(cfg, layout, lister or list_source), [], layout)


def _source_items(cfg: PredictConfig, layout: str, lister: Lister) -> Iterator[Item]:
    found = 0
    for f in lister(cfg.source, cfg.storage):  # type: ignore[arg-type]
        item = input_item(cfg, layout, f)
        if item is not None:
            found += 1
            yield item
    if not found:
        raise InputError(f"no images found under {cfg.source} (layout {cfg.layout})")


def input_item(cfg: PredictConfig, layout: str, f: FileInfo) -> Item | None:
    """The decision for one listed file: its item, or ``None`` when it is not an input."""
    stem, ext = posixpath.splitext(f.rel)
    if ext.lower() not in IMAGE_SUFFIXES or _MASK_HINT.search(stem):
        return None
    if cfg.layout == "folder" and not fnmatch.fnmatch(f.rel, cfg.image_glob):
        return None
    image_id = posixpath.basename(stem) if cfg.layout != "folder" else stem
    return [image_id, f.rel, mask_name(image_id, layout), f.fingerprint]


def plan_shards(out: Store, inputs: Inputs, size: int) -> list[ShardRef]:
    """Keep the shards already planned; pack inputs not in any shard into new ones (sorted by
    id). An input whose fingerprint changed stays in its shard, and that shard is marked to
    run again. Streams (see :mod:`segflow.predict.manifest`); returns each shard's
    ``{"shard", "n", "hash"}``, whose items :func:`read_shard` loads."""
    result = plan(out, inputs.items, inputs.rejected, inputs.layout, size)
    for r in result.rejected[:100]:
        log.warning("predict: %s not predicted: %s", r["file"], r.get("detail", r["reason"]))
    return result.shards


# -- the whole run ------------------------------------------------------------------------------
def plan_prediction(
    cfg: PredictConfig, lister: Lister | None = None
) -> tuple[list[ShardRef], ShardContext]:
    """List the inputs, (re)plan the shards, and resolve the threshold and post-processing."""
    from segflow.predict.shard import _dataset_group

    _dataset_group.cache_clear()  # a dataset may have grown since an earlier run in this process
    out = Store(cfg.out, cfg.storage)
    shards = plan_shards(out, list_inputs(cfg, lister), cfg.shard_size)
    threshold, method = resolve_choice(cfg.models, cfg.storage, cfg.threshold, cfg.postprocess)
    _forget_other_models(out, shards, _identity(cfg, threshold, method))
    return shards, ShardContext(cfg, threshold, method, planned_weights(cfg))


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


def pending_shards(cfg: PredictConfig, shards: list[ShardRef]) -> list[ShardRef]:
    out = Store(cfg.out, cfg.storage)
    return [s for s in shards if out.read_marker(shard_marker(s["shard"])) is None]


def predict(
    cfg: PredictConfig,
    progress: Callable[[ProgressFigures], None] | None = None,
    model_version: str | None = None,
) -> PredictResult:
    """``progress`` gets the count, rate and ETA over the whole archive as each shard ends."""
    t0 = time.perf_counter()
    shards, ctx = plan_prediction(cfg)
    todo = pending_shards(cfg, shards)
    total = sum(s["n"] for s in shards)
    todo_images = sum(s["n"] for s in todo)
    log.info("predict: %d shards, %d to run (%d images)", len(shards), len(todo), todo_images)
    done_images = 0
    folds: list[int] = []
    started = time.perf_counter()

    def report(payload: dict[str, Any]) -> None:
        nonlocal done_images, folds
        folds = payload.get("folds", folds)
        done_images += len(payload["outputs"]) + len(payload["errors"])
        seconds = time.perf_counter() - started
        fig = progress_figures(total - todo_images + done_images, total, done_images, seconds)
        log.info("predict: %s", fig.line())
        if progress:
            progress(fig)

    if cfg.executor == "inline" or not todo:
        ensemble = load_ensemble(Store(cfg.models, cfg.storage), cfg.fold_list())
        folds = ensemble.folds
        for ref in todo:  # one shard's items in memory at a time
            report(run_shard(ctx, ensemble, read_shard(ctx.out, ref)))
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
        rejected_row(r["id"], input_url(cfg, r["file"]), f"{r['reason']}: {r.get('detail', '')}")
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
