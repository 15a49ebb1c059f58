"""Rewrite the generated figures block of docs/results.md from the benchmarks' JSON output.

``make bench`` runs every CPU benchmark with ``--json`` and keeps each one's stdout in
``benchmarks/results/<name>.out``; the last line that parses as a JSON object is its report.
This script turns those reports into one table: each benchmark's segflow figure, the
baseline it timed in the same run, their ratio and the target. Only the text between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is replaced, so hand-written sections of
the document stay as they are.

    python scripts/render_results.py benchmarks/results [--doc docs/results.md]
                                     [--mode fast|full] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
BENCHMARKS = ("ingest", "crops", "predict", "train", "serve")
# The benchmarks' own targets (TARGET_* in benchmarks/*.py; a test keeps them in step).
TARGETS = {
    ("ingest", "TARGET_VS_NAIVE"): 4.0,
    ("ingest", "TARGET_VS_FLOOR"): 0.9,
    ("crops", "TARGET_VS_FLOOR"): 0.8,
    ("predict", "TARGET_MODEL_RATIO"): 0.8,
    ("train", "TARGET_RATIO"): 0.9,
}
Report = dict


@dataclass(frozen=True)
class Row:
    """One line of the table: segflow against one baseline timed in the same run."""

    benchmark: str
    segflow: str  # the absolute figure, with its unit
    baseline: str  # what it is compared with, and that one's absolute figure
    ratio: float | None
    target: float | None = None  # ratio >= target passes; None: reported, no target

    def cells(self) -> list[str]:
        if self.ratio is None:
            return [self.benchmark, self.segflow, self.baseline, "n/a", "n/a"]
        ratio = f"{self.ratio:.2f}x"
        if self.target is None:
            return [self.benchmark, self.segflow, self.baseline, ratio, "none"]
        verdict = "met" if self.ratio >= self.target else "**missed**"
        return [self.benchmark, self.segflow, self.baseline, ratio, f"≥ {self.target}x: {verdict}"]


# -- reading --------------------------------------------------------------------------------------
def read_report(path: Path) -> Report:
    """The last JSON object printed in ``path``; ``{"failed": ...}`` when there is none."""
    if not path.is_file():
        return {"failed": f"no output ({path.name} missing)"}
    lines = path.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                return data
    last = next((x.strip() for x in reversed(lines) if x.strip()), "no output")
    return {"skipped": last} if "skipped" in last else {"failed": last[:200]}


# -- one function per benchmark: its report -> rows ------------------------------------------------
def _ips(v: float) -> str:
    return f"{v:.1f} img/s" if v >= 10 else f"{v:.2f} img/s"


def _get(rep: Report, *keys: str) -> float:
    """``rep[k1][k2]...``; a missing figure raises KeyError, which marks the benchmark."""
    value = rep
    for k in keys:
        value = value[k]
    return float(value)


def ingest_rows(rep: Report) -> list[Row]:
    name = f"ingest ({rep.get('n_images', '?')} full-res → {_size(rep.get('size'))})"
    seg = _get(rep, "images_per_s", "segflow")
    naive, floor = _get(rep, "images_per_s", "naive"), _get(rep, "images_per_s", "floor")
    vs_naive, vs_floor = TARGETS["ingest", "TARGET_VS_NAIVE"], TARGETS["ingest", "TARGET_VS_FLOOR"]
    return [
        Row(name, _ips(seg), f"naive {_ips(naive)}", seg / naive, vs_naive),
        Row("", "", f"decode floor {_ips(floor)}", seg / floor, vs_floor),
    ]


def crops_rows(rep: Report) -> list[Row]:
    name = f"crops ({rep.get('images', '?')} full-res, masked, {rep.get('format', '?')})"
    seg = _get(rep, "img_per_s", "segflow")
    floor, naive = _get(rep, "img_per_s", "floor"), _get(rep, "img_per_s", "naive")
    target = float(rep.get("target_vs_floor", TARGETS["crops", "TARGET_VS_FLOOR"]))
    return [
        Row(name, _ips(seg), f"decode floor {_ips(floor)}", seg / floor, target),
        Row("", "", f"naive {_ips(naive)}", seg / naive),
    ]


def predict_rows(rep: Report) -> list[Row]:
    folds = rep.get("folds")
    n_folds = len(folds) if isinstance(folds, list) else folds
    name = f"predict ({rep.get('encoder', '?')}, {n_folds} folds x {rep.get('tta', '?')})"
    seg = _get(rep, "images_per_s", "segflow")
    model, naive = _get(rep, "images_per_s", "model_only"), _get(rep, "images_per_s", "naive")
    target = TARGETS["predict", "TARGET_MODEL_RATIO"]
    return [
        Row(name, _ips(seg), f"model-only {_ips(model)}", seg / model, target),
        Row("", "", f"naive {_ips(naive)}", seg / naive, 1.0),
    ]


def train_rows(rep: Report) -> list[Row]:
    h, w = rep.get("size", ("?", "?"))
    name = f"train ({rep.get('encoder', '?')}, {h}x{w}, {rep.get('device', '?')})"
    zarr, memory = _get(rep, "images_per_s", "zarr"), _get(rep, "images_per_s", "memory")
    base = f"in memory {_ips(memory)}"
    return [
        Row(name, f"{_ips(zarr)} from Zarr", base, zarr / memory, TARGETS["train", "TARGET_RATIO"])
    ]


def serve_rows(rep: Report) -> list[Row]:
    loads = rep["loads"]
    folds = len(rep.get("folds", []))
    name = f"serve ({rep.get('encoder', '?')}, {folds} folds x {rep.get('tta', '?')})"
    floor = _get(loads, "in_process", "requests_per_s")
    one, many = _get(loads, "http_1", "requests_per_s"), _get(loads, "http_n", "requests_per_s")
    clients = loads["http_n"].get("clients", "n")
    base = f"in-process {floor:.2f} req/s"
    return [
        Row(name, f"HTTP, 1 client: {one:.2f} req/s", base, one / floor),
        Row("", f"HTTP, {clients} clients: {many:.2f} req/s", base, many / floor),
    ]


def memory_lines(reports: dict[str, Report]) -> list[str]:
    """Peak-memory figures, where a benchmark measured them (full mode)."""
    out = []
    mem = reports.get("ingest", {}).get("memory")
    if isinstance(mem, dict):
        for name, m in mem.items():
            if isinstance(m, dict) and "peak_rss_mib" in m:
                n = m.get("n_images", "?")
                out.append(f"ingest {name} ({n} images): peak RSS {m['peak_rss_mib']:.0f} MiB")
    pm = reports.get("predict", {}).get("memory")
    if isinstance(pm, dict) and "peak_rss_bytes" in pm:
        verdict = "met" if pm.get("pass") else "**missed**"
        out.append(
            f"predict {pm.get('n', '?')} small images: peak RSS "
            f"{_mib(pm['peak_rss_bytes'])} (target < 2 GiB: {verdict})"
        )
    return out


RENDERERS: dict[str, Callable[[Report], list[Row]]] = {
    "ingest": ingest_rows,
    "crops": crops_rows,
    "predict": predict_rows,
    "train": train_rows,
    "serve": serve_rows,
}


def rows_for(name: str, rep: Report) -> list[Row]:
    """The benchmark's rows, or one row saying why there are none."""
    for state in ("skipped", "failed"):
        if state in rep and not isinstance(rep[state], bool):
            return [Row(name, f"{state}: {rep[state]}", "", None)]
    if isinstance(rep.get("speed"), str):  # predict without real data
        return [Row(name, f"skipped: {rep['speed']}", "", None)]
    try:
        return RENDERERS[name](rep)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        return [Row(name, f"unreadable report ({type(e).__name__}: {e})", "", None)]


