"""``ingest()``: discover -> plan -> decode on Dask -> commit.

Resumability comes from three rules:

1. Pixels are written only to scratch rows, at or past the committed ``n``, which the contract
   says are not part of the dataset. The plan (which row goes to which scratch slot) is written
   before any pixel; each slot's record after its pixels. A run killed before its commit is
   rerun from the plan, reconciled with the current listing: slots whose file vanished are
   dropped, slots whose file changed get a fresh slot, new files are appended.
2. The commit is a journal, ``_staging/commit.json``, written in full before the dataset
   changes: which scratch rows go where, the rows' index entries, the report and the summary.
   A run that finds a journal first rolls it forward; every step of it can be redone, so a kill
   anywhere in the commit leaves nothing that the next run trusts wrongly.
3. The journal is the last thing removed. Until then the commit is redone as written, never
   recomputed, so its rows are not counted as new twice nor its quirks counted again.
"""

from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import zarr

from segflow import __version__
from segflow.cluster import cpu_count, dask_address
from segflow.dataset import Index, read_index
from segflow.ingest.config import IngestConfig
from segflow.ingest.crash import crash_point
from segflow.ingest.layouts import discover
from segflow.ingest.rows import Discovery, RowSpec
from segflow.ingest.worker import STAGING, Slot, WorkerContext, process_batch, record_name
from segflow.ingest.writer import (
    copy_rows,
    create_or_check,
    ensure_capacity,
    trim_pixels,
    write_index,
)
from segflow.storage import Store

log = logging.getLogger("segflow.ingest")
PLAN = f"{STAGING}/plan.json"
JOURNAL = f"{STAGING}/commit.json"
_UPDATES_COPIED = f"{STAGING}/commit.updates-copied"
_NEW_MOVED = f"{STAGING}/commit.new-moved"
REPORT = "report.json"
MARKER = "ingest"


@dataclass
class IngestResult:
    """The ``--json`` summary of one ingest run."""

    dataset: str
    status: str  # "ingested" | "up_to_date"
    n_images: int
    n_new: int
    n_updated: int
    n_unchanged: int
    n_rejected: int
    rejected_by_reason: dict[str, int]
    quirks: dict[str, int]
    n_stale: int
    content_hash: str
    seconds: float
    report: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Change:
    """The listing compared with the committed rows."""

    new: list[RowSpec]
    updated: list[tuple[int, RowSpec]]  # (committed row, its new spec)
    unchanged: int
    carried: list[dict[str, Any]]  # decode failures of unchanged files: not retried
    stale: list[str]  # committed ids whose file is gone (their rows are kept)


@dataclass(frozen=True)
class RunInputs:
    """What one run knows before it commits."""

    cfg: IngestConfig
    ds: Store
    g: zarr.Group
    committed: Index
    found: Discovery
    change: Change
    previous_report: dict[str, Any]
    t0: float


@dataclass(frozen=True)
class Outcome:
    """What the decoded slots add up to."""

    n_new: int
    n_updated: int
    row_quirks: dict[str, list[str]]  # this run's rows (id -> quirks)
    decode_rejects: list[dict[str, Any]]


def ingest(cfg: IngestConfig) -> IngestResult:
    t0 = time.perf_counter()
    source = Store(cfg.source, cfg.storage)
    masks = Store(cfg.masks or cfg.source, cfg.storage)
    ds = Store(cfg.dataset, cfg.storage)
    g = create_or_check(ds, _geometry(cfg))
    if ds.exists(JOURNAL):  # a commit was cut short: finish it before anything reads the index
        _apply_journal(ds, g, ds.read_json(JOURNAL))
    found = discover(cfg, source, masks)
    committed = read_index(g)
    previous = ds.read_json(REPORT) if ds.exists(REPORT) else {}
    change = _classify(found.rows, committed, previous, source)
    plan = ds.read_json(PLAN) if ds.exists(PLAN) else None
    if plan is not None and plan.get("base_n") != committed.n:
        log.warning("ingest: discarding a plan made for %s rows", plan.get("base_n"))
        ds.delete(STAGING, recursive=True)
        plan = None
    run = RunInputs(cfg, ds, g, committed, found, change, previous, t0)
    if plan is None and not change.new and not change.updated and previous:
        return _up_to_date(run)  # (a first run writes its report even when no row is good)
    if plan is None:
        # Without a plan nothing in _staging is this run's: a record or a commit step marker
        # left by a run killed part-way through removing _staging would be trusted wrongly.
        ds.delete(STAGING, recursive=True)
        trim_pixels(g, committed.n)

    plan = _make_plan(ds, plan, committed.n, change)
    slots = [Slot(**s) for s in plan["slots"]]
    ctx = WorkerContext(
        source,
        masks,
        ds,
        cfg.size,
        cfg.resize,
        cfg.max_pixels,
        cfg.hu_window,
        cfg.layout,
        cfg.mask_positive,
    )
    ensure_capacity(g, plan["next_index"], _any_masks(slots, cfg, g))
    crash_point("planned")
    todo = _todo(ds, slots)
    log.info(
        "ingest: %d slots planned, %d to decode, %d done before",
        len(slots),
        len(todo),
        len(slots) - len(todo),
    )
    _run_batches(todo, ctx, cfg)
    crash_point("decoded")
    extra = {"decoded": len(todo), "resumed": len(slots) - len(todo)}
    return _commit(run, slots, extra)


