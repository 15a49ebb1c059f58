"""pipeline_flow: train_flow, then segment_flow with the version it recorded."""

from __future__ import annotations

import logging
from typing import Any

from segflow.flows.segment import segment_flow
from segflow.flows.train import train_flow
from segflow.tasks.common import segflow_flow

log = logging.getLogger("segflow.pipeline")


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
    promotion = trained["promotion"]
    gated = promotion["decision"] != "not gated"
    use = promotion["production"] if gated else trained["version"]
    if not use:
        # gated, and nothing is production (the first version was refused, or gate.mode is
        # manual): segmenting with the refused version would ship what the gate turned down
        why = (
            f"no production model: the gate did not promote {trained['version']} "
            f"({promotion['decision']}: {promotion['reason']}); promote a version with "
            f"`segflow models promote ID --models {models_url} --reason TEXT`, then run segment"
        )
        log.warning("pipeline: segment step skipped: %s", why)
        return {"train": trained, "segment": None, "skipped": why}
    segment_config = {**(config or {}), "version": use}
    segmented = segment_flow(source, models_url, out_url, segment_config, layout=layout)
    return {"train": trained, "segment": segmented}
