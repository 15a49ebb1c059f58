"""Tasks of segment_flow: thin wrappers over segflow.pipeline.stages, each with its cache key."""

from __future__ import annotations

from segflow.crops import CropsConfig
from segflow.pipeline import stages
from segflow.pipeline.manifests import (
    CropsManifest,
    EvaluationManifest,
    PredictionPlan,
    PredictionSummary,
    ResolvedVersion,
    ReviewManifest,
    ShardManifest,
)
from segflow.predict.config import PredictConfig
from segflow.storage import StorageOptions
from segflow.tasks.common import stage_task


@stage_task("resolve-model-version", stages.resolve_key)
def resolve_model_version(
    models_url: str, version: str | None, storage: StorageOptions
) -> ResolvedVersion:
    """The model version to segment with (default: ``production``; ``latest`` only while
    nothing was promoted)."""
    return stages.resolve(models_url, version, storage)


@stage_task("plan-shards", stages.plan_key)
def plan_shards(cfg: PredictConfig, version: ResolvedVersion) -> PredictionPlan:
    """List the inputs and pack them into resumable shards (changed inputs rerun their shard)."""
    return stages.plan_segmentation(cfg, version)


@stage_task("predict-shard", stages.shard_key, run_name="predict-shard-{shard:04d}")
def predict_shard(cfg: PredictConfig, plan: PredictionPlan, shard: int) -> ShardManifest:
    """Predict one shard with the fold ensemble + TTA, as a Ray task on one GPU."""
    return stages.predict_one_shard(cfg, plan, shard)


@stage_task("summarize-predictions", stages.summary_key)
def summarize_predictions(
    cfg: PredictConfig, plan: PredictionPlan, shards: list[ShardManifest]
) -> PredictionSummary:
    """Gather the shards' markers into predictions.json."""
    return stages.summarize_predictions(cfg, plan, shards)


@stage_task("review-gallery", stages.review_key)
def review_predictions(cfg: PredictConfig, summary: PredictionSummary, k: int) -> ReviewManifest:
    """The k most uncertain images as an overlay grid, their scores, and a histogram."""
    return stages.review_gallery(cfg, summary, k)


@stage_task("evaluate-predictions", stages.evaluation_key)
def evaluate_predictions(
    truth: str, layout: str, storage: StorageOptions, summary: PredictionSummary
) -> EvaluationManifest:
    """Score the predicted masks against the ground truth."""
    return stages.evaluate_predictions(truth, layout, storage, summary)


@stage_task("crop-masks", stages.crops_key)
def crop_masks(cfg: CropsConfig, plan: PredictionPlan, summary: PredictionSummary) -> CropsManifest:
    """Crop each image to its predicted lesion (largest component)."""
    return stages.crop_masks(cfg, plan, summary)
