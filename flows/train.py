"""train_flow: ingest -> folds (one task run per fold, on Ray) -> out-of-fold evaluation ->
threshold and post-processing -> a model-version record in ``models_url/versions/``."""

from __future__ import annotations

from typing import Any

from prefect import flow


@flow(name="train", log_prints=True)
def train_flow(
    dataset_source: str, layout: str, models_url: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    raise NotImplementedError  # wired in the orchestration change (issue 6)
