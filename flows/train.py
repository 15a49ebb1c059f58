"""train_flow: ingest -> folds (one task run per fold, on Ray) -> out-of-fold evaluation ->
threshold and post-processing -> a model-version record in ``models_url/versions/``."""

from __future__ import annotations

from typing import Any

from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from segflow.gate import GateConfig
from segflow.pipeline.artifacts import describe_run, publish_training
from segflow.pipeline.config import FlowConfig
from segflow.pipeline.stages import training_run
from segflow.tasks.common import segflow_flow, start_flow
from segflow.tasks.gate import check_benchmark, final_state, run_gate
from segflow.tasks.train import (
    choose_postprocessing,
    evaluate_oof,
    ingest_dataset,
    prepare_training,
    record_model_version,
    render_overlays,
    train_fold,
)


@segflow_flow(
    name="train",
    flow_run_name="train-{layout}",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=16),
)
def train_flow(
    dataset_source: str, layout: str, models_url: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    cfg = FlowConfig.parse(config)
    cached = start_flow(models_url, cfg.storage)

    gate = GateConfig.parse(cfg.gate)
    dataset = cached(ingest_dataset)(cfg.ingest_config(dataset_source, layout, models_url))
    # before any training: a benchmark that shares images with the training data is refused
    bench = None
    if gate.benchmark:
        bench = cached(check_benchmark)(gate, models_url, dataset, cfg.storage)
    train_cfg = training_run(cfg, models_url, dataset)
    describe_run(
        "train",
        {
            "source": dataset_source,
            "dataset": dataset.url,
            "data hash": dataset.hash,
            "run": train_cfg.models,
        },
        train_cfg.public_dict(),
    )
    plan = cached(prepare_training)(train_cfg, dataset)
    # one task run per fold, all at once: each asks Ray for its own GPU
    futures = [cached(train_fold).submit(train_cfg, plan, k) for k in plan.folds]
    wait(futures)  # every fold finishes (or fails) before any result is used
    folds = [f.result() for f in futures]
    oof = cached(evaluate_oof)(train_cfg, plan, folds)
    choice = cached(choose_postprocessing)(train_cfg, plan, folds)
    version = cached(record_model_version)(train_cfg, models_url, plan, folds, oof, choice)
    overlays = cached(render_overlays)(train_cfg, plan, version)
    publish_training(version, overlays, cfg.storage)
    tta = cfg.predict.get("tta", "flips")
    promotion = run_gate(cached, gate, models_url, version, bench, tta, cfg.storage)
    result = {
        "version": version.version,
        "promotion": {k: v for k, v in promotion.items() if k != "record"},
        "record": version.url,
        "dataset": dataset.model_dump(),
        "oof": oof.overall,
        "choice": choice.model_dump(include={"threshold", "postprocess"}),
    }
    return final_state(result, promotion)  # Completed; its message says "not promoted" and why
