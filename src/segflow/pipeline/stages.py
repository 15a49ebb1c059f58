"""The work behind each task of the flows, as plain functions: each takes stage configs and
upstream manifests and returns a typed manifest (:mod:`segflow.pipeline.manifests`). The
``*_key`` functions give each task's cache key; each takes the task's own parameters, by the
same names (``tasks.common.stage_task`` checks that when the task is defined).

The stage functions themselves (ingest, run_fold, predict_shard, make_crops...) return their
own result types; this module is the seam that turns them into manifests.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from segflow.crops import CropsConfig, make_crops
from segflow.errors import ConfigError
from segflow.evaluate import evaluate
from segflow.ingest import IngestConfig, ingest
from segflow.pipeline.config import FlowConfig
from segflow.pipeline.keys import code_version, config_hash, listing_hash, task_key
from segflow.pipeline.manifests import (
    ChoiceManifest,
    CropsManifest,
    DatasetManifest,
    EvaluationManifest,
    FoldManifest,
    Manifest,
    OofManifest,
    OverlaysManifest,
    PredictionPlan,
    PredictionSummary,
    ResolvedVersion,
    ReviewManifest,
    ShardEntry,
    ShardManifest,
    TrainingPlan,
    VersionManifest,
)
from segflow.predict.config import PredictConfig
from segflow.predict.manifest import read_shard, shard_refs
from segflow.predict.postprocess import choose_from_models, resolve_choice
from segflow.predict.run import (
    REVIEW_K,
    ShardContext,
    _identity,
    pending_shards,
    plan_prediction,
    shard_marker,
    summarize,
)
from segflow.predict.shard import SHARDS
from segflow.predict.workers import predict_shard
from segflow.storage import StorageOptions, Store, sha256_bytes, sha256_json, sha256_object
from segflow.train import TrainConfig
from segflow.train.oof import oof_scores
from segflow.train.run import prepare_run, run_fold
from segflow.train.state import with_plan
from segflow.train.warmstart import init_hash, pin_init
from segflow.versions import record_hash, resolve_version, write_version

_LOCATIONS = frozenset({"dataset", "models"})
M = TypeVar("M", bound=Manifest)


# -- train_flow ---------------------------------------------------------------------------------
def ingest_key(cfg: IngestConfig) -> str:
    inputs = [listing_hash(Store(cfg.source, cfg.storage))]
    if cfg.masks and cfg.masks != cfg.source:
        inputs.append(listing_hash(Store(cfg.masks, cfg.storage)))
    if cfg.annotations:
        inputs.append(listing_hash(Store(cfg.annotations, cfg.storage)))
    if cfg.pairs:  # an edited pairs CSV changes the dataset, wherever the CSV lives
        inputs.append(listing_hash(Store(cfg.pairs, cfg.storage)))
    return task_key("ingest", inputs, config_hash(cfg), cfg.dataset)


def ingest_dataset(cfg: IngestConfig) -> DatasetManifest:
    res = ingest(cfg)
    return DatasetManifest(
        url=res.dataset,
        hash=res.content_hash,
        n_images=res.n_images,
        status=res.status,
        decoded=res.extra.get("decoded", 0),
        n_rejected=res.n_rejected,
        report=res.report,
    )


def training_run(flow_cfg: FlowConfig, models_url: str, dataset: DatasetManifest) -> TrainConfig:
    """The training config of this data + config + code: its run folder is named by their
    hash, so a changed input trains into a new folder and an unchanged one resumes its own."""
    probe = pin_init(flow_cfg.train_config(dataset.url, models_url), models_url)
    warm = [h] if (h := init_hash(probe)) else []  # a cold start keeps its key
    key = task_key("train", dataset.hash, config_hash(probe, _LOCATIONS), *warm)
    run = flow_cfg.train_config(dataset.url, f"{models_url.rstrip('/')}/runs/{key[-16:]}")
    return run.model_copy(update={"init_from": probe.init_from, "init_models": probe.init_models})


def prepare_key(cfg: TrainConfig, dataset: DatasetManifest) -> str:
    return task_key("train", dataset.hash, config_hash(cfg, _LOCATIONS), cfg.models)


def prepare_training(cfg: TrainConfig, dataset: DatasetManifest) -> TrainingPlan:
    folds = prepare_run(cfg)
    run = Store(cfg.models, cfg.storage)
    splits = run.read_json("splits.json")
    return TrainingPlan(
        run=run.url,
        run_key=run.url.rstrip("/").rsplit("/", 1)[-1],
        folds=folds,
        dataset=dataset,
        hash=sha256_json([dataset.hash, splits, config_hash(cfg), code_version("train")]),
    )


def fold_key(plan: TrainingPlan, fold: int) -> str:
    return task_key("train", plan.hash, fold)


def train_fold(cfg: TrainConfig, plan: TrainingPlan, fold: int) -> FoldManifest:
    result = run_fold(cfg, fold)
    run = Store(plan.run, cfg.storage)
    return FoldManifest(
        fold=fold,
        status=result.status,
        best_epoch=result.best_epoch,
        start_epoch=result.start_epoch,
        epochs_run=result.epochs_run,
        dice=result.dice,
        jaccard=result.jaccard,
        thresholded_jaccard=result.thresholded_jaccard,
        checkpoint=result.checkpoint,
        curves=run.uri(f"fold-{fold}/curves.png"),
        hash=sha256_object(run, f"fold-{fold}/best.pt"),
        placement=result.extra.get("placement"),  # Ray node + GPU slot (None: inline)
    )


def oof_key(plan: TrainingPlan, folds: list[FoldManifest]) -> str:
    return task_key("oof", plan.hash, [f.hash for f in folds])


def choose_key(plan: TrainingPlan, folds: list[FoldManifest]) -> str:
    return task_key("choose", plan.hash, [f.hash for f in folds])


def evaluate_oof(cfg: TrainConfig, plan: TrainingPlan, folds: list[FoldManifest]) -> OofManifest:
    scores = oof_scores(plan.run, plan.dataset.url, cfg.storage, cfg.threshold)
    Store(plan.run, cfg.storage).write_json("oof_scores.json", scores)
    return _manifest(OofManifest, scores)


def choose_postprocessing(
    cfg: TrainConfig, plan: TrainingPlan, folds: list[FoldManifest]
) -> ChoiceManifest:
    data = choose_from_models(plan.run, plan.dataset.url, cfg.storage).to_dict()
    return _manifest(ChoiceManifest, data)


def version_key(
    plan: TrainingPlan, folds: list[FoldManifest], oof: OofManifest, choice: ChoiceManifest
) -> str:
    return task_key("version", plan.hash, [f.hash for f in folds], oof.hash, choice.hash)


def record_version(
    cfg: TrainConfig,
    models_url: str,
    plan: TrainingPlan,
    folds: list[FoldManifest],
    oof: OofManifest,
    choice: ChoiceManifest,
) -> VersionManifest:
    """Write ``versions/<id>.json`` (see segflow.versions); the id is the run key, so the same
    data, config and code always give the same version."""
    root = Store(models_url, cfg.storage)
    vid = plan.run_key
    rel = f"versions/{vid}.json"
    created = root.read_json(rel)["created_at"] if root.exists(rel) else _now()
    scores = {
        "folds": [_fold_scores(f) for f in folds],
        "oof": oof.overall,
        "oof_per_fold": oof.per_fold,
    }
    record = {
        "version": vid,
        "run": f"runs/{vid}",
        "created_at": created,
        "dataset": plan.dataset.model_dump(include={"url", "hash", "n_images"}),
        "config": with_plan(cfg).public_dict(),  # a --time-budget run: with its plan
        "folds": [f.fold for f in folds],
        "scores": scores,
        "choice": choice.model_dump(exclude={"hash"}),
        "code_version": code_version("train"),
    }
    url = write_version(models_url, record, cfg.storage)
    return VersionManifest(
        version=vid, url=url, run=plan.run, record=record, hash=record_hash(record)
    )


def overlays_key(version: VersionManifest) -> str:
    return task_key("report", version.hash)


def render_overlays(
    cfg: TrainConfig, plan: TrainingPlan, version: VersionManifest
) -> OverlaysManifest:
    from segflow.pipeline.report import overlay_grid

    threshold = version.record["choice"]["threshold"]
    png = overlay_grid(plan.run, plan.dataset.url, cfg.storage, threshold)
    url = Store(plan.run, cfg.storage).write_bytes("report/overlays.png", png)
    return OverlaysManifest(url=url, hash=sha256_bytes(png))


def _manifest(model: type[M], data: dict[str, Any], digest: str | None = None) -> M:
    """``model`` from a stage's result dict: its own fields only (a stage may report more), and
    the hash of the whole result unless ``digest`` is given."""
    fields = {k: v for k, v in data.items() if k in model.model_fields}
    return model(**fields, hash=digest or sha256_json(data))


def _fold_scores(f: FoldManifest) -> dict[str, Any]:
    keys = {"fold", "best_epoch", "dice", "jaccard", "thresholded_jaccard", "placement"}
    return f.model_dump(include=keys)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- segment_flow -------------------------------------------------------------------------------
def resolve_key(models_url: str, version: str | None, storage: StorageOptions) -> str:
    return task_key("version", models_url, resolve(models_url, version, storage).hash)


def resolve(models_url: str, version: str | None, storage: StorageOptions) -> ResolvedVersion:
    v = resolve_version(models_url, version, storage)
    return ResolvedVersion(id=v.id, models=v.models, record=v.record, hash=record_hash(v.record))


def plan_key(cfg: PredictConfig, version: ResolvedVersion) -> str:
    source = listing_hash(Store(cfg.source, cfg.storage)) if cfg.source else None
    data = _dataset_hash(cfg) if cfg.dataset else None
    # an edited pairs CSV chooses other images, wherever it lives (as in ingest_key)
    pairs = listing_hash(Store(cfg.pairs, cfg.storage)) if cfg.pairs else None
    return task_key(
        "predict", source, data, pairs, version.hash, config_hash(cfg), cfg.out, _stale_out(cfg)
    )


def _identity_file(cfg: PredictConfig) -> tuple[Any, str] | None:
    """The output folder's ``_shards/identity.json`` (which model its masks are from) and its
    modified time; ``None`` while the folder has none."""
    out = Store(cfg.out, cfg.storage)
    rel = f"{SHARDS}/identity.json"
    if not out.exists(rel):
        return None
    return out.read_json(rel), str(out.fs.modified(out.path(rel)))


def _out_state(cfg: PredictConfig, found: tuple[Any, str] | None = None) -> list[Any] | None:
    """Which model the output folder's masks are from, and when that was last set: the
    identity file's content and modified time (rewritten, so a new time, each time another
    model takes the folder over). A rollback to a model used before rewrites the same
    content, so the time is what tells the two runs apart."""
    found = found or _identity_file(cfg)
    return None if found is None else [sha256_json(found[0]), found[1]]


def _stale_out(cfg: PredictConfig) -> list[Any] | None:
    """None while the output folder is fresh or holds this configuration's masks; otherwise
    its state, so that a plan cached for this model before another one took the folder over
    is not reused (planning is what clears the other model's done-markers)."""
    found = _identity_file(cfg)  # read once: its content decides, and keys the state
    if found is None:
        return None
    threshold, method = resolve_choice(cfg.models, cfg.storage, cfg.threshold, cfg.postprocess)
    return None if found[0] == _identity(cfg, threshold, method) else _out_state(cfg, found)


def _dataset_hash(cfg: PredictConfig) -> str:
    from segflow.dataset import open_group

    return str(open_group(Store(cfg.dataset, cfg.storage), "r").attrs.get("content_hash", ""))


def plan_segmentation(cfg: PredictConfig, version: ResolvedVersion) -> PredictionPlan:
    shards, ctx = plan_prediction(cfg)
    # each shard's hash is its items file's: the plan's hashes never load the items
    hashes = [s["hash"] for s in shards]
    return PredictionPlan(
        out=cfg.out,
        version=version.id,
        version_hash=version.hash,
        threshold=ctx.threshold,
        postprocess=ctx.postprocess,
        folds=version.record.get("folds"),
        shards=[ShardEntry(shard=s["shard"], n=s["n"], hash=s["hash"]) for s in shards],
        source_hash=sha256_json(hashes),
        weights=ctx.weights,
        hash=sha256_json(
            [version.id, version.hash, hashes, ctx.threshold, ctx.postprocess, config_hash(cfg)]
        ),
    )


def shard_key(cfg: PredictConfig, plan: PredictionPlan, shard: int) -> str:
    entry = plan.shards[shard]
    return task_key(
        "predict", plan.version_hash, config_hash(cfg), cfg.out, entry.hash, _out_state(cfg)
    )


def predict_one_shard(cfg: PredictConfig, plan: PredictionPlan, shard: int) -> ShardManifest:
    out = Store(cfg.out, cfg.storage)
    ctx = ShardContext(cfg, plan.threshold, plan.postprocess, plan.weights)
    payload = predict_shard(ctx, read_shard(out, shard_refs(out)[shard]))
    return ShardManifest(
        shard=shard,
        n_outputs=len(payload["outputs"]),
        n_errors=len(payload["errors"]),
        marker=out.uri(shard_marker(shard)),
        hash=sha256_json([payload["outputs"], payload["errors"]]),
    )


def summary_key(cfg: PredictConfig, plan: PredictionPlan, shards: list[ShardManifest]) -> str:
    # the folder's state: a rollback's shards hash like the first run's, but the summary
    # files on disk are the other model's until summarized again
    return task_key("predict", plan.hash, [s.hash for s in shards], _out_state(cfg))


def summarize_predictions(
    cfg: PredictConfig, plan: PredictionPlan, shards: list[ShardManifest]
) -> PredictionSummary:
    t0 = time.perf_counter()
    out = Store(cfg.out, cfg.storage)
    full = shard_refs(out)
    missing = [s["shard"] for s in pending_shards(cfg, full)]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} of {cfg.out} have no done-marker")
    ctx = ShardContext(cfg, plan.threshold, plan.postprocess)
    res = summarize(ctx, full, plan.folds or [], 0, 0, time.perf_counter() - t0, plan.version)
    return PredictionSummary(
        out=res.out,
        masks=out.uri("masks"),
        n_images=res.n_images,
        n_shards=res.n_shards,
        shards_run=res.shards_run,
        n_errors=res.n_errors,
        folds=res.folds,
        tta=res.tta,
        threshold=res.threshold,
        postprocess=res.postprocess,
        errors=res.errors,
        table=res.table,
        n_review=res.n_review,
        review_threshold=res.review_threshold,
        most_uncertain=res.most_uncertain,
        hash=sha256_json([s.hash for s in shards]),
    )