# -- writing --------------------------------------------------------------------------------------
def render_block(reports: dict[str, Report], mode: str, note: str | None, when: datetime) -> str:
    cores = os.cpu_count() or 0
    load = _load15()
    lines = [
        BEGIN,
        "<!-- generated by `make bench` (scripts/render_results.py); edits here are lost -->",
        "",
        f"Measured {when:%Y-%m-%d %H:%M} UTC by `make bench{' FAST=1' if mode == 'fast' else ''}`"
        f" ({mode} mode), {cores} CPU cores, no GPU."
        + (f" Load average over the last 15 minutes: {load:.1f}." if load is not None else ""),
    ]
    if note:
        lines += ["", f"**{note}**"]
    lines += [
        "",
        "Each ratio is segflow against a baseline timed in the same run (so background load hits",
        "both alike); the absolute figures beside it move with the machine.",
        "",
        "| benchmark | segflow | baseline (same run) | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for name in BENCHMARKS:
        if name in reports:
            lines += ["| " + " | ".join(r.cells()) + " |" for r in rows_for(name, reports[name])]
    if memory := memory_lines(reports):
        lines += ["", "Memory: " + "; ".join(memory) + "."]
    lines.append(END)
    return "\n".join(lines)


def replace_block(doc: str, block: str) -> str:
    """``doc`` with its bench block replaced, or the block appended when it has none."""
    start, end = doc.find(BEGIN), doc.find(END)
    if start == -1 and end == -1:
        return doc.rstrip("\n") + "\n\n" + block + "\n"
    if start == -1 or end == -1 or end < start or doc.count(BEGIN) > 1 or doc.count(END) > 1:
        raise ValueError(
            f"expected exactly one {BEGIN} followed by one {END}; fix the markers by hand"
        )
    return doc[:start] + block + doc[end + len(END) :]


def _size(size) -> str:
    return "x".join(str(x) for x in size) if isinstance(size, list | tuple) else "?"


def _mib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _load15() -> float | None:
    try:
        return os.getloadavg()[2]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="folder of <benchmark>.out files")
    p.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    p.add_argument("--mode", choices=("fast", "full"), default="full")
    p.add_argument("--note", help="a line shown above the table, e.g. about a shared machine")
    args = p.parse_args(argv)
    reports = {n: read_report(args.results / f"{n}.out") for n in BENCHMARKS}
    block = render_block(reports, args.mode, args.note, datetime.now(UTC))
    try:
        text = replace_block(args.doc.read_text(), block)
    except ValueError as e:
        print(f"error: {args.doc}: {e}", file=sys.stderr)
        return 2
    args.doc.write_text(text)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
