"""Model versions: which trained ensemble a predictor or a server uses.

Contract (written by ``train_flow``, read by ``segment_flow``, ``segflow predict`` and
``segflow serve``)::

    <models_url>/
      runs/<key>/              one training run: splits.json, fold-k/, oof.zarr,
                               train_config.json, postprocess.json (a `segflow train` output)
      versions/<id>.json       the version record (below); <id> is deterministic: the run key
      versions/latest.json     a copy of the newest record

A version record holds ``version`` (its id), ``run`` (the run folder, relative to
``models_url``), ``created_at``, ``dataset`` (url, content_hash, n_images), ``config`` (the
public training config), ``folds``, ``scores`` (per-fold and out-of-fold) and ``choice`` (the
out-of-fold threshold and post-processing), plus ``code_version``.

A models URL without ``versions/`` is a plain ``segflow train`` output: it is its own run,
with the version id ``unversioned``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from segflow.errors import SegflowError
from segflow.storage import StorageOptions, Store

VERSIONS = "versions"
LATEST = "latest"
UNVERSIONED = "unversioned"


class VersionNotFound(SegflowError):
    """The requested model version does not exist under the models URL."""


@dataclass(frozen=True)
class ModelVersion:
    id: str
    models: str  # URL of the run folder that holds fold-k/ and postprocess.json
    record: dict[str, Any] = field(default_factory=dict)


def list_versions(models_url: str, storage: StorageOptions | None = None) -> list[str]:
    """Version ids under ``models_url``, oldest first (by ``created_at``)."""
    root = Store(models_url, storage)
    if not root.exists(VERSIONS):
        return []
    names = [
        posixpath.basename(f.rel).removesuffix(".json")
        for f in root.list(VERSIONS, pattern="*.json")
    ]
    ids = [n for n in names if n != LATEST]
    created = {i: root.read_json(f"{VERSIONS}/{i}.json").get("created_at", "") for i in ids}
    return sorted(ids, key=lambda i: (created[i], i))


def resolve_version(
    models_url: str, version: str | None = None, storage: StorageOptions | None = None
) -> ModelVersion:
    """The version ``version`` (default: the latest) of the models at ``models_url``."""
    root = Store(models_url, storage)
    if version in (None, LATEST):
        if root.exists(f"{VERSIONS}/{LATEST}.json"):
            return _from_record(root, root.read_json(f"{VERSIONS}/{LATEST}.json"))
        if version is None and _has_folds(root):
            return ModelVersion(UNVERSIONED, root.url, {"version": UNVERSIONED, "run": ""})
        raise VersionNotFound(
            f"no trained models at {root.url}: expected {VERSIONS}/{LATEST}.json (written by "
            "`segflow run` / train_flow) or fold-k/ folders (written by `segflow train`)"
        )
    if version == UNVERSIONED and _has_folds(root):
        return ModelVersion(UNVERSIONED, root.url, {"version": UNVERSIONED, "run": ""})
    rel = f"{VERSIONS}/{version}.json"
    if not root.exists(rel):
        known = list_versions(models_url, storage)
        raise VersionNotFound(
            f"model version {version!r} not found at {root.url}; available: "
            f"{known or 'none'} (or 'latest')"
        )
    return _from_record(root, root.read_json(rel))


def write_version(
    models_url: str, record: dict[str, Any], storage: StorageOptions | None = None
) -> str:
    """Write ``versions/<id>.json``, then point ``latest.json`` at it; returns the record URL."""
    root = Store(models_url, storage)
    url = root.write_json(f"{VERSIONS}/{record['version']}.json", record)
    root.write_json(f"{VERSIONS}/{LATEST}.json", record)
    return url


def _from_record(root: Store, record: dict[str, Any]) -> ModelVersion:
    run = record.get("run", "")
    return ModelVersion(str(record["version"]), root.child(run).url if run else root.url, record)


def _has_folds(root: Store) -> bool:
    return bool(root.fs.glob(root.path("fold-*/fold.complete.json")))
