"""The work behind each task of the flows, as plain functions: each takes stage configs and
upstream manifests and returns a small manifest (URLs, counts, and a ``hash`` of what it
produced). The ``*_key`` functions give each task's cache key from the same inputs.

Manifests are JSON-ready dicts, never arrays: they are what Prefect persists as results.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from segflow.crops import CropsConfig, make_crops
from segflow.evaluate import evaluate
from segflow.ingest import IngestConfig, ingest
from segflow.pipeline.config import FlowConfig
from segflow.pipeline.keys import code_version, config_hash, listing_hash, task_key
from segflow.predict.config import PredictConfig
from segflow.predict.postprocess import choose_from_models
from segflow.predict.run import (
    MANIFEST,
    ShardContext,
    pending_shards,
    plan_prediction,
    shard_marker,
    summarize,
)
from segflow.predict.workers import predict_shard
from segflow.storage import StorageOptions, Store, sha256_bytes, sha256_json, sha256_object
from segflow.train import TrainConfig
from segflow.train.oof import oof_scores
from segflow.train.run import prepare_run, run_fold
from segflow.train.warmstart import init_hash, pin_init
from segflow.versions import ModelVersion, resolve_version, write_version

Manifest = dict[str, Any]
_LOCATIONS = frozenset({"dataset", "models"})


# -- train_flow ---------------------------------------------------------------------------------
def ingest_key(cfg: IngestConfig) -> str:
    inputs = [listing_hash(Store(cfg.source, cfg.storage))]
    if cfg.masks and cfg.masks != cfg.source:
        inputs.append(listing_hash(Store(cfg.masks, cfg.storage)))
    if cfg.annotations:
        inputs.append(listing_hash(Store(cfg.annotations, cfg.storage)))
    return task_key("ingest", inputs, config_hash(cfg), cfg.dataset)


def ingest_dataset(cfg: IngestConfig) -> Manifest:
    res = ingest(cfg)
    return {
        "url": res.dataset, "hash": res.content_hash, "n_images": res.n_images,
        "status": res.status, "decoded": res.extra.get("decoded", 0),
        "n_rejected": res.n_rejected, "report": res.report,
    }  # fmt: skip


def training_run(flow_cfg: FlowConfig, models_url: str, dataset: Manifest) -> TrainConfig:
    """The training config of this data + config + code: its run folder is named by their
    hash, so a changed input trains into a new folder and an unchanged one resumes its own."""
    probe = pin_init(flow_cfg.train_config(dataset["url"], models_url), models_url)
    warm = [h] if (h := init_hash(probe)) else []  # a cold start keeps its key
    key = task_key("train", dataset["hash"], config_hash(probe, _LOCATIONS), *warm)
    run = flow_cfg.train_config(dataset["url"], f"{models_url.rstrip('/')}/runs/{key[-16:]}")
    return run.model_copy(update={"init_from": probe.init_from, "init_models": probe.init_models})


def prepare_key(cfg: TrainConfig, dataset: Manifest) -> str:
    return task_key("train", dataset["hash"], config_hash(cfg, _LOCATIONS), cfg.models)


def prepare_training(cfg: TrainConfig, dataset: Manifest) -> Manifest:
    folds = prepare_run(cfg)
    run = Store(cfg.models, cfg.storage)
    return {
        "run": run.url, "run_key": run.url.rstrip("/").rsplit("/", 1)[-1], "folds": folds,
        "dataset": dataset, "hash": sha256_json([dataset["hash"], run.read_json("splits.json"),
                                                 config_hash(cfg), code_version("train")]),
    }  # fmt: skip


def fold_key(cfg: TrainConfig, plan: Manifest, fold: int) -> str:
    return task_key("train", plan["hash"], fold)


def train_fold(cfg: TrainConfig, plan: Manifest, fold: int) -> Manifest:
    result = run_fold(cfg, fold)
    run = Store(plan["run"], cfg.storage)
    metrics = {k: getattr(result, k) for k in ("dice", "jaccard", "thresholded_jaccard")}
    return {
        "fold": fold, "status": result.status, "best_epoch": result.best_epoch,
        "start_epoch": result.start_epoch, "epochs_run": result.epochs_run, **metrics,
        "checkpoint": result.checkpoint, "curves": run.uri(f"fold-{fold}/curves.png"),
        "hash": sha256_object(run, f"fold-{fold}/best.pt"),
    }  # fmt: skip


def folds_key(stage: str, plan: Manifest, folds: list[Manifest], *extra: Any) -> str:
    return task_key(stage, plan["hash"], [f["hash"] for f in folds], *extra)


def evaluate_oof(cfg: TrainConfig, plan: Manifest, folds: list[Manifest]) -> Manifest:
    scores = oof_scores(plan["run"], plan["dataset"]["url"], cfg.storage, cfg.threshold)
    Store(plan["run"], cfg.storage).write_json("oof_scores.json", scores)
    return {**scores, "hash": sha256_json(scores)}


def choose_postprocessing(cfg: TrainConfig, plan: Manifest, folds: list[Manifest]) -> Manifest:
    choice = choose_from_models(plan["run"], plan["dataset"]["url"], cfg.storage)
    data = choice.to_dict()
    return {**data, "hash": sha256_json(data)}


def version_key(plan: Manifest, folds: list[Manifest], oof: Manifest, choice: Manifest) -> str:
    return folds_key("version", plan, folds, oof["hash"], choice["hash"])


def record_version(
    cfg: TrainConfig, models_url: str, plan: Manifest, folds: list[Manifest], oof: Manifest,
    choice: Manifest,
) -> Manifest:  # fmt: skip
    """Write ``versions/<id>.json`` (see segflow.versions); the id is the run key, so the same
    data, config and code always give the same version."""
    root = Store(models_url, cfg.storage)
    vid = plan["run_key"]
    rel = f"versions/{vid}.json"
    created = root.read_json(rel)["created_at"] if root.exists(rel) else _now()
    record = {
        "version": vid, "run": f"runs/{vid}", "created_at": created,
        "dataset": {k: plan["dataset"][k] for k in ("url", "hash", "n_images")},
        "config": cfg.public_dict(), "folds": [f["fold"] for f in folds],
        "scores": {"folds": [_fold_scores(f) for f in folds], "oof": oof["overall"],
                   "oof_per_fold": oof["per_fold"]},
        "choice": {k: v for k, v in choice.items() if k != "hash"},
        "code_version": code_version("train"),
    }  # fmt: skip
    url = write_version(models_url, record, cfg.storage)
    stable = {k: v for k, v in record.items() if k != "created_at"}
    return {"version": vid, "url": url, "run": plan["run"], "record": record,
            "hash": sha256_json(stable)}  # fmt: skip


def overlays_key(version: Manifest) -> str:
    return task_key("report", version["hash"])


def render_overlays(cfg: TrainConfig, plan: Manifest, version: Manifest) -> Manifest:
    from segflow.pipeline.report import overlay_grid

    threshold = version["record"]["choice"]["threshold"]
    png = overlay_grid(plan["run"], plan["dataset"]["url"], cfg.storage, threshold)
    url = Store(plan["run"], cfg.storage).write_bytes("report/overlays.png", png)
    return {"url": url, "hash": sha256_bytes(png)}


def _fold_scores(f: Manifest) -> dict[str, Any]:
    keys = ("fold", "best_epoch", "dice", "jaccard", "thresholded_jaccard")
    return {k: f[k] for k in keys}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- segment_flow -------------------------------------------------------------------------------
def resolve_key(models_url: str, version: str | None, storage: StorageOptions) -> str:
    return task_key("version", models_url, _version_hash(resolve(models_url, version, storage)))


def resolve(models_url: str, version: str | None, storage: StorageOptions) -> ModelVersion:
    return resolve_version(models_url, version, storage)


def plan_key(cfg: PredictConfig, version: ModelVersion) -> str:
    source = listing_hash(Store(cfg.source, cfg.storage)) if cfg.source else None
    data = _dataset_hash(cfg) if cfg.dataset else None
    return task_key("predict", source, data, _version_hash(version), config_hash(cfg), cfg.out)


def _dataset_hash(cfg: PredictConfig) -> str:
    from segflow.ingest.dataset import open_group

    return str(open_group(Store(cfg.dataset, cfg.storage), "r").attrs.get("content_hash", ""))


def _version_hash(version: ModelVersion) -> str:
    return sha256_json({k: v for k, v in version.record.items() if k != "created_at"})


def plan_segmentation(cfg: PredictConfig, version: ModelVersion) -> Manifest:
    shards, ctx = plan_prediction(cfg)
    return {
        "out": cfg.out, "version": version.id, "version_hash": _version_hash(version),
        "threshold": ctx.threshold, "postprocess": ctx.postprocess,
        "folds": version.record.get("folds"),
        "shards": [{"shard": s["shard"], "n": len(s["items"]), "hash": sha256_json(s["items"])}
                   for s in shards],
        "source_hash": sha256_json([s["items"] for s in shards]),
        "hash": sha256_json([version.id, _version_hash(version), [s["items"] for s in shards],
                             ctx.threshold, ctx.postprocess, config_hash(cfg)]),
    }  # fmt: skip


def shard_key(cfg: PredictConfig, plan: Manifest, shard: int) -> str:
    entry = plan["shards"][shard]
    return task_key("predict", plan["version_hash"], config_hash(cfg), cfg.out, entry["hash"])


def predict_one_shard(cfg: PredictConfig, plan: Manifest, shard: int) -> Manifest:
    out = Store(cfg.out, cfg.storage)
    entry = out.read_json(MANIFEST)["shards"][shard]
    ctx = ShardContext(cfg, plan["threshold"], plan["postprocess"])
    payload = predict_shard(ctx, entry)
    return {
        "shard": shard, "n_outputs": len(payload["outputs"]), "n_errors": len(payload["errors"]),
        "marker": out.uri(shard_marker(shard)),
        "hash": sha256_json([payload["outputs"], payload["errors"]]),
    }  # fmt: skip


def summary_key(cfg: PredictConfig, plan: Manifest, shards: list[Manifest]) -> str:
    return task_key("predict", plan["hash"], [s["hash"] for s in shards])


def summarize_predictions(cfg: PredictConfig, plan: Manifest, shards: list[Manifest]) -> Manifest:
    t0 = time.perf_counter()
    full = Store(cfg.out, cfg.storage).read_json(MANIFEST)["shards"]
    missing = [s["shard"] for s in pending_shards(cfg, full)]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} of {cfg.out} have no done-marker")
    ctx = ShardContext(cfg, plan["threshold"], plan["postprocess"])
    res = summarize(ctx, full, plan.get("folds") or [], 0, 0, time.perf_counter() - t0)
    data = {k: v for k, v in asdict(res).items() if k not in ("seconds", "images_per_s")}
    return {**data, "masks": Store(cfg.out, cfg.storage).uri("masks"),
            "hash": sha256_json([s["hash"] for s in shards])}  # fmt: skip


def evaluation_key(truth: str, layout: str, storage: StorageOptions, summary: Manifest) -> str:
    return task_key("evaluate", summary["hash"], listing_hash(Store(truth, storage)), layout)


def evaluate_predictions(
    truth: str, layout: str, storage: StorageOptions, summary: Manifest
) -> Manifest:
    res = evaluate(summary["masks"], truth, layout, storage)
    data = {k: v for k, v in res.to_dict().items() if k != "errors"}
    return {**data, "hash": sha256_json(data)}


def crops_key(cfg: CropsConfig, plan: Manifest, summary: Manifest) -> str:
    return task_key("crops", summary["hash"], plan["source_hash"], config_hash(cfg), cfg.out)


def crop_masks(cfg: CropsConfig, plan: Manifest, summary: Manifest) -> Manifest:
    res = make_crops(cfg).to_dict()
    data = {k: v for k, v in res.items() if k not in ("seconds", "n_skipped")}  # run-dependent
    return {**res, "hash": sha256_json(data)}
