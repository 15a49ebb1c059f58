"""The plan of a predict run, sharded: a small index and one items file per shard.

* ``_shards/manifest.json``, the index: ``format`` (2), ``shard_size``, ``layout``, the
  inputs left out (``rejected``) and one entry per shard, ``{"shard", "n", "hash"}`` (``hash``:
  the sha256 of the shard's items file), never the items themselves;
* ``_shards/items/shard-<k>.json``: ``{"shard": k, "items": [[id, ref, name, fingerprint],
  ...]}``, read by the worker that predicts shard ``k``.

An index of format 1 (every shard's items inline, as written before) is read as it is and
rewritten as format 2 by the next plan; its shards keep their numbers and done-markers.

:func:`plan` streams: the inputs go into a temporary SQLite file one row at a time, and the
questions a replan asks (which ids repeat, which inputs are new, which changed since they were
planned) are answered there, on disk, so planning a million objects holds neither the listing
nor the old plan in memory. What it costs besides is one pass over the old items files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from segflow.predict.shard import MANIFEST, SHARDS, shard_marker
from segflow.storage import Store

log = logging.getLogger("segflow.predict")

FORMAT = 2
ITEMS = f"{SHARDS}/items"

Item = list[str]  # [id, ref, output name, fingerprint]
ShardRef = dict[str, Any]  # {"shard": k, "n": items, "hash": sha256 of its items file}


def items_path(k: int) -> str:
    return f"{ITEMS}/shard-{k:05d}.json"


def read_index(out: Store) -> dict[str, Any] | None:
    """The index as written (format 1 or 2), or ``None`` before the first plan."""
    return out.read_json(MANIFEST) if out.exists(MANIFEST) else None


def shard_refs(out: Store) -> list[ShardRef]:
    """The planned shards, without their items (a format-1 index: with them)."""
    index = read_index(out)
    return index["shards"] if index else []


def read_shard(out: Store, ref: ShardRef) -> dict[str, Any]:
    """``{"shard": k, "items": [...]}`` of a planned shard (``ref`` may hold them already)."""
    if "items" in ref:
        return ref
    data = out.read_json(items_path(ref["shard"]))
    return {"shard": ref["shard"], "items": data["items"]}


_JSON = json.JSONEncoder(separators=(",", ":")).encode


def encode_item(item: Item) -> str:
    """An item as compact JSON, the same text ``json.dumps(item, separators=(",", ":"))``
    gives; a list of strings (every item, so far) takes the C string encoder directly."""
    try:
        return "[" + ",".join(map(encode_basestring_ascii, item)) + "]"
    except TypeError:  # a value that is not a string
        return _JSON(item)


def _write_shard(out: Store, k: int, bodies: list[str]) -> ShardRef:
    """Write shard ``k``'s items file from its items' JSON texts (joined, not re-encoded:
    planning a million fresh inputs never decodes them). Not fsynced one by one: the
    planner flushes the store once before it writes the index."""
    data = f'{{"shard":{k},"items":[{",".join(bodies)}]}}'.encode()
    out.write_bytes(items_path(k), data, durable=False)
    return {"shard": k, "n": len(bodies), "hash": hashlib.sha256(data).hexdigest()}


def _row(item: Item) -> tuple[str, str, str]:
    return item[0], item[1], encode_item(item)


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` decided: every shard, and which of them must run again."""

    shards: list[ShardRef]
    changed: list[int]
    rejected: list[dict[str, str]]


