"""``ingest()``: discover -> plan -> decode on Dask -> finalize.

Resumability comes from one rule: the plan (which row goes to which slot) is written before any
pixel, each slot's record is written after its pixels, and the index arrays are written only
at the end. A run killed anywhere is rerun from the plan; slots with a record are not redone.
"""

from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from segflow import __version__
from segflow.cluster import cpu_count, dask_address
from segflow.ingest.config import IngestConfig
from segflow.ingest.dataset import Index, create_or_check, ensure_capacity, read_index, write_index
from segflow.ingest.layouts import RowSpec, discover
from segflow.ingest.worker import STAGING, Slot, WorkerContext, process_batch, record_name
from segflow.storage import Store

log = logging.getLogger("segflow.ingest")
PLAN = f"{STAGING}/plan.json"
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


def ingest(cfg: IngestConfig) -> IngestResult:
    t0 = time.perf_counter()
    source = Store(cfg.source, cfg.storage)
    masks = Store(cfg.masks or cfg.source, cfg.storage)
    ds = Store(cfg.dataset, cfg.storage)
    found = discover(cfg, source, masks)
    g = create_or_check(ds, cfg.size, cfg.resize, cfg.layout)
    plan = ds.read_json(PLAN) if ds.exists(PLAN) else None
    committed = read_index(g)
    if plan is not None:  # resuming: rows past base_n were never committed
        committed = committed.truncate(plan["base_n"])
    previous = ds.read_json(REPORT) if ds.exists(REPORT) else {}

    new, updated, unchanged, carried = _classify(found.rows, committed, previous, source)
    stale = sorted(set(committed.columns["ids"]) - {r.id for r in found.rows})
    if plan is None and not new and not updated:
        return _up_to_date(ds, g, committed, previous, unchanged, stale, t0)

    plan = _make_plan(ds, plan, committed, new, updated)
    slots = [Slot(**s) for s in plan["slots"]]
    ctx = WorkerContext(
        source, masks, ds, cfg.size, cfg.resize, cfg.max_pixels, cfg.hu_window, cfg.layout
    )
    ensure_capacity(g, max(s.index for s in slots) + 1, _any_masks(slots, cfg, g))
    todo = _todo(ds, slots)
    log.info(
        "ingest: %d slots planned, %d to decode, %d done before",
        len(slots),
        len(todo),
        len(slots) - len(todo),
    )
    _run_batches(todo, ctx, cfg)
    result = _finalize(cfg, ds, g, plan, committed, found, carried, stale, unchanged, t0)
    result.extra = {"decoded": len(todo), "resumed": len(slots) - len(todo)}
    return result


# -- planning -------------------------------------------------------------------------------------
def _classify(rows: list[RowSpec], committed: Index, previous: dict, source: Store):
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
    return new, updated, unchanged, _dedupe(carried)


def _make_plan(ds: Store, plan, committed: Index, new, updated) -> dict[str, Any]:
    """Assign slots. An existing plan keeps its assignments, so a resumed run writes the same
    rows to the same chunks; rows new since then go after its last slot."""
    slots: dict[str, dict[str, Any]] = {}
    if plan is not None:
        slots = {s["id"]: s for s in plan["slots"]}
    wanted = {r.id: r for r in new} | {r.id: r for _, r in updated}
    slots = {i: s for i, s in slots.items() if i in wanted}  # vanished since: leave a hole
    next_slot = max([committed.n - 1, *[s["index"] for s in slots.values()]]) + 1
    for k, r in updated:
        slots[r.id] = _slot(k, r)
    for r in new:
        if r.id in slots:
            slots[r.id] = _slot(slots[r.id]["index"], r)  # same slot, maybe a new fingerprint
        else:
            slots[r.id] = _slot(next_slot, r)
            next_slot += 1
    out = {
        "base_n": committed.n,
        "slots": sorted(slots.values(), key=lambda s: s["index"]),
        "rejected": (plan or {}).get("rejected", []),
        "segflow_version": __version__,
    }
    ds.write_json(PLAN, out)
    return out


