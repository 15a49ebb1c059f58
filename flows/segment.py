"""segment_flow: bulk predict (one task run per shard) -> evaluate (when truth is given) ->
crops."""

from __future__ import annotations

from typing import Any

from prefect import flow


@flow(name="segment", log_prints=True)
def segment_flow(
    source: str, models_url: str, out_url: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    raise NotImplementedError  # wired in the orchestration change (issue 6)
