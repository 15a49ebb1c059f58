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

Aliases (``production``, ``previous``) and their history::

      versions/history/<time>-<uuid>.json   one object per alias move, never rewritten
      versions/aliases.json                 the aliases, derived from the history

Object stores have no locks, and a compare-and-swap (S3 conditional writes, GCS generations)
is not available on every store segflow runs on (MinIO versions, local folders). So the history
is the source of truth: every move is a *new* object with a unique, time-ordered name (two
writers can never overwrite each other's event), and the aliases are a pure function of the
sorted history. ``aliases.json`` is that function's result, written atomically after each event
and rewritten until the history it was derived from is still the whole history: whichever
writer finishes last has seen every earlier event, so concurrent promotions end in one
consistent alias and a complete history, in the order of the event names.

The replay (:func:`derive_aliases`) keeps production as a stack: a promotion pushes, a rollback
pops. It ignores, identically for every reader: a rollback whose demoted version is not
production at its point (a retry), and a ``gate`` event whose ``seen_production`` (the champion
it was evaluated against) is no longer production, or whose version a person took out of
production (a rollback, a manual promotion of another) since its last manual promotion.
"""

from __future__ import annotations

import getpass
import logging
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from segflow.errors import SegflowError
from segflow.storage import StorageOptions, Store, sha256_json

log = logging.getLogger("segflow.versions")

VERSIONS = "versions"
LATEST = "latest"
UNVERSIONED = "unversioned"
PRODUCTION = "production"
PREVIOUS = "previous"
ALIASES = f"{VERSIONS}/aliases.json"
HISTORY = f"{VERSIONS}/history"
_NOT_IDS = {LATEST, "aliases"}


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
        for f in root.list(VERSIONS, pattern=f"{VERSIONS}/*.json")
        if posixpath.dirname(f.rel) == VERSIONS
    ]
    ids = [n for n in names if n not in _NOT_IDS and "/" not in n]
    created = {i: root.read_json(f"{VERSIONS}/{i}.json").get("created_at", "") for i in ids}
    return sorted(ids, key=lambda i: (created[i], i))


def resolve_version(
    models_url: str, version: str | None = None, storage: StorageOptions | None = None
) -> ModelVersion:
    """The version ``version`` of the models at ``models_url``: an id, ``latest``, an alias
    (``production``, ``previous``), or ``None``: ``production``, and ``latest`` only while no
    production alias exists (logged either way, so a run says which model it used)."""
    root = Store(models_url, storage)
    if version is None or version in (PRODUCTION, PREVIOUS):
        target = read_aliases(models_url, storage).get(version or PRODUCTION)
        if target:
            log.info("model version: %s -> %s", version or PRODUCTION, target)
            return resolve_version(models_url, target, storage)
        if version is not None:
            raise VersionNotFound(
                f"no {version!r} alias at {root.url}: nothing has been promoted yet; promote "
                "a version with `segflow models promote ID --models URL --reason TEXT`"
            )
        log.info("model version: no production alias at %s; using latest", root.url)
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
            f"{known or 'none'} (or 'latest', 'production', 'previous')"
        )
    return _from_record(root, root.read_json(rel))


#: record sections that describe what happened to a version, not what it is: the model, its
#: threshold and post-processing are the same before and after it was gated
_HISTORY_SECTIONS = ("created_at", "gate")


def record_hash(record: dict[str, Any]) -> str:
    """The identity of a version for caching (segment keys, the gate's champion key): its
    record without its creation time and its ``gate`` section, so gating a version, or
    re-evaluating the production version, never invalidates what was segmented with it."""
    return sha256_json({k: v for k, v in record.items() if k not in _HISTORY_SECTIONS})


def write_version(
    models_url: str, record: dict[str, Any], storage: StorageOptions | None = None
) -> str:
    """Write ``versions/<id>.json``, then point ``latest.json`` at it; returns the record URL.
    A rewrite of an existing version (the same run key trained again) keeps its ``gate``
    section: it was written once, when that version was the challenger."""
    root = Store(models_url, storage)
    rel = f"{VERSIONS}/{record['version']}.json"
    if "gate" not in record and root.exists(rel):
        gate = root.read_json(rel).get("gate")
        record = {**record, "gate": gate} if gate is not None else record
    url = root.write_json(rel, record)
    root.write_json(f"{VERSIONS}/{LATEST}.json", record)
    return url


def update_record(
    models_url: str, version: str, storage: StorageOptions | None = None, **sections: Any
) -> dict[str, Any]:
    """Add or replace top-level sections (e.g. ``gate``) of ``versions/<id>.json``, and of
    ``latest.json`` when it is that version; returns the new record."""
    root = Store(models_url, storage)
    rel = f"{VERSIONS}/{version}.json"
    if not root.exists(rel):
        raise VersionNotFound(f"model version {version!r} not found at {root.url}")
    record = {**root.read_json(rel), **sections}
    root.write_json(rel, record)
    latest = f"{VERSIONS}/{LATEST}.json"
    if root.exists(latest) and root.read_json(latest).get("version") == version:
        root.write_json(latest, record)
    return record


def _from_record(root: Store, record: dict[str, Any]) -> ModelVersion:
    run = record.get("run", "")
    return ModelVersion(str(record["version"]), root.child(run).url if run else root.url, record)


def _has_folds(root: Store) -> bool:
    return bool(root.fs.glob(root.path("fold-*/fold.complete.json")))


# -- aliases -------------------------------------------------------------------------------------
_UNSET: Any = object()


@dataclass(frozen=True)
class AliasEvent:
    """One move of the production alias: who or what moved it, when, to which version, why."""

    version: str
    action: str  # gate | promote | rollback
    reason: str
    actor: str
    at: str = ""
    event: str = ""  # object name under versions/history/ (time-ordered, unique)
    # production when the writer decided: a ``gate`` event whose champion is no longer
    # production when the history is replayed does not take effect (compare-and-swap)
    seen_production: str | None = None
    demotes: str | None = None  # rollback: the version it takes out of production


@dataclass
class _Replay:
    stack: list[str] = field(default_factory=list)  # production versions, newest last
    ignored: list[str] = field(default_factory=list)  # event names that did not take effect
    # version -> the event that took it out of production by hand (rollback or promote)
    demoted: dict[str, AliasEvent] = field(default_factory=dict)


def _replay(events: list[AliasEvent]) -> _Replay:
    """The alias state machine. Production is the top of a stack: a promotion pushes, a rollback
    pops. Events that no longer apply at their point of the history are ignored, the same way
    by every reader: a ``gate`` event whose champion was replaced meanwhile, a ``gate`` event of
    a version a person took out of production, a rollback of a version that is not production
    (a retried rollback)."""
    r = _Replay()
    for e in events:
        production = r.stack[-1] if r.stack else None
        if e.action == "rollback":
            demotes = e.demotes if e.demotes is not None else e.seen_production
            if production is None or demotes != production:
                r.ignored.append(e.event)
                continue
            r.stack.pop()
            r.demoted[production] = e
            continue
        if e.action == "gate" and (e.seen_production != production or e.version in r.demoted):
            r.ignored.append(e.event)
            continue
        if e.action == "promote":
            r.demoted.pop(e.version, None)  # promoted by hand: the gate may move it again
            if production is not None and production != e.version:
                r.demoted[production] = e
        if e.version != production:
            r.stack.append(e.version)
    return r


def blocked_by(events: list[AliasEvent], version: str) -> AliasEvent | None:
    """The rollback (or manual promotion of another version) that took ``version`` out of
    production, when no manual promotion of it came since; the gate never undoes it."""
    return _replay(events).demoted.get(version)


def took_effect(events: list[AliasEvent], event: str) -> bool:
    """Whether the history event named ``event`` moved the aliases when replayed."""
    return any(e.event == event for e in events) and event not in _replay(events).ignored


def read_aliases(models_url: str, storage: StorageOptions | None = None) -> dict[str, Any]:
    """``{"production": id|None, "previous": id|None, ...}``; empty when nothing was promoted.
    ``aliases.json`` is trusted only while it was derived from the whole history: a writer that
    died between its event and the view leaves it behind, and then the history is replayed."""
    root = Store(models_url, storage)
    names = _event_names(root)
    if not names:
        return root.read_json(ALIASES) if root.exists(ALIASES) else {}
    if root.exists(ALIASES):
        view = root.read_json(ALIASES)
        if view.get("last_event") == names[-1] and view.get("events") == len(names):
            return view
    return derive_aliases(read_history(models_url, storage))


def _event_names(root: Store) -> list[str]:
    return sorted(
        posixpath.basename(f.rel).removesuffix(".json")
        for f in root.list(HISTORY, pattern="*.json")
    )


def read_history(models_url: str, storage: StorageOptions | None = None) -> list[AliasEvent]:
    """Every alias event, in the order that decides the aliases (by event name)."""
    root = Store(models_url, storage)
    events = []
    for f in root.list(HISTORY, pattern="*.json"):
        data = root.read_json(f.rel)
        events.append(AliasEvent(**{k: data.get(k) for k in AliasEvent.__dataclass_fields__}))
    return sorted(events, key=lambda e: e.event)


def derive_aliases(events: list[AliasEvent]) -> dict[str, Any]:
    """Replay the history (:func:`_replay`): production is the newest version standing,
    ``previous`` the one a rollback would return to. The same history always gives the same
    aliases, whoever replays it."""
    stack = _replay(events).stack
    last = events[-1] if events else None
    return {
        PRODUCTION: stack[-1] if stack else None,
        PREVIOUS: stack[-2] if len(stack) > 1 else None,
        "events": len(events),
        "last_event": last.event if last else None,
        "updated_at": last.at if last else None,
    }


def move_production(
    models_url: str,
    version: str,
    action: str,
    reason: str,
    actor: str | None = None,
    storage: StorageOptions | None = None,
    seen: str | None = _UNSET,
    demotes: str | None = None,
) -> dict[str, Any]:
    """Append one history event making ``version`` production, then bring ``aliases.json`` up to
    date with the whole history; returns the aliases (with ``"event"``: this event's name).
    ``seen``: production when the caller decided (default: now). Safe from concurrent writers."""
    root = Store(models_url, storage)
    if seen is _UNSET:
        seen = read_aliases(models_url, storage).get(PRODUCTION)
    now = datetime.now(UTC)
    # nanosecond time first: the history sorts in time order; the uuid makes names unique
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
    event = AliasEvent(
        version,
        action,
        reason,
        actor or default_actor(),
        now.isoformat(timespec="seconds"),
        name,
        seen,
        demotes,
    )
    root.write_json(f"{HISTORY}/{name}.json", event.__dict__)
    log.info("%s: production -> %s (%s; was %s)", action, version, reason, seen)
    return {**sync_aliases(models_url, storage), "event": name}


def sync_aliases(models_url: str, storage: StorageOptions | None = None) -> dict[str, Any]:
    """Rewrite ``aliases.json`` from the history until the history did not change meanwhile."""
    root = Store(models_url, storage)
    for _ in range(20):
        events = read_history(models_url, storage)
        aliases = derive_aliases(events)
        root.write_json(ALIASES, aliases)
        after = read_history(models_url, storage)
        if [e.event for e in after] == [e.event for e in events]:
            return aliases
    return aliases  # a storm of writers: the last of them writes the final view


def rollback(
    models_url: str,
    reason: str = "rollback",
    actor: str | None = None,
    storage: StorageOptions | None = None,
) -> dict[str, Any]:
    """Production goes back to ``previous`` (recorded as an event naming the version it
    demotes, so a retried rollback of the same version is a no-op, not a toggle)."""
    aliases = read_aliases(models_url, storage)
    target = aliases.get(PREVIOUS)
    if not target:
        raise VersionNotFound(
            f"nothing to roll back to at {Store(models_url, storage).url}: no 'previous' alias "
            f"(production is {aliases.get(PRODUCTION)!r}); promote a version by id instead"
        )
    current = aliases.get(PRODUCTION)
    return move_production(
        models_url, target, "rollback", reason, actor, storage, seen=current, demotes=current
    )


def default_actor() -> str:
    """Who moved an alias when nobody says: user@host, or the Prefect flow run."""
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            return f"flow run {ctx.flow_run.name} ({ctx.flow_run.id})"
    except Exception as e:  # prefect missing or not in a run: fall back to the user
        log.debug("no flow run to name as the actor: %s", e)
    return f"{_safe_user()}@{socket.gethostname()}"


def _safe_user() -> str:
    """The login name (getpass reads LOGNAME, USER, LNAME, USERNAME, then the password db)."""
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
