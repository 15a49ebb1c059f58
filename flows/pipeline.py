"""pipeline_flow: train_flow, then segment_flow with the version it recorded."""

from __future__ import annotations

from typing import Any

from prefect import flow


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    dataset_source: str,
    layout: str,
    models_url: str,
    source: str,
    out_url: str,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    raise NotImplementedError  # wired in the orchestration change (issue 6)