def _geometry(cfg: IngestConfig) -> dict[str, Any]:
    positive = "drawn" if cfg.layout == "luna" else cfg.mask_positive
    return {
        "size": cfg.size,
        "resize": cfg.resize,
        "layout": cfg.layout,
        "mask_positive": positive,
    }


# -- planning -------------------------------------------------------------------------------------
def _classify(rows: list[RowSpec], committed: Index, previous: dict, source: Store) -> Change:
    pos = {i: k for k, i in enumerate(committed.columns["ids"])}
    fps = committed.columns["fingerprints"]
    known_bad = {
        (r["source"], r["fingerprint"]): r for r in previous.get("rejected", []) if r.get("decoded")
    }
    new, updated, carried, unchanged = [], [], [], 0
    for r in rows:
        k = pos.get(r.id)
        bad = known_bad.get((source.uri(r.image), r.fingerprint))
        if k is not None and fps[k] == r.fingerprint:
            unchanged += 1
        elif bad is not None:  # failed to decode before and unchanged since: don't retry
            carried.append(bad)
        elif k is None:
            new.append(r)
        else:
            updated.append((k, r))
    stale = sorted(set(pos) - {r.id for r in rows})
    return Change(new, updated, unchanged, _dedupe(carried), stale)


def _make_plan(ds: Store, plan: dict | None, base_n: int, change: Change) -> dict[str, Any]:
    """Assign every row to decode a scratch slot at or past ``base_n``.

    A plan left by a killed run is reconciled with the listing: a slot whose row is still
    wanted with the same fingerprint keeps its index, so its finished work is reused; every
    other row gets a fresh index. Indices are never reused while the plan lives (the plan
    keeps its high-water mark), so a record can only ever describe the pixels at its index."""
    old_slots = (plan or {}).get("slots", [])
    old = {(s["id"], s["fingerprint"]): s for s in old_slots}
    next_index = max(
        [base_n, (plan or {}).get("next_index", 0), *[s["index"] + 1 for s in old_slots]]
    )
    wanted = [(None, r) for r in change.new] + [(k, r) for k, r in change.updated]
    slots = []
    for row, r in sorted(wanted, key=lambda t: t[1].id):
        kept = old.get((r.id, r.fingerprint))
        if kept is not None and kept.get("row") == row:
            index = kept["index"]
        else:
            index, next_index = next_index, next_index + 1
        slots.append(_slot(index, row, r))
    out = {
        "base_n": base_n,
        "next_index": next_index,
        "slots": sorted(slots, key=lambda s: s["index"]),
        "segflow_version": __version__,
    }
    ds.write_json(PLAN, out)
    return out


def _slot(index: int, row: int | None, r: RowSpec) -> dict[str, Any]:
    return {
        "index": index,
        "row": row,
        "id": r.id,
        "group": r.group,
        "unit": r.unit,
        "image": r.image,
        "mask": r.mask,
        "fingerprint": r.fingerprint,
        "extra": r.extra,
    }


def _any_masks(slots: list[Slot], cfg: IngestConfig, g) -> bool:
    return cfg.layout == "luna" or "masks" in g or any(s.mask for s in slots)


def _todo(ds: Store, slots: list[Slot]) -> list[Slot]:
    have = {f.rel for f in ds.list(f"{STAGING}/rows")}  # rels are relative to the store
    return [s for s in slots if record_name(s) not in have]