def review_key(summary: PredictionSummary, k: int) -> str:
    return task_key("review", summary.hash, summary.review_threshold, k)


def check_review_k(k: int) -> int:
    """``k`` if a run's summary holds that many most-uncertain images (REVIEW_K), else a
    ConfigError: a larger ``k`` would silently show REVIEW_K."""
    if not 1 <= k <= REVIEW_K:
        raise ConfigError(
            f"review_k={k}: a run keeps its {REVIEW_K} most uncertain images; "
            f"ask for 1 to {REVIEW_K} (the QA table lists every image's uncertainty)"
        )
    return k


def review_gallery(cfg: PredictConfig, summary: PredictionSummary, k: int) -> ReviewManifest:
    """The ``k`` most uncertain images of the run as a gallery under ``<out>/review/``."""
    from segflow.predict.review import REVIEW_DIR, write_gallery

    check_review_k(k)

    dest = Store(cfg.out, cfg.storage).uri(REVIEW_DIR)
    items = summary.most_uncertain[:k]
    g = write_gallery(cfg.out, dest, items, cfg.storage, summary.review_threshold)
    return _manifest(ReviewManifest, g.__dict__)


def evaluation_key(
    truth: str, layout: str, storage: StorageOptions, summary: PredictionSummary
) -> str:
    return task_key("evaluate", summary.hash, listing_hash(Store(truth, storage)), layout)


def evaluate_predictions(
    truth: str, layout: str, storage: StorageOptions, summary: PredictionSummary
) -> EvaluationManifest:
    data = evaluate(summary.masks, truth, layout, storage).to_dict()
    data.pop("errors", None)
    return _manifest(EvaluationManifest, data)


def crops_key(cfg: CropsConfig, plan: PredictionPlan, summary: PredictionSummary) -> str:
    return task_key("crops", summary.hash, plan.source_hash, config_hash(cfg), cfg.out)


def crop_masks(cfg: CropsConfig, plan: PredictionPlan, summary: PredictionSummary) -> CropsManifest:
    res = make_crops(cfg).to_dict()
    data = {k: v for k, v in res.items() if k not in ("seconds", "n_skipped")}  # run-dependent
    return _manifest(CropsManifest, res, sha256_json(data))
