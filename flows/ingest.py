"""The ingest flow: today's main job. Later stages chain onto it (issue 6: pipeline_flow)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.ingest import ingest_dataset


@flow(name="ingest", log_prints=True)
def ingest_flow(config: dict[str, Any]) -> dict[str, Any]:
    return ingest_dataset(config)
