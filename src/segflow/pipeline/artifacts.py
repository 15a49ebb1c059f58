"""Publishing to the Prefect dashboard: the fold-metrics table, the training report, links to
the model version and outputs, and a progress bar for bulk prediction. Called by the flows;
each call attaches an artifact to the current flow run (keyed ones keep their history)."""

from __future__ import annotations

import posixpath
import time
from typing import Any

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from segflow.pipeline.manifests import (
    CropsManifest,
    EvaluationManifest,
    OverlaysManifest,
    PredictionSummary,
    ReviewManifest,
    VersionManifest,
)
from segflow.pipeline.report import (
    fold_rows,
    review_markdown,
    run_description,
    training_markdown,
)
from segflow.progress import progress_figures
from segflow.storage import StorageOptions, Store, redact


def link(url: str) -> str:
    """A clickable form of a storage URL (local paths become file:// links)."""
    return url if "://" in url else f"file://{url}"


def describe_run(kind: str, data: dict[str, Any], config: dict[str, Any]) -> None:
    create_markdown_artifact(
        run_description(kind, redact(data), redact(config)),
        key=f"{kind}-run",
        description=f"what this {kind} run ran on",
    )


def publish_training(
    version: VersionManifest, overlays: OverlaysManifest, storage: StorageOptions
) -> None:
    vid = version.version
    record = version.model_dump()
    create_table_artifact(
        fold_rows(record), key="fold-metrics", description=f"per-fold metrics, version {vid}"
    )
    run = Store(version.run, storage)
    curves = {
        f: run.read_bytes(f"fold-{f}/curves.png")
        for f in version.record["folds"]
        if run.exists(f"fold-{f}/curves.png")
    }
    png = _read_url(overlays.url, storage) if overlays.url else None
    create_markdown_artifact(
        training_markdown(record, curves, png),
        key="training-report",
        description=f"training curves and out-of-fold overlays, version {vid}",
    )
    create_link_artifact(link(version.url), link_text=f"model version {vid}", key="model-version")


def publish_segmentation(
    summary: PredictionSummary, evaluation: EvaluationManifest | None, crops: CropsManifest
) -> None:
    create_link_artifact(link(summary.masks), link_text="predicted masks", key="masks")
    create_link_artifact(link(crops.manifest), link_text="crops manifest", key="crops")
    row: dict[str, Any] = {
        "images": summary.n_images,
        "errors": summary.n_errors,
        "crops_ok": crops.n_ok,
        "crops_empty": crops.n_empty,
        "threshold": summary.threshold,
        "postprocess": summary.postprocess,
        "needs_review": summary.n_review,
    }
    if evaluation:
        row.update(
            evaluation.model_dump(include={"mean_dice", "mean_jaccard", "mean_thresholded_jaccard"})
        )
        create_link_artifact(
            link(evaluation.per_image_csv), link_text="per-image scores", key="evaluation"
        )
    create_table_artifact([row], key="segment-summary", description="bulk segmentation summary")


def publish_review(review: ReviewManifest, storage: StorageOptions) -> None:
    """The ``review`` artifact: the most uncertain images, their scores, the histogram."""
    grid = _read_url(review.grid, storage)
    hist = _read_url(review.histogram, storage)
    create_markdown_artifact(
        review_markdown(review.items, grid, hist, review.n_review, review.n_images),
        key="review",
        description=f"the {len(review.items)} most uncertain images of this run",
    )
    create_link_artifact(link(review.index), link_text="review gallery", key="review-gallery")


class Progress:
    """A progress artifact for bulk prediction: ``update(done)`` as shards finish, ``done``
    and ``total`` counted in images over the whole archive; the description carries the
    count, rate and ETA (:mod:`segflow.progress`)."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.t0 = max(total, 1), what, time.perf_counter()
        self.id = create_progress_artifact(0.0, key="predict-progress", description=what)

    def update(self, done: int, ran: int) -> None:
        """``ran`` of the ``done`` images were predicted by this run (not cached earlier)."""
        fig = progress_figures(done, self.total, ran, time.perf_counter() - self.t0)
        update_progress_artifact(self.id, fig.percent, description=f"{self.what}: {fig.line()}")


def _read_url(url: str, storage: StorageOptions) -> bytes:
    folder, name = posixpath.split(url)
    return Store(folder, storage).read_bytes(name)
