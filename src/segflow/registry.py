"""The model registry behind ``segflow models list|show|promote|rollback``: the version records
and aliases of segflow.versions, as rows a person reads and moves a person makes."""

from __future__ import annotations

from typing import Any

from segflow.errors import InputError
from segflow.storage import StorageOptions, Store
from segflow.versions import (
    PREVIOUS,
    PRODUCTION,
    VERSIONS,
    VersionNotFound,
    list_versions,
    move_production,
    read_aliases,
    read_history,
    resolve_version,
)
from segflow.versions import rollback as rollback_alias


class IncompleteVersion(InputError):
    """A version whose folds did not all finish cannot be promoted."""


def require_versions(models_url: str, storage: StorageOptions | None = None) -> list[str]:
    """The version ids at ``models_url``; an error naming the URL when there are none."""
    ids = list_versions(models_url, storage)
    if not ids:
        root = Store(models_url, storage)
        raise VersionNotFound(
            f"no model versions at {root.url}: expected {root.uri(VERSIONS)}/<id>.json, "
            "written by train_flow (`segflow run`). Is this the models URL of a pipeline (not "
            "a run folder or a `segflow train` output)?"
        )
    return ids


def list_rows(models_url: str, storage: StorageOptions | None = None) -> list[dict[str, Any]]:
    """One row per version, oldest first: id, created, data, OOF and benchmark scores, gate
    decision, and the aliases that point at it."""
    ids = require_versions(models_url, storage)
    aliases = read_aliases(models_url, storage)
    rows = []
    for vid in ids:
        rec = resolve_version(models_url, vid, storage).record
        gate = rec.get("gate") or {}
        bench = gate.get("challenger_scores") or {}
        rows.append(
            {
                "id": vid,
                "created": rec.get("created_at"),
                "dataset_hash": (rec.get("dataset") or {}).get("hash", "")[:12],
                "n_images": (rec.get("dataset") or {}).get("n_images"),
                "oof_tj": _r(
                    ((rec.get("scores") or {}).get("oof") or {}).get("thresholded_jaccard")
                ),
                "oof_dice": _r(((rec.get("scores") or {}).get("oof") or {}).get("dice")),
                "bench_tj": _r(bench.get("thresholded_jaccard")),
                "bench_dice": _r(bench.get("dice")),
                "gate": gate.get("decision", ""),
                "aliases": [a for a in (PRODUCTION, PREVIOUS) if aliases.get(a) == vid],
            }
        )
    return rows


def show(models_url: str, version: str, storage: StorageOptions | None = None) -> dict[str, Any]:
    """The whole record of ``version`` (an id or an alias), with the aliases pointing at it."""
    require_versions(models_url, storage)
    rec = resolve_version(models_url, version, storage).record
    aliases = read_aliases(models_url, storage)
    return {
        **rec,
        "aliases": [a for a in (PRODUCTION, PREVIOUS) if aliases.get(a) == rec["version"]],
    }


def check_complete(models_url: str, version: str, storage: StorageOptions | None = None) -> None:
    """Every fold the version was trained with has finished (marker and weights)."""
    mv = resolve_version(models_url, version, storage)
    run = Store(mv.models, storage)
    cfg = mv.record.get("config") or {}
    wanted = (
        cfg.get("fold_ids") or list(range(int(cfg.get("folds") or 0))) or mv.record.get("folds")
    )
    missing = [
        k
        for k in wanted or []
        if not (run.exists(f"fold-{k}/fold.complete.json") and run.exists(f"fold-{k}/best.pt"))
    ]
    if missing or not wanted:
        raise IncompleteVersion(
            f"version {mv.id} has incomplete folds {missing or 'none recorded'} under {run.url} "
            "(no fold.complete.json / best.pt): it cannot be promoted. Rerun its training "
            "(`segflow run` resumes it), or promote another version"
        )


def promote(
    models_url: str,
    version: str,
    reason: str,
    actor: str | None = None,
    storage: StorageOptions | None = None,
) -> dict[str, Any]:
    """A manual promotion, recorded in the history with its reason; returns the aliases."""
    if not reason.strip():
        raise InputError("a promotion needs a reason: pass --reason TEXT")
    require_versions(models_url, storage)
    vid = resolve_version(models_url, version, storage).id
    check_complete(models_url, vid, storage)
    return move_production(models_url, vid, "promote", reason, actor, storage)


def rollback(
    models_url: str,
    reason: str = "rollback",
    actor: str | None = None,
    storage: StorageOptions | None = None,
) -> dict[str, Any]:
    """Production goes back to ``previous``, recorded; returns the aliases."""
    require_versions(models_url, storage)
    return rollback_alias(models_url, reason, actor, storage)


def history(models_url: str, storage: StorageOptions | None = None) -> list[dict[str, Any]]:
    return [e.__dict__ for e in read_history(models_url, storage)]


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)
