"""Tasks of train_flow: thin wrappers over segflow.pipeline.stages, each with its cache key."""

from __future__ import annotations

from segflow.ingest import IngestConfig
from segflow.pipeline import stages
from segflow.pipeline.manifests import (
    ChoiceManifest,
    DatasetManifest,
    FoldManifest,
    OofManifest,
    OverlaysManifest,
    TrainingPlan,
    VersionManifest,
)
from segflow.tasks.common import stage_task
from segflow.train import TrainConfig


@stage_task("ingest-dataset", stages.ingest_key)
def ingest_dataset(cfg: IngestConfig) -> DatasetManifest:
    """Ingest the raw archive into the Zarr dataset (incremental: only new or changed files)."""
    return stages.ingest_dataset(cfg)


@stage_task("prepare-training", stages.prepare_key)
def prepare_training(cfg: TrainConfig, dataset: DatasetManifest) -> TrainingPlan:
    """Write the K-fold split (once, as data), the OOF array and the config of the run."""
    return stages.prepare_training(cfg, dataset)


@stage_task("train-fold", stages.fold_key, run_name="train-fold-{fold}")
def train_fold(cfg: TrainConfig, plan: TrainingPlan, fold: int) -> FoldManifest:
    """Train one fold as a Ray task with ``gpus_per_fold`` GPUs; resumes from its last epoch."""
    return stages.train_fold(cfg, plan, fold)


@stage_task("evaluate-oof", stages.oof_key)
def evaluate_oof(cfg: TrainConfig, plan: TrainingPlan, folds: list[FoldManifest]) -> OofManifest:
    """Score every labelled image with the fold that never saw it."""
    return stages.evaluate_oof(cfg, plan, folds)


@stage_task("choose-postprocessing", stages.choose_key)
def choose_postprocessing(
    cfg: TrainConfig, plan: TrainingPlan, folds: list[FoldManifest]
) -> ChoiceManifest:
    """Choose the threshold and post-processing on the out-of-fold probabilities."""
    return stages.choose_postprocessing(cfg, plan, folds)


@stage_task("record-model-version", stages.version_key)
def record_model_version(
    cfg: TrainConfig,
    models_url: str,
    plan: TrainingPlan,
    folds: list[FoldManifest],
    oof: OofManifest,
    choice: ChoiceManifest,
) -> VersionManifest:
    """Write the version record (data hash, config, folds, scores) to models/versions/."""
    return stages.record_version(cfg, models_url, plan, folds, oof, choice)


@stage_task("render-overlays", stages.overlays_key)
def render_overlays(
    cfg: TrainConfig, plan: TrainingPlan, version: VersionManifest
) -> OverlaysManifest:
    """A grid of out-of-fold predictions over their images, for the dashboard."""
    return stages.render_overlays(cfg, plan, version)
