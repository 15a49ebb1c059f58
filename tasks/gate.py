"""Tasks of train_flow's champion-challenger gate (segflow.gate): check the benchmark before
training, evaluate challenger and champion after it, then move the production alias (or not),
and publish the ``promotion`` artifact.

:func:`run_gate` is what the flow calls after the version is recorded; it returns the
``promotion`` manifest::

    {"decision": "promoted" | "not promoted" | "not gated", "promoted": bool, "reason": str,
     "version": challenger id, "champion": id before the gate, "production": id after it,
     "record": the version record's ``gate`` section (absent when not gated)}

:func:`final_state` turns the flow's result into a Completed state whose message says
"not promoted" and why.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from segflow.gate import (
    NOT_GATED,
    PROMOTED,
    Benchmark,
    GateConfig,
    apply_gate,
    benchmark_listing,
    evaluate_gate,
    prepare_benchmark,
)
from segflow.pipeline.keys import task_key
from segflow.pipeline.manifests import (
    BenchmarkManifest,
    DatasetManifest,
    GateEvaluation,
    VersionManifest,
)
from segflow.storage import StorageOptions, Store, sha256_json
from segflow.tasks.common import IO_RETRIES, stage_task
from segflow.versions import PREVIOUS, PRODUCTION, read_aliases, record_hash


def _bench_key(
    gate: GateConfig, models_url: str, dataset: DatasetManifest, storage: StorageOptions
) -> str:
    # images and truth: a fixed truth mask re-checks the benchmark (and is refused as changed)
    listing = benchmark_listing(gate, storage)
    return task_key("gate", dataset.hash, _gate_hash(gate), listing, models_url)


@stage_task("check-benchmark", _bench_key)
def check_benchmark(
    gate: GateConfig, models_url: str, dataset: DatasetManifest, storage: StorageOptions
) -> BenchmarkManifest:
    """The frozen benchmark (ingested once, by content hash); refuses one that shares images
    with the training dataset."""
    bench = prepare_benchmark(gate, models_url, dataset.url, storage)
    return BenchmarkManifest(**bench.to_dict(), hash=bench.content_hash)


def _eval_key(
    gate: GateConfig,
    models_url: str,
    version: VersionManifest,
    benchmark: BenchmarkManifest,
    tta: str,
    storage: StorageOptions,
) -> str:
    aliases = read_aliases(models_url, storage)
    champion = _record_hash(models_url, aliases, storage)
    # the last history event too: a decision cached before aliases moved (a rollback, a manual
    # promotion) is never replayed after them
    return task_key(
        "gate",
        version.hash,
        benchmark.hash,
        _gate_hash(gate),
        tta,
        aliases.get(PRODUCTION),
        champion,
        aliases.get("last_event"),
    )


@stage_task("evaluate-gate", _eval_key)
def evaluate_challenger(
    gate: GateConfig,
    models_url: str,
    version: VersionManifest,
    benchmark: BenchmarkManifest,
    tta: str,
    storage: StorageOptions,
) -> GateEvaluation:
    """Score challenger and champion on the benchmark, with a paired bootstrap, and decide."""
    bench = Benchmark(benchmark.url, benchmark.content_hash, benchmark.n_images)
    res = evaluate_gate(gate, models_url, version.version, bench, tta, storage)
    png_url = None
    if res.disagreement_png:
        run = Store(version.run, storage)
        png_url = run.write_bytes("report/promotion.png", res.disagreement_png)
    return GateEvaluation(record=res.record, png=png_url, hash=sha256_json(res.record))


# not cached: it acts on the aliases as they are now, and is idempotent (replaying the same
# promotion twice leaves the aliases as once)
@task(name="apply-gate", **IO_RETRIES)
def apply_decision(
    models_url: str, version: VersionManifest, evaluation: GateEvaluation, storage: StorageOptions
) -> dict[str, Any]:
    """Record the gate section in the version record; move production when promoted (not when
    a person took this version out of production, or production moved during evaluation: the
    returned ``record`` then says "not promoted" and why)."""
    applied = apply_gate(models_url, version.version, evaluation.record, storage)
    aliases = applied.aliases
    return {
        "production": aliases.get(PRODUCTION),
        "previous": aliases.get(PREVIOUS),
        "record": applied.record,
    }


def run_gate(
    cached: Any,
    gate: GateConfig,
    models_url: str,
    version: VersionManifest,
    benchmark: BenchmarkManifest | None,
    tta: str,
    storage: StorageOptions,
) -> dict[str, Any]:
    """Evaluate, decide, apply and publish; without ``gate.benchmark`` nothing is gated (the
    aliases are left alone, so ``latest`` keeps serving until something is promoted)."""
    vid = version.version
    if benchmark is None:
        production = read_aliases(models_url, storage).get(PRODUCTION)
        reason = "no gate.benchmark configured: the aliases were not moved"
        create_markdown_artifact(
            f"# Not gated: `{vid}`\n\n* why: {reason}\n* production: `{production}`",
            key="promotion",
            description=f"gate decision for {vid}: {NOT_GATED}",
        )
        return {
            "decision": NOT_GATED,
            "promoted": False,
            "reason": reason,
            "version": vid,
            "champion": production,
            "production": production,
        }
    evaluation = cached(evaluate_challenger)(gate, models_url, version, benchmark, tta, storage)
    moved = apply_decision(models_url, version, evaluation, storage)
    record = moved["record"]
    promotion = {
        "decision": record["decision"],
        "promoted": bool(record["promote"]),
        "reason": record["reason"],
        "version": vid,
        "champion": record["champion"],
        "production": moved["production"],
        "record": record,
    }
    publish_promotion(promotion, evaluation.png, storage)
    return promotion


def final_state(result: dict[str, Any], promotion: dict[str, Any]) -> State | dict[str, Any]:
    """A run that did not promote still ends Completed, its message saying so and why."""
    if promotion["decision"] == PROMOTED:
        return Completed(message=f"promoted {promotion['version']}", data=result)
    return Completed(message=f"{promotion['decision']}: {promotion['reason']}", data=result)


def publish_promotion(
    promotion: dict[str, Any], png_url: str | None, storage: StorageOptions
) -> None:
    from segflow.pipeline.report import embed_png

    record = promotion["record"]
    mine, theirs = record["challenger_scores"], record.get("champion_scores") or {}
    rows = [
        {
            "metric": k,
            "challenger": mine.get(k),
            "champion": theirs.get(k),
            "difference": None if theirs.get(k) is None else round(mine[k] - theirs[k], 4),
        }
        for k in ("thresholded_jaccard", "jaccard", "dice", "threshold")
    ] + [
        {
            "metric": "postprocess",
            "challenger": mine["postprocess"],
            "champion": theirs.get("postprocess"),
            "difference": None,
        }
    ]
    create_table_artifact(
        rows,
        key="promotion-scores",
        description=f"{promotion['version']} vs champion {record['champion']} on the benchmark",
    )
    paired = record.get("paired")
    lines = [
        f"# {promotion['decision'].capitalize()}: `{promotion['version']}`",
        "",
        f"* why: {promotion['reason']}",
        f"* champion before the gate: `{record['champion']}`; production now: "
        f"`{promotion['production']}`",
        f"* benchmark: `{record['benchmark']['url']}` ({record['benchmark']['n_images']} images, "
        f"content hash `{record['benchmark']['content_hash'][:12]}`), TTA `{record['tta']}`",
        f"* rule: mode `{record['mode']}`, margin {record['margin']}, "
        f"min_score {record['min_score']}",
    ]
    if paired:
        lines.append(
            f"* paired: mean difference {paired['mean_difference']:+.4f}, "
            f"{paired['confidence']:.0%} CI [{paired['ci'][0]:+.4f}, {paired['ci'][1]:+.4f}] "
            f"({paired['n_better']} images better, {paired['n_worse']} worse)"
        )
    lines += ["", "| | challenger | champion |", "|---|---|---|"]
    lines += [f"| {r['metric']} | {r['challenger']} | {r['champion']} |" for r in rows]
    if png_url:
        folder, name = png_url.rsplit("/", 1)
        png = Store(folder, storage).read_bytes(name)
        lines += [
            "",
            "## Where they disagree most (left: challenger, right: champion; red: "
            "prediction, green: truth outline)",
            embed_png(png, "disagreement"),
        ]
    create_markdown_artifact(
        "\n".join(lines),
        key="promotion",
        description=f"gate decision for {promotion['version']}: {promotion['decision']}",
    )


def _record_hash(models_url: str, aliases: dict[str, Any], storage: StorageOptions) -> str | None:
    """The champion's record (without its gate section): a rewritten champion re-evaluates."""
    vid = aliases.get(PRODUCTION)
    if not vid:
        return None
    return record_hash(Store(models_url, storage).read_json(f"versions/{vid}.json"))


def _gate_hash(gate: GateConfig) -> str:
    return sha256_json(gate.model_dump(mode="json"))
