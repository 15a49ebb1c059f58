"""Tasks of segment_flow: thin wrappers over segflow.pipeline.stages, each with its cache key."""

from __future__ import annotations

from segflow.crops import CropsConfig
from segflow.pipeline import stages
from segflow.pipeline.stages import Manifest
from segflow.predict.config import PredictConfig
from segflow.storage import StorageOptions
from segflow.tasks.common import stage_task
from segflow.versions import ModelVersion


@stage_task(
    "resolve-model-version",
    lambda p: stages.resolve_key(p["models_url"], p["version"], p["storage"]),
)
def resolve_model_version(
    models_url: str, version: str | None, storage: StorageOptions
) -> ModelVersion:
    """The model version to segment with (default: the latest)."""
    return stages.resolve(models_url, version, storage)


@stage_task("plan-shards", lambda p: stages.plan_key(p["cfg"], p["version"]))
def plan_shards(cfg: PredictConfig, version: ModelVersion) -> Manifest:
    """List the inputs and pack them into resumable shards (changed inputs rerun their shard)."""
    return stages.plan_segmentation(cfg, version)


@stage_task(
    "predict-shard",
    lambda p: stages.shard_key(p["cfg"], p["plan"], p["shard"]),
    run_name="predict-shard-{shard:04d}",
)
def predict_shard(cfg: PredictConfig, plan: Manifest, shard: int) -> Manifest:
    """Predict one shard with the fold ensemble + TTA, as a Ray task on one GPU."""
    return stages.predict_one_shard(cfg, plan, shard)


@stage_task("summarize-predictions", lambda p: stages.summary_key(p["cfg"], p["plan"], p["shards"]))
def summarize_predictions(cfg: PredictConfig, plan: Manifest, shards: list[Manifest]) -> Manifest:
    """Gather the shards' markers into predictions.json."""
    return stages.summarize_predictions(cfg, plan, shards)


@stage_task(
    "evaluate-predictions",
    lambda p: stages.evaluation_key(p["truth"], p["layout"], p["storage"], p["summary"]),
)
def evaluate_predictions(
    truth: str, layout: str, storage: StorageOptions, summary: Manifest
) -> Manifest:
    """Score the predicted masks against the ground truth."""
    return stages.evaluate_predictions(truth, layout, storage, summary)


@stage_task("crop-masks", lambda p: stages.crops_key(p["cfg"], p["plan"], p["summary"]))
def crop_masks(cfg: CropsConfig, plan: Manifest, summary: Manifest) -> Manifest:
    """Crop each image to its predicted lesion (largest component)."""
    return stages.crop_masks(cfg, plan, summary)
