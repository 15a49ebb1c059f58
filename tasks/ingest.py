"""Prefect task for the ingest stage. Returns the small JSON summary, never arrays."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from segflow.ingest import IngestConfig, ingest


# Ingest is incremental on its own (a rerun on an unchanged source is a no-op), so it needs no
# Prefect cache; it reads and writes object storage, so it gets retries.
@task(name="ingest-dataset", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def ingest_dataset(config: dict[str, Any]) -> dict[str, Any]:
    """Ingest a raw archive into the Zarr dataset described by ``config`` (IngestConfig)."""
    return ingest(IngestConfig.model_validate(config)).to_dict()
