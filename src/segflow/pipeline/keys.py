"""Cache keys for the flows' tasks: what a task's output depends on, and nothing else.

A key is the hash of
* the content hashes of the task's inputs, taken from the manifests that the upstream tasks
  returned (or, for the first stage, from a listing of the raw source);
* the stage config, without the fields that only change *how* it runs (workers, addresses);
* the code version: a hash of the source files of the modules the stage runs.

Prefect's default policy hashes the run id in, so it never reuses an earlier run's result;
these keys do, which makes a second run of an unchanged flow a run of cache hits.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from segflow import __version__
from segflow.config import StageConfig
from segflow.storage import Store, sha256_json

_PKG = Path(__file__).resolve().parents[1]

#: the modules each stage runs (relative to src/segflow); a change to any of them invalidates
#: that stage's cache, and only that stage's
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "ingest": ("ingest", "imaging.py", "png.py", "geometry.py", "storage.py"),
    "train": ("train", "metrics.py", "ingest/dataset.py", "storage.py"),
    "oof": ("train/oof.py", "metrics.py", "storage.py"),
    "choose": ("predict/postprocess.py", "metrics.py", "storage.py"),
    "report": ("pipeline/report.py",),
    "version": ("versions.py", "pipeline"),
    "predict": ("predict", "train/model.py", "imaging.py", "png.py", "geometry.py", "storage.py"),
    "evaluate": ("evaluate.py", "imaging.py", "png.py", "geometry.py", "storage.py"),
    "crops": ("crops.py", "imaging.py", "png.py", "storage.py"),
    "gate": ("gate.py", "versions.py", "predict", "metrics.py", "ingest/dataset.py"),
}


@functools.cache
def code_version(stage: str) -> str:
    """Hash of the package version and the source files behind ``stage``."""
    h = hashlib.sha256(__version__.encode())
    for rel in STAGE_CODE[stage]:
        path = _PKG / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(_PKG)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def config_hash(cfg: StageConfig, exclude: frozenset[str] = frozenset()) -> str:
    """The fingerprint of the fields that decide a stage's output (locations excluded when
    they are derived from other inputs, e.g. a run folder named by this very key)."""
    drop = cfg.runtime_fields | exclude
    return sha256_json({k: v for k, v in cfg.public_dict().items() if k not in drop})


def listing_hash(store: Store, rel: str = "") -> str:
    """Hash of every object's path and fingerprint (ETag+size on S3, size+mtime locally)
    under ``rel``: changes when any file is added, removed or rewritten."""
    return sha256_json([(f.rel, f.fingerprint) for f in store.list(rel)])


def task_key(stage: str, *parts: Any) -> str:
    """The cache key of one task: its stage, code version and hashed inputs."""
    return f"{stage}-{sha256_json([stage, code_version(stage), *parts])[:40]}"
