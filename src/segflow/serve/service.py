"""What one server replica holds: the resolved model version, its ensemble and its choice.

The driver (``segflow serve``) resolves the version, the threshold and the post-processing
once, before any replica starts, so a bad ``--version`` fails at start and every replica
serves the same choice even if the aliases or ``versions/latest.json`` move meanwhile. Without
``--version`` that is ``production``, and ``latest`` only while nothing was promoted.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from segflow.errors import SegflowError
from segflow.predict.ensemble import Ensemble, load_ensemble
from segflow.predict.single import Prepared, SingleResult, finish, predict_one, prepare
from segflow.serve.config import ServeConfig
from segflow.storage import StorageOptions, Store
from segflow.versions import (
    LATEST,
    PREVIOUS,
    PRODUCTION,
    ModelVersion,
    VersionNotFound,
    list_versions,
    read_aliases,
    resolve_version,
)

ALIAS_TTL_S = 5.0  # how stale a request's ``?version=production`` check may be


class VersionMismatch(SegflowError):
    """A request asked for a model version that this server does not serve."""

    def __init__(self, message: str, available: list[str]) -> None:
        super().__init__(message)
        self.available = available


@dataclass(frozen=True)
class Resolved:
    """The served model, decided by the driver; picklable, so it travels to the replicas."""

    version: ModelVersion
    threshold: float
    postprocess: str
    # the names that selected it at start (latest, production, previous): a request may name
    # the version by them too; empty when the server was started with an id
    selectors: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)  # the body of GET /v1/model


def resolve(cfg: ServeConfig) -> Resolved:
    """The version, threshold and post-processing to serve; raises ``VersionNotFound``."""
    version = resolve_version(cfg.models, cfg.version, cfg.storage)
    threshold, method = _choice(version, cfg.storage)
    record = version.record
    config = record.get("config") or _read_json(version.models, cfg.storage, "train_config.json")
    info = {
        "version": version.id,
        "models": cfg.models,
        "run": version.models,
        "created_at": record.get("created_at"),
        "dataset": record.get("dataset") or {"url": (config or {}).get("dataset")},
        "code_version": record.get("code_version"),
        "config": config,
        "tta": cfg.tta,
        "threshold": threshold,
        "postprocess": method,
        "metrics": record.get("scores") or _run_metrics(version.models, cfg.storage),
    }
    selectors = _selectors(cfg.models, cfg.version, version.id, cfg.storage)
    return Resolved(version, threshold, method, selectors, _finite(info))


def _selectors(
    models: str, requested: str | None, served: str, storage: StorageOptions
) -> tuple[str, ...]:
    """The name ``resolve_version`` went through: the one asked for, or, without one,
    ``production`` when it named the served version and ``latest`` otherwise. A server does
    not follow later moves of its name (every replica serves one version): a request naming
    it after a promotion or a rollback is refused (:meth:`Service.check_version` re-reads the
    name), and the 404 names the served version and where the name points now."""
    if requested in (LATEST, PRODUCTION, PREVIOUS):
        return (requested,)
    if requested is not None:
        return ()
    return (PRODUCTION,) if read_aliases(models, storage).get(PRODUCTION) == served else (LATEST,)


def _choice(version: ModelVersion, storage: StorageOptions) -> tuple[float, str]:
    """The version record's out-of-fold choice, else what ``segflow predict`` would use."""
    choice = version.record.get("choice") or {}
    if "threshold" in choice and "postprocess" in choice:
        return float(choice["threshold"]), str(choice["postprocess"])
    from segflow.predict.postprocess import resolve_choice

    return resolve_choice(version.models, storage)


def _read_json(url: str, storage: StorageOptions, rel: str) -> dict[str, Any] | None:
    store = Store(url, storage)
    return store.read_json(rel) if store.exists(rel) else None


def _run_metrics(url: str, storage: StorageOptions) -> dict[str, Any]:
    """Out-of-fold scores (``postprocess.json``) and each fold's validation scores
    (``train_summary.json``) of a plain ``segflow train`` output."""
    oof = _read_json(url, storage, "postprocess.json")
    summary = _read_json(url, storage, "train_summary.json") or {}
    keys = ("fold", "status", "best_epoch", "dice", "jaccard", "thresholded_jaccard")
    folds = [{k: f.get(k) for k in keys} for f in summary.get("folds", [])]
    return {"oof": oof, "folds": folds}


def _finite(obj: Any) -> Any:
    """NaN and infinities (a fold that never validated) become None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class Service:
    """The ensemble of one replica, and everything a request needs from it."""

    def __init__(self, cfg: ServeConfig, resolved: Resolved, device: str | None = None) -> None:
        self.cfg = cfg
        self.resolved = resolved
        self.ensemble: Ensemble = load_ensemble(
            Store(resolved.version.models, cfg.storage), None, device
        )
        spec = self.ensemble.spec
        frame = {"size": list(spec.dataset_size), "resize": spec.resize}
        self.info = {
            **resolved.info,
            "folds": self.ensemble.folds,
            "frame": frame,
            "device": self.ensemble.device.type,
        }
        # Requests decode, post-process and encode in parallel threads; the model runs one
        # request at a time, as torch already spreads one forward pass over every core.
        self._model_lock = threading.Lock()
        self._aliases: dict[str, tuple[float, str | None]] = {}  # name -> (read at, version)

    @property
    def version(self) -> str:
        return self.resolved.version.id

    def check_version(self, requested: str | None) -> None:
        """Raise :class:`VersionMismatch` unless ``requested`` is the served version."""
        if requested in (None, "", self.version):
            return
        known = list_versions(self.cfg.models, self.cfg.storage) or [self.version]
        if requested in self.resolved.selectors:
            now = self._alias_target(requested)
            if now == self.version:
                return
            # the message goes to any client: it names versions, never where models are kept
            raise VersionMismatch(
                f"model version {requested!r} is not served here: this server serves "
                f"{self.version!r}, {requested!r} is now {now!r}. Ask the operator to restart "
                f"`segflow serve` to follow {requested!r}",
                known,
            )
        raise VersionMismatch(
            f"model version {requested!r} is not served here: this server serves "
            f"{self.version!r}; known versions: {known}. Ask the operator to start "
            f"`segflow serve --version {requested}` to serve another one",
            known,
        )

    def _alias_target(self, name: str) -> str | None:
        """The version ``name`` (production, previous, latest) points at now, re-read at most
        every ALIAS_TTL_S seconds: a promotion moves it away from the served version."""
        read_at, target = self._aliases.get(name, (-math.inf, None))
        if time.monotonic() - read_at > ALIAS_TTL_S:
            try:
                target = resolve_version(self.cfg.models, name, self.cfg.storage).id
            except VersionNotFound:
                target = None  # the name points nowhere now (aliases cleared)
            self._aliases[name] = (time.monotonic(), target)
        return target

    def prepare(self, data: bytes, name: str) -> Prepared:
        return prepare(data, name, self.ensemble.spec, self.cfg.max_pixels)

    def segment(self, prepared: Prepared) -> SingleResult:
        with self._model_lock:
            prob = predict_one(self.ensemble, prepared, self.cfg.tta)
        resolved = self.resolved
        return finish(prob, prepared.placement, resolved.threshold, resolved.postprocess)
