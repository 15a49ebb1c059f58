"""segment_flow: bulk predict (one task run per shard) -> review gallery -> evaluate (when
truth is given) -> crops."""

from __future__ import annotations

from typing import Any

from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from segflow.pipeline.artifacts import (
    Progress,
    describe_run,
    publish_review,
    publish_segmentation,
)
from segflow.pipeline.config import FlowConfig
from segflow.pipeline.stages import check_review_k
from segflow.tasks.common import segflow_flow, start_flow
from segflow.tasks.segment import (
    crop_masks,
    evaluate_predictions,
    plan_shards,
    predict_shard,
    resolve_model_version,
    review_predictions,
    summarize_predictions,
)


@segflow_flow(
    name="segment",
    flow_run_name="segment",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=16),
)
def segment_flow(
    source: str,
    models_url: str,
    out_url: str,
    config: dict[str, Any] | None = None,
    layout: str | None = None,
    review_k: int = 16,
) -> dict[str, Any]:
    """``layout``: how the source names its images (and crops and evaluation their masks);
    ``config.predict.layout`` wins when given. ``review_k``: the most uncertain images the
    ``review`` artifact shows (at most 16, what a run's summary keeps)."""
    check_review_k(review_k)  # before any work: the gallery would silently show fewer
    cfg = FlowConfig.parse(config)
    cached = start_flow(out_url, cfg.storage)

    version = cached(resolve_model_version)(models_url, cfg.version, cfg.storage)
    predict_cfg = cfg.predict_config(version.models, source, out_url, layout)
    describe_run(
        "segment",
        {"source": source, "model version": version.id, "models": version.models, "out": out_url},
        predict_cfg.public_dict(),
    )
    plan = cached(plan_shards)(predict_cfg, version)
    progress = Progress(sum(s.n for s in plan.shards), f"images of {source} predicted")
    futures = [cached(predict_shard).submit(predict_cfg, plan, s.shard) for s in plan.shards]
    size = {f.task_run_id: s.n for f, s in zip(futures, plan.shards, strict=True)}
    done = ran = 0
    for future in as_completed(futures):  # images over the whole archive, not shards
        done += size[future.task_run_id]
        # a shard cached from an earlier run took no time now: the rate counts only the rest
        ran += 0 if future.state.name == "Cached" else size[future.task_run_id]
        progress.update(done, ran)
    shards = [f.result() for f in futures]
    summary = cached(summarize_predictions)(predict_cfg, plan, shards)
    review = cached(review_predictions)(predict_cfg, summary, review_k)
    publish_review(review, cfg.storage)
    evaluation = None
    if cfg.truth:
        evaluation = cached(evaluate_predictions)(
            cfg.truth, cfg.evaluate_layout(predict_cfg), cfg.storage, summary
        )
    crops = cached(crop_masks)(cfg.crops_config(predict_cfg, out_url), plan, summary)
    publish_segmentation(summary, evaluation, crops)
    return {
        "version": version.id,
        "predictions": summary.model_dump(),
        "review": review.model_dump(),
        "evaluation": evaluation and evaluation.model_dump(),
        "crops": crops.model_dump(),
    }
