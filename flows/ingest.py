"""The ingest flow: ingest alone, for archives that are only to be made into datasets."""

from __future__ import annotations

import posixpath
from typing import Any

from segflow.ingest import IngestConfig
from segflow.pipeline.config import refuse_secrets
from segflow.tasks.common import segflow_flow, start_flow
from segflow.tasks.train import ingest_dataset


@segflow_flow(name="ingest", log_prints=True)
def ingest_flow(config: dict[str, Any]) -> dict[str, Any]:
    refuse_secrets(config)
    cfg = IngestConfig.load(None, **config)
    cached = start_flow(posixpath.dirname(cfg.dataset.rstrip("/")), cfg.storage)  # beside it
    return cached(ingest_dataset)(cfg).model_dump()
