"""Cache keys for the flows' tasks: what a task's output depends on, and nothing else.

A key is the hash of
* the content hashes of the task's inputs, taken from the manifests that the upstream tasks
  returned (or, for the first stage, from a listing of the raw source);
* the stage config, without the fields that only change *how* it runs (workers, addresses);
* the code version: a hash of the source of every segflow module the stage runs, found by
  following its imports (see :func:`stage_modules`), so no list is kept by hand.

Prefect's default policy hashes the run id in, so it never reuses an earlier run's result;
these keys do, which makes a second run of an unchanged flow a run of cache hits.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path
from typing import Any

from segflow import __version__
from segflow.config import StageConfig
from segflow.storage import Store, sha256_json, sha256_listing

_PKG = Path(__file__).resolve().parents[1]

#: the module(s) whose functions each stage's task calls; everything they import from segflow,
#: directly or not, is part of that stage's code version
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "ingest": ("segflow.ingest",),
    "train": ("segflow.train.run",),
    "oof": ("segflow.train.oof",),
    "choose": ("segflow.predict.postprocess",),
    "report": ("segflow.pipeline.report",),
    # the record's shape is decided in stages.py; a change here only rewrites the same record
    "version": ("segflow.versions", "segflow.pipeline.stages"),
    "predict": ("segflow.predict.run", "segflow.predict.workers"),
    "evaluate": ("segflow.evaluate",),
    "crops": ("segflow.crops",),
    "review": ("segflow.predict.review",),
    "gate": ("segflow.gate",),
}


def stage_modules(stage: str, root: Path = _PKG) -> dict[str, Path]:
    """``module name -> file`` of every segflow module that ``stage`` runs: its entry modules
    and, transitively, every segflow module they import (at the top or inside a function).
    The ``__init__`` of the packages above each is hashed too (it runs on import), but its own
    imports are followed only where a module imports the package itself: a package that
    re-exports its stage must not tie every user of one submodule to all the others. Read with
    ``ast``: nothing is imported."""
    found: dict[str, Path] = {}
    followed: set[str] = set()
    todo = list(STAGE_ENTRIES[stage])
    while todo:
        name = todo.pop()
        path = _module_file(name, root)
        if name in followed or path is None:  # None: a name imported from a module
            continue
        followed.add(name)
        found[name] = path
        todo += _imports(name, path.name == "__init__.py", path.read_bytes())
        for parent in _parents(name):
            if (init := _module_file(parent, root)) is not None:
                found[parent] = init  # hashed; followed only if imported itself
    return dict(sorted(found.items()))


def _module_file(name: str, root: Path) -> Path | None:
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.lru_cache(maxsize=1024)
def _imports(name: str, is_package: bool, source: bytes) -> tuple[str, ...]:
    """The segflow modules that module ``name`` imports; ``from m import x`` names both ``m``
    and ``m.x``, since ``x`` may be a submodule (names that are not modules are dropped
    later). Cached by content: a file is parsed again only when it changed."""
    package = name if is_package else name.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1 packages
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            out += [base, *(f"{base}.{a.name}" for a in node.names)]
    return tuple(m for m in out if m == "segflow" or m.startswith("segflow."))


def code_hash(stage: str, root: Path = _PKG) -> str:
    """Hash of the package version and the source files behind ``stage``."""
    h = hashlib.sha256(__version__.encode())
    for path in stage_modules(stage, root).values():
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def code_version(stage: str) -> str:
    """:func:`code_hash` of the installed code, computed once per process."""
    return code_hash(stage)


def config_hash(cfg: StageConfig, exclude: frozenset[str] = frozenset()) -> str:
    """The fingerprint of the fields that decide a stage's output (locations excluded when
    they are derived from other inputs, e.g. a run folder named by this very key)."""
    drop = cfg.runtime_fields | exclude
    return sha256_json({k: v for k, v in cfg.public_dict().items() if k not in drop})


def listing_hash(store: Store, rel: str = "") -> str:
    """Hash of every object's path and fingerprint (ETag+size on S3, size+mtime locally)
    under ``rel``: changes when any file is added, removed or rewritten."""
    return sha256_listing(store, rel)  # streamed: the same hash without holding the listing


def task_key(stage: str, *parts: Any) -> str:
    """The cache key of one task: its stage, code version and hashed inputs."""
    return f"{stage}-{sha256_json([stage, code_version(stage), *parts])[:40]}"