def _run_batches(todo: list[Slot], ctx: WorkerContext, cfg: IngestConfig) -> None:
    if not todo:
        return
    import dask

    # Decoding releases the GIL and workers also wait on storage: 2 threads per core keep the
    # cores busy while half of the threads wait on writes.
    workers = cfg.workers or 2 * cpu_count()
    # ~2 tasks per worker: enough to balance mixed image sizes, few enough to amortise each
    # task's overhead (measured on 32 full-res JPEGs, 2 cores: 4 per worker was ~10% slower)
    size = cfg.batch_size or max(1, min(32, -(-len(todo) // (2 * workers))))
    batches = _pack(todo, size)
    tasks = [dask.delayed(process_batch, pure=False)(b, ctx) for b in batches]
    if address := dask_address(cfg.dask_address):
        from distributed import Client

        with Client(address) as client:
            client.compute(tasks, sync=True)
    else:
        dask.compute(*tasks, scheduler="threads", num_workers=workers)


def _pack(slots: list[Slot], size: int) -> list[list[Slot]]:
    """Batches of about ``size`` rows that never split a unit (a CT series is read once)."""
    batches: list[list[Slot]] = [[]]
    for s in sorted(slots, key=lambda s: (s.unit, s.index)):
        last = batches[-1]
        if len(last) >= size and last[-1].unit != s.unit:
            batches.append([])
        batches[-1].append(s)
    return [b for b in batches if b]


# -- commit ---------------------------------------------------------------------------------------
def _commit(run: RunInputs, slots: list[Slot], extra: dict[str, Any]) -> IngestResult:
    """Turn the decoded slots into a journal, then apply it."""
    records = _read_records(run.ds, slots)
    ok = [s for s in slots if records[s.index]["status"] == "ok"]
    base_n = run.committed.n
    updates = [(s.index, s.row) for s in ok if s.row is not None]
    new = sorted((s for s in ok if s.row is None), key=lambda s: s.index)
    n = base_n + len(new)
    # New rows fill [base_n, n): a slot already there stays; the others move into the free
    # places, all of which lie below every moving slot, so no move reads what another wrote.
    staying = {s.index for s in new if s.index < n}
    free = iter(sorted(set(range(base_n, n)) - staying))
    final = {s.index: s.index if s.index in staying else next(free) for s in new}
    moves = [(s.index, final[s.index]) for s in new if final[s.index] != s.index]
    rows = {str(final[s.index]): _index_entry(records[s.index]) for s in new}
    rows |= {str(s.row): _index_entry(records[s.index]) for s in ok if s.row is not None}
    outcome = Outcome(
        n_new=len(new),
        n_updated=len(updates),
        row_quirks={records[s.index]["id"]: records[s.index]["quirks"] for s in ok},
        decode_rejects=[_reject_entry(r) for r in records.values() if r["status"] != "ok"],
    )
    report = _report(run, outcome)
    result = _result(run, report, "ingested", outcome, n)
    result.extra = extra
    journal = {
        "base_n": base_n,
        "n": n,
        "updates": updates,
        "moves": moves,
        "rows": rows,
        "report": report,
        "config": run.cfg.public_dict(),
        "result": result.to_dict(),
    }
    # No journal exists here, so a step marker is a leftover of a run killed after its journal
    # was removed (an update-only run keeps its plan, base_n == n): trusted, it would skip this
    # journal's copies. Only here, never before the journal is removed: a redo of that journal
    # after trim_pixels would copy from scratch rows that are gone.
    run.ds.delete(_UPDATES_COPIED)
    run.ds.delete(_NEW_MOVED)
    run.ds.write_json(JOURNAL, journal)
    crash_point("journal")
    _apply_journal(run.ds, run.g, journal)
    result.content_hash = str(run.g.attrs.get("content_hash", ""))
    return result


def _apply_journal(ds: Store, g: zarr.Group, journal: dict[str, Any]) -> None:
    """Make the dataset what the journal says. Each step gives the same result when redone;
    the two copy steps are marked done because the second overwrites what the first reads."""
    if not ds.exists(_UPDATES_COPIED):
        copy_rows(ds, g, [tuple(m) for m in journal["updates"]])
        ds.write_bytes(_UPDATES_COPIED, b"")
    crash_point("updates_copied")
    if not ds.exists(_NEW_MOVED):
        copy_rows(ds, g, [tuple(m) for m in journal["moves"]])
        ds.write_bytes(_NEW_MOVED, b"")
    crash_point("new_moved")
    index = read_index(g, journal["base_n"])
    cols = index.columns
    for col in cols.values():
        col.extend([None] * (journal["n"] - journal["base_n"]))
    for i, entry in journal["rows"].items():
        for name, value in entry.items():
            cols[name][int(i)] = value
    write_index(g, index)
    crash_point("attrs")
    ds.write_json(REPORT, journal["report"])
    ds.write_json("config.json", journal["config"])
    crash_point("report")
    result = {**journal["result"], "content_hash": str(g.attrs.get("content_hash", ""))}
    ds.mark_complete(MARKER, result)
    crash_point("marker")
    ds.delete(JOURNAL)  # alone and first: once it is gone, nothing of this run is redone
    crash_point("journal_removed")
    ds.delete(STAGING, recursive=True)  # what it leaves if cut short, the next run discards


def _read_records(ds: Store, slots: list[Slot]) -> dict[int, dict[str, Any]]:
    def read(s: Slot):
        rel = record_name(s)
        return s.index, ds.read_json(rel) if ds.exists(rel) else None

    with ThreadPoolExecutor(16) as pool:
        found = dict(pool.map(read, slots))
    missing = [s.index for s in slots if found[s.index] is None]
    if missing:
        raise RuntimeError(
            f"ingest: {len(missing)} planned rows have no record (e.g. {missing[:5]})"
        )
    return found  # type: ignore[return-value]


def _index_entry(rec: dict[str, Any]) -> dict[str, Any]:
    """A decoded row's values for every index column."""
    return {
        "ids": rec["id"],
        "groups": rec["group"],
        "sources": rec["source"],
        "mask_sources": rec.get("mask_source", ""),
        "content_hashes": rec["content_hash"],
        "fingerprints": rec["fingerprint"],
        "has_mask": bool(rec["has_mask"]),
        "orig_size": rec["orig_size"],
        "pad_box": rec["pad_box"],
        "orig_channels": rec["orig_channels"],
    }


def _reject_entry(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": rec["source"],
        "reason": rec["reason"],
        "detail": rec["detail"],
        "fingerprint": rec["fingerprint"],
        "decoded": True,
    }


def _dedupe(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for e in entries:
        key = (e["source"], e["reason"])
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _report(run: RunInputs, outcome: Outcome) -> dict[str, Any]:
    """report.json after this run. Quirks are kept per row (``row_quirks``, id -> quirks) and
    counted over the dataset's rows, so they describe the dataset as it is, whatever path of
    runs led to it: a rewritten file replaces its row's quirks instead of adding to them."""
    listed = [
        {
            "source": s.source,
            "reason": s.reason,
            "detail": s.detail,
            "fingerprint": s.fingerprint,
            "decoded": False,
        }
        for s in run.found.rejected
    ]
    rejected = _dedupe(listed + outcome.decode_rejects + run.change.carried)
    row_quirks = dict(run.previous_report.get("row_quirks", {}))
    for image_id, quirks in outcome.row_quirks.items():
        row_quirks.pop(image_id, None)
        if quirks:
            row_quirks[image_id] = sorted(set(quirks))
    run_quirks = collections.Counter(q for qs in outcome.row_quirks.values() for q in set(qs))
    return {
        "rejected": rejected,
        "counts": dict(collections.Counter(r["reason"] for r in rejected)),
        "quirks": _count_quirks(row_quirks),
        "row_quirks": dict(sorted(row_quirks.items())),
        "stale": {"count": len(run.change.stale), "ids": run.change.stale[:100]},
        "ignored_files": run.found.ignored,
        "last_run": {
            "new": outcome.n_new,
            "updated": outcome.n_updated,
            "unchanged": run.change.unchanged,
            "quirks": dict(sorted(run_quirks.items())),
            "seconds": round(time.perf_counter() - run.t0, 3),
        },
    }


def _count_quirks(row_quirks: dict[str, list[str]]) -> dict[str, int]:
    return dict(sorted(collections.Counter(q for qs in row_quirks.values() for q in qs).items()))


def _up_to_date(run: RunInputs) -> IngestResult:
    report = run.previous_report or {"rejected": [], "counts": {}, "quirks": {}}
    report = {**report, "stale": {"count": len(run.change.stale)}}
    return _result(run, report, "up_to_date", Outcome(0, 0, {}, []), run.committed.n)


def _result(
    run: RunInputs, report: dict[str, Any], status: str, outcome: Outcome, n: int
) -> IngestResult:
    return IngestResult(
        dataset=run.ds.url,
        status=status,
        n_images=n,
        n_new=outcome.n_new,
        n_updated=outcome.n_updated,
        n_unchanged=run.change.unchanged,
        n_rejected=len(report.get("rejected", [])),
        rejected_by_reason=dict(report.get("counts", {})),
        quirks=dict(report.get("quirks", {})),
        n_stale=report.get("stale", {}).get("count", 0),
        content_hash=str(run.g.attrs.get("content_hash", "")),
        seconds=round(time.perf_counter() - run.t0, 3),
        report=run.ds.uri(REPORT),
    )
