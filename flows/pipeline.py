"""pipeline_flow: train_flow, then segment_flow with the version it recorded."""

from __future__ import annotations

from typing import Any

from segflow.flows.segment import segment_flow
from segflow.flows.train import train_flow
from segflow.tasks.common import segflow_flow


@segflow_flow(name="pipeline", log_prints=True)
def pipeline_flow(
    dataset_source: str,
    layout: str,
    models_url: str,
    source: str,
    out_url: str,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    trained = train_flow(dataset_source, layout, models_url, config)
    # segment with exactly the version just trained, not whatever "latest" is by then; when the
    # gate ran, with production as the gate left it (a refused challenger is never used); and in
    # the layout the data was ingested in (unless config.predict sets its own)
    gated = trained["promotion"]["decision"] != "not gated"
    use = trained["promotion"]["production"] if gated else trained["version"]
    segment_config = {**(config or {}), "version": use or trained["version"]}
    segmented = segment_flow(source, models_url, out_url, segment_config, layout=layout)
    return {"train": trained, "segment": segmented}
