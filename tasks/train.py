"""Tasks of train_flow: thin wrappers over segflow.pipeline.stages, each with its cache key."""

from __future__ import annotations

from segflow.ingest import IngestConfig
from segflow.pipeline import stages
from segflow.pipeline.stages import Manifest
from segflow.tasks.common import stage_task
from segflow.train import TrainConfig


@stage_task("ingest-dataset", lambda p: stages.ingest_key(p["cfg"]))
def ingest_dataset(cfg: IngestConfig) -> Manifest:
    """Ingest the raw archive into the Zarr dataset (incremental: only new or changed files)."""
    return stages.ingest_dataset(cfg)


@stage_task("prepare-training", lambda p: stages.prepare_key(p["cfg"], p["dataset"]))
def prepare_training(cfg: TrainConfig, dataset: Manifest) -> Manifest:
    """Write the K-fold split (once, as data), the OOF array and the config of the run."""
    return stages.prepare_training(cfg, dataset)


@stage_task(
    "train-fold",
    lambda p: stages.fold_key(p["cfg"], p["plan"], p["fold"]),
    run_name="train-fold-{fold}",
)
def train_fold(cfg: TrainConfig, plan: Manifest, fold: int) -> Manifest:
    """Train one fold as a Ray task with ``gpus_per_fold`` GPUs; resumes from its last epoch."""
    return stages.train_fold(cfg, plan, fold)


@stage_task("evaluate-oof", lambda p: stages.folds_key("oof", p["plan"], p["folds"]), io=False)
def evaluate_oof(cfg: TrainConfig, plan: Manifest, folds: list[Manifest]) -> Manifest:
    """Score every labelled image with the fold that never saw it."""
    return stages.evaluate_oof(cfg, plan, folds)


@stage_task(
    "choose-postprocessing", lambda p: stages.folds_key("choose", p["plan"], p["folds"]), io=False
)
def choose_postprocessing(cfg: TrainConfig, plan: Manifest, folds: list[Manifest]) -> Manifest:
    """Choose the threshold and post-processing on the out-of-fold probabilities."""
    return stages.choose_postprocessing(cfg, plan, folds)


@stage_task(
    "record-model-version",
    lambda p: stages.version_key(p["plan"], p["folds"], p["oof"], p["choice"]),
)
def record_model_version(
    cfg: TrainConfig,
    models_url: str,
    plan: Manifest,
    folds: list[Manifest],
    oof: Manifest,
    choice: Manifest,
) -> Manifest:
    """Write the version record (data hash, config, folds, scores) to models/versions/."""
    return stages.record_version(cfg, models_url, plan, folds, oof, choice)


@stage_task("render-overlays", lambda p: stages.overlays_key(p["version"]), io=False)
def render_overlays(cfg: TrainConfig, plan: Manifest, version: Manifest) -> Manifest:
    """A grid of out-of-fold predictions over their images, for the dashboard."""
    return stages.render_overlays(cfg, plan, version)
