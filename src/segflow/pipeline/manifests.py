"""What each task of the flows returns: a small typed manifest (URLs, counts, scores, and a
``hash`` of what the task produced, which downstream cache keys are built from).

Manifests are what Prefect persists as task results, as JSON (see
:mod:`segflow.pipeline.results`), so they hold no arrays and no secrets. Flows read them by
attribute: a renamed field fails type checking and import-time key checks, not a run.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from segflow.versions import ModelVersion


class Manifest(BaseModel):
    """Base of every task result: frozen, unknown fields refused, a content ``hash``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hash: str


# -- train_flow ---------------------------------------------------------------------------------
class DatasetManifest(Manifest):
    url: str
    n_images: int
    status: str
    decoded: int
    n_rejected: int
    report: str


class TrainingPlan(Manifest):
    run: str
    run_key: str
    folds: list[int]
    dataset: DatasetManifest


class FoldManifest(Manifest):
    fold: int
    status: str
    best_epoch: int | None
    start_epoch: int
    epochs_run: int
    dice: float | None
    jaccard: float | None
    thresholded_jaccard: float | None
    checkpoint: str | None
    curves: str
    placement: dict[str, Any] | None = None  # Ray node + GPU slot of the attempt (None: inline)


class OofManifest(Manifest):
    threshold: float
    per_fold: list[dict[str, Any]]
    overall: dict[str, Any]


class ChoiceManifest(Manifest):
    threshold: float
    postprocess: str
    oof_thresholded_jaccard: float
    oof_by_threshold: dict[str, float]
    oof_by_postprocess: dict[str, float]
    n_images: int
    review_threshold: float | None = None  # needs_review cut on uncertainty, calibrated OOF
    review: dict[str, Any] | None = None  # its OOF precision, recall, F1 (Calibration)
    resolution: str | None = None  # "original", "training" or "mixed": where OOF was scored
    n_original: int | None = None  # OOF images scored at the original resolution


class VersionManifest(Manifest):
    version: str
    url: str
    run: str
    record: dict[str, Any]


class OverlaysManifest(Manifest):
    url: str


class BenchmarkManifest(Manifest):
    """The gate's frozen benchmark (``segflow.gate.Benchmark``); ``hash`` is its content hash."""

    url: str
    content_hash: str
    n_images: int


class GateEvaluation(Manifest):
    """Challenger and champion scored on the benchmark: the version record's ``gate`` section,
    and the disagreement grid's URL."""

    record: dict[str, Any]
    png: str | None


# -- segment_flow -------------------------------------------------------------------------------
class ResolvedVersion(Manifest):
    """A model version, as a task result (``segflow.versions.ModelVersion`` is a dataclass)."""

    id: str
    models: str
    record: dict[str, Any]

    def model_version(self) -> ModelVersion:
        return ModelVersion(self.id, self.models, self.record)


class ShardEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    shard: int
    n: int
    hash: str


class PredictionPlan(Manifest):
    out: str
    version: str
    version_hash: str
    threshold: float
    postprocess: str
    folds: list[int] | None
    shards: list[ShardEntry]
    source_hash: str
    weights: str | None = None  # the folds' weights fingerprint, pinned for every shard


class ShardManifest(Manifest):
    shard: int
    n_outputs: int
    n_errors: int
    marker: str


class PredictionSummary(Manifest):
    out: str
    masks: str
    n_images: int
    n_shards: int
    shards_run: int
    n_errors: int
    folds: list[int]
    tta: str
    threshold: float
    postprocess: str
    errors: list[dict[str, str]]
    table: str | None = None  # the per-image QA table (summary.parquet; summary.csv beside it)
    n_review: int | None = None  # rows flagged needs_review (None: the version has no calibration)
    review_threshold: float | None = None
    most_uncertain: list[dict[str, Any]] = []  # id, source, uncertainty, mask; top first


class ReviewManifest(Manifest):
    """The review gallery of a segment run (``segflow.predict.review.Gallery``)."""

    folder: str
    grid: str
    histogram: str
    index: str
    items: list[dict[str, Any]]
    n_images: int
    n_review: int | None
    review_threshold: float | None


class EvaluationManifest(Manifest):
    n: int
    mean_dice: float | None
    mean_jaccard: float | None
    mean_thresholded_jaccard: float | None
    confusion: dict[str, Any]
    missing_predictions: list[str]
    unmatched_predictions: list[str]
    per_image_csv: str
    summary_json: str
    n_errors: int


class CropsManifest(Manifest):
    out: str
    n_images: int
    n_ok: int
    n_empty: int
    n_error: int
    n_skipped: int
    errors_by_reason: dict[str, int]
    manifest: str
    seconds: float


#: every manifest type, by name: the only types a persisted task result may be read back as
REGISTRY: dict[str, type[Manifest]] = {
    m.__name__: m
    for m in (
        DatasetManifest,
        TrainingPlan,
        FoldManifest,
        OofManifest,
        ChoiceManifest,
        VersionManifest,
        OverlaysManifest,
        BenchmarkManifest,
        GateEvaluation,
        ResolvedVersion,
        PredictionPlan,
        ShardManifest,
        PredictionSummary,
        ReviewManifest,
        EvaluationManifest,
        CropsManifest,
    )
}
