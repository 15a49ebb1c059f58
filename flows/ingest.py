"""The ingest flow: ingest alone, for archives that are only to be made into datasets."""

from __future__ import annotations

import posixpath
from typing import Any

from prefect import flow

from segflow.ingest import IngestConfig
from tasks.common import route_logs, stored_in
from tasks.train import ingest_dataset


@flow(name="ingest", log_prints=True)
def ingest_flow(config: dict[str, Any]) -> dict[str, Any]:
    route_logs()
    cfg = IngestConfig.model_validate(config)
    results = f"{posixpath.dirname(cfg.dataset.rstrip('/'))}/_prefect"  # beside the dataset
    return stored_in(results, cfg.storage)(ingest_dataset)(cfg)
