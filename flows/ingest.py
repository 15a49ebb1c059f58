"""The ingest flow: ingest alone, for archives that are only to be made into datasets."""

from __future__ import annotations

import posixpath
from typing import Any

from prefect import flow

from segflow.ingest import IngestConfig
from segflow.tasks.common import start_flow
from segflow.tasks.train import ingest_dataset


@flow(name="ingest", log_prints=True)
def ingest_flow(config: dict[str, Any]) -> dict[str, Any]:
    cfg = IngestConfig.model_validate(config)
    cached = start_flow(posixpath.dirname(cfg.dataset.rstrip("/")), cfg.storage)  # beside it
    return cached(ingest_dataset)(cfg)
