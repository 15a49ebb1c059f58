"""The per-image QA table of a predict run: ``<out>/summary.parquet`` and its twin
``<out>/summary.csv``, one row per input, predicted or rejected.

Each shard writes its own rows (``_shards/shard-<k>.summary.parquet``, one writer per file)
before its done-marker; the run's summary concatenates them shard by shard (one shard's rows
in memory at a time), adds the inputs the planner rejected, and fills the run-wide columns:
``model_version``, ``threshold``, ``postprocess`` and ``needs_review`` (``uncertainty >=`` the
version's calibrated review threshold; empty when the version has none).

Columns (:data:`SCHEMA`): ``id``, ``source`` (the input's URL; ``<dataset>#<row>`` for a
dataset row), ``width``, ``height`` (original pixels), ``model_version``, ``threshold``,
``postprocess``, ``foreground_fraction``, ``area_px``, ``n_components``, ``x0 y0 x1 y1`` (the
largest component's box, exclusive ends), ``mean_prob_fg`` (mean probability inside the mask),
``uncertainty`` (:mod:`segflow.predict.uncertainty`), ``needs_review``, ``status``
(``ok`` | ``rejected``), ``reason``, ``mask`` (the mask's path under the output folder).
"""

from __future__ import annotations

import heapq
import io
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from segflow.storage import Store

log = logging.getLogger("segflow.predict")

SUMMARY = "summary.parquet"
SUMMARY_CSV = "summary.csv"

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("model_version", pa.string()),
        ("threshold", pa.float64()),
        ("postprocess", pa.string()),
        ("foreground_fraction", pa.float64()),
        ("area_px", pa.int64()),
        ("n_components", pa.int64()),
        ("x0", pa.int64()),
        ("y0", pa.int64()),
        ("x1", pa.int64()),
        ("y1", pa.int64()),
        ("mean_prob_fg", pa.float64()),
        ("uncertainty", pa.float64()),
        ("needs_review", pa.bool_()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("mask", pa.string()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


def rejected_row(image_id: str, source: str | None, reason: str) -> dict[str, Any]:
    return {"id": image_id, "source": source, "status": "rejected", "reason": reason}


def write_rows(out: Store, rel: str, rows: list[dict[str, Any]]) -> str:
    """One shard's rows as Parquet (missing columns are null)."""
    table = pa.Table.from_pylist([_complete(r) for r in rows], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return out.write_bytes(rel, buf.getvalue())


def _complete(row: dict[str, Any]) -> dict[str, Any]:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown QA table columns {sorted(unknown)}; known: {COLUMNS}")
    return {c: row.get(c) for c in COLUMNS}


@dataclass(frozen=True)
class RunColumns:
    """The columns one run fills alike for every row."""

    model_version: str | None
    threshold: float
    postprocess: str
    review_threshold: float | None  # None: the version has no calibration


@dataclass
class TableStats:
    """What the summary keeps while streaming the rows: counts and the most uncertain rows."""

    k: int
    n_rows: int = 0
    n_ok: int = 0
    n_review: int = 0
    top: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)  # min-heap

    def add(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            self.n_rows += 1
            self.n_ok += r["status"] == "ok"
            self.n_review += bool(r["needs_review"])
            u = r["uncertainty"]
            if u is None or math.isnan(u):
                continue
            entry = (u, r["id"], {c: r[c] for c in ("id", "source", "uncertainty", "mask")})
            if len(self.top) < self.k:
                heapq.heappush(self.top, entry)
            elif entry[:2] > self.top[0][:2]:
                heapq.heapreplace(self.top, entry)

    def most_uncertain(self) -> list[dict[str, Any]]:
        return [e[2] for e in sorted(self.top, key=lambda e: (-e[0], e[1]))]


def concatenate(
    out: Store,
    parts: Iterable[str],
    extra: list[dict[str, Any]],
    run: RunColumns,
    k: int = 16,
) -> TableStats:
    """Write ``summary.parquet`` and ``summary.csv`` from the shards' row files ``parts``
    (absent ones are skipped) and the ``extra`` rows (the planner's rejections); returns the
    counts and the ``k`` most uncertain rows."""
    stats = TableStats(k)
    with tempfile.TemporaryDirectory(prefix="segflow-summary-") as tmp:
        local_pq, local_csv = os.path.join(tmp, SUMMARY), os.path.join(tmp, SUMMARY_CSV)
        with (
            pq.ParquetWriter(local_pq, SCHEMA) as pw,
            pacsv.CSVWriter(local_csv, SCHEMA) as cw,
        ):

            def emit(table: pa.Table) -> None:
                table = _fill(table, run)
                stats.add(table.to_pylist())
                pw.write_table(table)
                cw.write_table(csv_safe(table))

            missing = 0
            for rel in parts:
                if out.exists(rel):
                    emit(pq.read_table(io.BytesIO(out.read_bytes(rel)), schema=SCHEMA))
                else:
                    missing += 1
            if missing:
                # shards finished by a segflow before the QA table: their rows come back when
                # they run again (another model, threshold or TTA reruns every shard)
                log.warning(
                    "%d shards have no QA rows (predicted before the table existed)", missing
                )
            if extra:
                emit(pa.Table.from_pylist([_complete(r) for r in extra], schema=SCHEMA))
            if stats.n_rows == 0:
                emit(SCHEMA.empty_table())
        for name, path in ((SUMMARY, local_pq), (SUMMARY_CSV, local_csv)):
            with open(path, "rb") as f:
                out.write_bytes(name, f.read())
    return stats


#: a spreadsheet runs a cell starting with one of these as a formula (CSV injection, OWASP)
_FORMULA_START = r"^([=+\-@\t\r])"


def csv_safe(table: pa.Table) -> pa.Table:
    """``table`` with each text cell that a spreadsheet would run as a formula (an id or file
    name like ``=HYPERLINK(...)``) prefixed with ``'``; only for the CSV, the Parquet keeps the
    text as it is."""
    for i, f in enumerate(table.schema):
        if pa.types.is_string(f.type):
            safe = pc.replace_substring_regex(table[i], _FORMULA_START, r"'\1")
            table = table.set_column(i, f, safe)
    return table


def _fill(table: pa.Table, run: RunColumns) -> pa.Table:
    n = table.num_rows
    ok = pc.equal(table["status"], "ok")
    cols = {
        "model_version": pa.array([run.model_version] * n, pa.string()),
        "threshold": pa.array([run.threshold] * n, pa.float64()),
        "postprocess": pa.array([run.postprocess] * n, pa.string()),
    }
    if run.review_threshold is None:
        cols["needs_review"] = pa.nulls(n, pa.bool_())
    else:
        flag = pc.greater_equal(table["uncertainty"], run.review_threshold)
        cols["needs_review"] = pc.and_(flag, ok)
    for name, arr in cols.items():
        table = table.set_column(SCHEMA.get_field_index(name), name, arr)
    return table


def read_table(out: Store) -> pa.Table:
    return pq.read_table(io.BytesIO(out.read_bytes(SUMMARY)))