class _Scratch:
    """A temporary SQLite file: ``listing`` (this run's inputs) and ``planned`` (the items of
    the shards planned before, with their shard and position)."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="segflow-plan-")
        self.db = sqlite3.connect(os.path.join(self.dir.name, "plan.db"))
        for pragma in (
            "journal_mode=OFF",  # a scratch file: nothing to recover after a crash
            "synchronous=OFF",
            "temp_store=FILE",  # sorts spill to disk, not to memory
            "cache_size=-65536",  # 64 MiB of page cache, whatever the listing's size
        ):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE listing (id TEXT, ref TEXT, body TEXT)")
        self.db.execute("CREATE TABLE planned (id TEXT PRIMARY KEY, shard INT, pos INT, body TEXT)")

    def close(self) -> None:
        self.db.close()
        self.dir.cleanup()

    def add_inputs(self, items: Iterable[Item], batch: int = 10_000) -> None:
        rows: list[tuple[str, str, str]] = []
        for it in items:
            rows.append(_row(it))
            if len(rows) >= batch:
                self.db.executemany("INSERT INTO listing VALUES (?, ?, ?)", rows)
                rows = []
        self.db.executemany("INSERT INTO listing VALUES (?, ?, ?)", rows)
        self.db.execute("CREATE INDEX listing_id ON listing (id, ref)")

    def drop_duplicates(self) -> list[dict[str, str]]:
        """The first input of each id in path order stays; the others are rejected as
        ``duplicate_id``: two files of one id would write one mask, and which survived would
        depend on a thread race."""
        rejected = []
        repeated = self.db.execute(
            "SELECT id FROM listing GROUP BY id HAVING count(*) > 1 ORDER BY id"
        ).fetchall()
        for (image_id,) in repeated:
            rows = self.db.execute(
                "SELECT rowid, ref FROM listing WHERE id = ? ORDER BY ref", (image_id,)
            ).fetchall()
            kept = rows[0][1]
            for rowid, ref in rows[1:]:
                detail = f"id {image_id} is also {kept}, which is predicted"
                rejected.append(
                    {"file": ref, "id": image_id, "reason": "duplicate_id", "detail": detail}
                )
                self.db.execute("DELETE FROM listing WHERE rowid = ?", (rowid,))
        return rejected

    def add_planned(self, k: int, text: str) -> list[Item] | None:
        """Record shard ``k``'s items, from its items file's JSON ``text`` (parsed by SQLite,
        in C: a replan reads a million planned items without a Python object each); returns
        the items it keeps when an id it holds was already planned (manifests written before
        duplicate ids were refused), else None."""
        before = self.db.total_changes
        self.db.execute(
            "INSERT OR IGNORE INTO planned SELECT json_extract(value, '$[0]'), ?, key, value "
            "FROM json_each(?, '$.items')",
            (k, text),
        )
        n = self.db.execute("SELECT json_array_length(?, '$.items')", (text,)).fetchone()[0]
        if self.db.total_changes - before == n:
            return None
        items = json.loads(text)["items"]
        owned = {pos for (pos,) in self.db.execute("SELECT pos FROM planned WHERE shard = ?", (k,))}
        kept = [it for j, it in enumerate(items) if j in owned]
        self.db.execute("DELETE FROM planned WHERE shard = ?", (k,))
        self.db.executemany(
            "INSERT INTO planned VALUES (?, ?, ?, ?)",
            [(it[0], k, j, encode_item(it)) for j, it in enumerate(kept)],
        )
        return kept

    def changes(self) -> Iterator[tuple[int, list[tuple[int, Item]]]]:
        """``(shard, [(position, new item), ...])`` for each shard holding an input that was
        moved or rewritten since it was planned."""
        cur = self.db.execute(
            "SELECT p.shard, p.pos, l.body FROM planned p JOIN listing l ON l.id = p.id "
            "WHERE l.body != p.body ORDER BY p.shard, p.pos"
        )
        shard, found = None, []
        for k, pos, body in cur:
            if k != shard and found:
                yield shard, found  # type: ignore[misc]
                found = []
            shard = k
            found.append((pos, json.loads(body)))
        if found:
            yield shard, found  # type: ignore[misc]

    def fresh(self) -> Iterator[str]:
        """The JSON text of each input in no planned shard, sorted by id."""
        cur = self.db.execute(
            "SELECT l.body FROM listing l WHERE NOT EXISTS "
            "(SELECT 1 FROM planned p WHERE p.id = l.id) ORDER BY l.id, l.ref"
        )
        for (body,) in cur:
            yield body


def plan(
    out: Store,
    items: Iterable[Item],
    rejected: list[dict[str, str]],
    layout: str,
    size: int,
) -> Plan:
    """Keep the shards already planned; pack inputs in no shard into new ones. An input whose
    fingerprint changed stays in its shard, and that shard is marked to run again.

    Order of writes: a changed shard's done-marker is cleared before its items file is
    rewritten, and the index is written last, so a crash anywhere reruns that shard (the
    next plan sees the same change, or a marker already gone), and never skips it."""
    old = read_index(out) or {"shards": []}
    legacy = old.get("format", 1) < FORMAT and bool(old["shards"])
    scratch = _Scratch()
    try:
        scratch.add_inputs(items)
        rejected = [*rejected, *scratch.drop_duplicates()]
        shards: list[ShardRef] = []
        changed: set[int] = set()
        for ref in old["shards"]:
            ref, text = _load(out, ref)
            kept = scratch.add_planned(ref["shard"], text)
            if kept is not None:
                out.clear_marker(shard_marker(ref["shard"]))
                changed.add(ref["shard"])
                ref = _write_shard(out, ref["shard"], [encode_item(it) for it in kept])
            elif legacy:
                ref = _write_shard(out, ref["shard"], [encode_item(it) for it in ref["items"]])
            shards.append(ref)
        for k, moved in scratch.changes():
            out.clear_marker(shard_marker(k))  # first: see the docstring
            its = read_shard(out, shards[k])["items"]
            for pos, item in moved:
                its[pos] = item
            shards[k] = _write_shard(out, k, [encode_item(it) for it in its])
            changed.add(k)
        batch: list[str] = []
        for item in scratch.fresh():
            batch.append(item)
            if len(batch) == size:
                shards.append(_new_shard(out, len(shards), batch))
                batch = []
        if batch:
            shards.append(_new_shard(out, len(shards), batch))
    finally:
        scratch.close()
    out.flush()  # the items files reach the disk before the index that names them
    index = {
        "format": FORMAT,
        "shard_size": size,
        "layout": layout,
        "rejected": rejected,
        "shards": shards,
    }
    if any(old.get(k) != index[k] for k in index):
        out.write_json(MANIFEST, index)
    return Plan(shards, sorted(changed), rejected)


def _new_shard(out: Store, k: int, bodies: list[str]) -> ShardRef:
    out.clear_marker(shard_marker(k))  # a marker left by an earlier plan that never got indexed
    return _write_shard(out, k, bodies)


def _load(out: Store, ref: ShardRef) -> tuple[ShardRef, str]:
    """A planned shard's ref, as its items file now stands, and that file's text. The hash is
    taken again: a crash after an items file was rewritten and before the index was leaves
    a stale one, which would let a cached shard task skip the shard."""
    if "items" in ref:  # format 1
        return ref, '{"items":[' + ",".join(map(encode_item, ref["items"])) + "]}"
    data = out.read_bytes(items_path(ref["shard"]))
    digest = hashlib.sha256(data).hexdigest()
    text = data.decode()
    if digest != ref.get("hash"):
        ref = {"shard": ref["shard"], "n": len(json.loads(text)["items"]), "hash": digest}
    return ref, text