def _slot(index: int, r: RowSpec) -> dict[str, Any]:
    return {
        "index": index,
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
    for s in slots:
        last = batches[-1]
        if len(last) >= size and last[-1].unit != s.unit:
            batches.append([])
        batches[-1].append(s)
    return [b for b in batches if b]


# -- finalize -------------------------------------------------------------------------------------
def _finalize(cfg, ds: Store, g, plan, committed: Index, found, carried, stale, unchanged, t0):
    slots = [Slot(**s) for s in plan["slots"]]
    records = _read_records(ds, slots)
    rejected = list(plan.get("rejected", []))
    rejected += [_reject_entry(r) for r in records.values() if r["status"] != "ok"]
    plan = _compact(ds, g, plan, slots, records, committed.n, rejected)
    slots = [Slot(**s) for s in plan["slots"]]

    cols = {k: list(v) for k, v in committed.columns.items()}
    quirks: collections.Counter[str] = collections.Counter()
    n_new = n_updated = 0
    for s in slots:
        rec = records.get(s.index)
        if rec is None or rec["status"] != "ok":
            continue
        quirks.update(rec["quirks"])
        if s.index < committed.n:
            n_updated += 1
        else:
            n_new += 1
            for col in cols.values():
                col.append(None)
        _set_row(cols, s.index, rec)
    index = Index(cols)
    write_index(g, index)
    report = _write_report(
        ds, found, rejected + carried, quirks, stale, n_new, n_updated, unchanged, t0
    )
    ds.write_json("config.json", cfg.public_dict())
    result = _result(ds, g, index, report, "ingested", n_new, n_updated, unchanged, t0)
    ds.mark_complete(MARKER, result.to_dict())
    ds.delete(STAGING, recursive=True)
    return result


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


def _compact(ds, g, plan, slots: list[Slot], records, base_n: int, rejected) -> dict[str, Any]:
    """Fill the slots of rejected new rows with the last good rows, so the dataset has no
    holes. The plan is rewritten before any chunk moves: a crash mid-move is resumed from it."""
    holes = sorted(
        s.index for s in slots if s.index >= base_n and records[s.index]["status"] != "ok"
    )
    good = sorted(
        s.index for s in slots if s.index >= base_n and records[s.index]["status"] == "ok"
    )
    moves: list[tuple[int, int]] = []
    while holes and good and good[-1] > holes[0]:
        moves.append((good.pop(), holes.pop(0)))
    keep = {s.index: s for s in slots if records[s.index]["status"] == "ok"}
    for src, dst in moves:
        keep[dst] = Slot(**{**asdict(keep.pop(src)), "index": dst})
    plan = {
        **plan,
        "slots": [asdict(s) for s in sorted(keep.values(), key=lambda s: s.index)],
        "rejected": rejected,
    }
    ds.write_json(PLAN, plan)
    for src, dst in moves:
        for name in ("images", "masks"):
            if name in g:
                g[name][dst] = g[name][src]
        rec = {**records.pop(src), "index": dst}
        records[dst] = rec
        ds.write_json(record_name(keep[dst]), rec)
    return plan


def _set_row(cols: dict[str, list[Any]], i: int, rec: dict[str, Any]) -> None:
    cols["ids"][i] = rec["id"]
    cols["groups"][i] = rec["group"]
    cols["sources"][i] = rec["source"]
    cols["mask_sources"][i] = rec.get("mask_source", "")
    cols["content_hashes"][i] = rec["content_hash"]
    cols["fingerprints"][i] = rec["fingerprint"]
    cols["has_mask"][i] = bool(rec["has_mask"])
    cols["orig_size"][i] = rec["orig_size"]
    cols["pad_box"][i] = rec["pad_box"]
    cols["orig_channels"][i] = rec["orig_channels"]


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


def _write_report(ds, found, decoded_rejects, quirks, stale, n_new, n_updated, unchanged, t0):
    previous = ds.read_json(REPORT) if ds.exists(REPORT) else {}
    listed = [
        {
            "source": s.source,
            "reason": s.reason,
            "detail": s.detail,
            "fingerprint": s.fingerprint,
            "decoded": False,
        }
        for s in found.rejected
    ]
    rejected = _dedupe(listed + decoded_rejects)
    total_quirks = collections.Counter(previous.get("quirks", {}))
    total_quirks.update(quirks)
    report = {
        "rejected": rejected,
        "counts": dict(collections.Counter(r["reason"] for r in rejected)),
        "quirks": dict(sorted(total_quirks.items())),
        "stale": {"count": len(stale), "ids": stale[:100]},
        "ignored_files": found.ignored,
        "last_run": {
            "new": n_new,
            "updated": n_updated,
            "unchanged": unchanged,
            "quirks": dict(quirks),
            "seconds": round(time.perf_counter() - t0, 3),
        },
    }
    ds.write_json(REPORT, report)
    return report


def _up_to_date(ds: Store, g, committed: Index, previous, unchanged, stale, t0) -> IngestResult:
    report = previous or {"rejected": [], "counts": {}, "quirks": {}}
    return _result(ds, g, committed, report, "up_to_date", 0, 0, unchanged, t0, len(stale))


def _result(ds, g, index: Index, report, status, n_new, n_updated, unchanged, t0, n_stale=None):
    return IngestResult(
        dataset=ds.url,
        status=status,
        n_images=index.n,
        n_new=n_new,
        n_updated=n_updated,
        n_unchanged=unchanged,
        n_rejected=len(report.get("rejected", [])),
        rejected_by_reason=dict(report.get("counts", {})),
        quirks=dict(report.get("quirks", {})),
        n_stale=n_stale if n_stale is not None else report.get("stale", {}).get("count", 0),
        content_hash=str(g.attrs.get("content_hash", "")),
        seconds=round(time.perf_counter() - t0, 3),
        report=ds.uri(REPORT),
    )
