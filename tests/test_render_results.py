"""scripts/render_results.py: the generated block of docs/results.md, from fake reports."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("render_results", REPO / "scripts/render_results.py")
render = importlib.util.module_from_spec(_spec)
sys.modules["render_results"] = render  # dataclasses look their module up while building
_spec.loader.exec_module(render)

# shapes as the benchmarks print them with --json (their last stdout line)
REPORTS = {
    "ingest": {
        "cores": 2,
        "n_images": 32,
        "size": [384, 512],
        "images_per_s": {"naive": 8.0, "floor": 40.0, "segflow": 36.0},
        "memory": {
            "fullres": {"n_images": 32, "peak_rss_mib": 128.4},
            "train": {"n_images": 2000, "peak_rss_mib": 168.0},
            "peak_rss_ratio": 1.1,
        },
    },
    "crops": {
        "images": 32,
        "format": "png",
        "img_per_s": {"naive": 2.0, "floor": 6.0, "segflow": 3.0},
        "target_vs_floor": 0.8,
    },
    "predict": {
        "folds": [0, 1],
        "encoder": "resnet18",
        "tta": "flips",
        "images_per_s": {"segflow": 0.9, "naive": 0.6, "model_only": 1.0},
        "memory": {"n": 2000, "peak_rss_bytes": 1.1 * 2**30, "pass": True},
    },
    "train": {
        "size": [128, 128],
        "encoder": "resnet34",
        "device": "cpu",
        "images_per_s": {"zarr": 9.5, "memory": 10.0},
    },
    "serve": {
        "folds": [0, 1],
        "encoder": "resnet18",
        "tta": "flips",
        "loads": {
            "in_process": {"clients": 1, "requests_per_s": 2.0},
            "http_1": {"clients": 1, "requests_per_s": 1.5},
            "http_n": {"clients": 4, "requests_per_s": 2.5},
        },
    },
}
WHEN = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


def _table(block: str) -> list[list[str]]:
    rows = [line for line in block.splitlines() if line.startswith("| ")][1:]  # no header
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


def test_every_benchmark_gives_its_absolute_figure_its_baseline_and_the_ratio():
    block = render.render_block(REPORTS, "full", None, WHEN)
    rows = _table(block)
    assert rows[0][:2] == ["ingest (32 full-res → 384x512)", "36.0 img/s"]
    assert rows[0][2:] == ["naive 8.00 img/s", "4.50x", "≥ 4.0x: met"]
    assert rows[1][2:] == ["decode floor 40.0 img/s", "0.90x", "≥ 0.9x: met"]
    assert rows[2][1:] == ["3.00 img/s", "decode floor 6.00 img/s", "0.50x", "≥ 0.8x: **missed**"]
    assert rows[3][2:] == ["naive 2.00 img/s", "1.50x", "none"]
    assert rows[4][0] == "predict (resnet18, 2 folds x flips)"
    assert rows[4][2:] == ["model-only 1.00 img/s", "0.90x", "≥ 0.8x: met"]
    assert rows[6][:2] == ["train (resnet34, 128x128, cpu)", "9.50 img/s from Zarr"]
    assert rows[6][2:] == ["in memory 10.0 img/s", "0.95x", "≥ 0.9x: met"]
    assert rows[7][1:4] == ["HTTP, 1 client: 1.50 req/s", "in-process 2.00 req/s", "0.75x"]
    assert rows[8][1] == "HTTP, 4 clients: 2.50 req/s"
    assert "ingest fullres (32 images): peak RSS 128 MiB" in block
    assert "predict 2000 small images: peak RSS 1.10 GiB (target < 2 GiB: met)" in block
    assert "Measured 2026-12-03 10:00 UTC" in block and "(full mode)" in block


def test_skipped_failed_and_changed_reports_are_marked_not_fatal():
    reports = {
        "ingest": {"skipped": "no ISIC images"},
        "crops": {"failed": "exit code 1"},
        "predict": {"speed": "skipped: no full-res JPEGs", "folds": [0]},
        "train": {"images_per_s": {"zarr": 1.0}},  # a renamed key: no crash, a marked row
        "serve": {**REPORTS["serve"], "loads": {}},
    }
    rows = _table(render.render_block(reports, "fast", "Shared machine.", WHEN))
    assert [r[1].split(":")[0] for r in rows] == [
        "skipped",
        "failed",
        "skipped",
        "unreadable report (KeyError",
        "unreadable report (KeyError",
    ]
    assert all(r[3] == "n/a" for r in rows)


def test_the_note_and_the_mode_are_stated_above_the_table():
    block = render.render_block(REPORTS, "fast", "Other jobs shared the machine.", WHEN)
    assert "**Other jobs shared the machine.**" in block
    assert "`make bench FAST=1` (fast mode)" in block
    assert block.index("shared the machine") < block.index("| benchmark |")


def test_only_the_marked_block_is_rewritten():
    doc = "# Results\n\nhand-written\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n"
    doc += "\n## Warm start\nmine\n"
    new = render.replace_block(doc, f"{render.BEGIN}\nnew\n{render.END}")
    assert new == doc.replace("old", "new")
    # idempotent: a second render replaces its own output
    assert render.replace_block(new, f"{render.BEGIN}\nnewer\n{render.END}").count("new") == 1
    assert render.replace_block("# R\n", "B").endswith("# R\n\nB\n")  # no markers: appended
    with pytest.raises(ValueError, match="exactly one"):
        render.replace_block(doc + render.BEGIN, "B")
    with pytest.raises(ValueError, match="exactly one"):
        render.replace_block(f"{render.END}\n{render.BEGIN}", "B")


def test_the_report_is_the_last_json_line_of_the_output(tmp_path):
    out = tmp_path / "train.out"
    out.write_text('train: Unet ...\n{"not": "this"}\n' + json.dumps(REPORTS["train"]) + "\n")
    assert render.read_report(out) == REPORTS["train"]
    out.write_text("ingest benchmark: skipped, no ISIC images under /x\n")
    assert render.read_report(out) == {
        "skipped": "ingest benchmark: skipped, no ISIC images under /x"
    }
    out.write_text('Traceback ...\nRuntimeError: boom\n{"failed": "exit code 1"}\n')
    assert render.read_report(out) == {"failed": "exit code 1"}
    assert "missing" in render.read_report(tmp_path / "none.out")["failed"]


def test_main_rewrites_the_document_from_a_results_folder(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for name, rep in REPORTS.items():
        (results / f"{name}.out").write_text(f"human lines\n{json.dumps(rep)}\n")
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nkeep me\n\n{render.BEGIN}\n{render.END}\n\nand me\n")
    assert render.main([str(results), "--doc", str(doc), "--mode", "fast"]) == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nkeep me\n\n<!-- bench:begin -->")
    assert text.endswith("<!-- bench:end -->\n\nand me\n")
    assert len(_table(text)) == 9
    doc.write_text(f"{render.BEGIN}\n{render.BEGIN}\n{render.END}\n")
    assert render.main([str(results), "--doc", str(doc)]) == 2  # broken markers: untouched
    assert doc.read_text() == f"{render.BEGIN}\n{render.BEGIN}\n{render.END}\n"


def test_targets_are_the_benchmarks_own():
    for (bench, name), value in render.TARGETS.items():
        tree = ast.parse((REPO / "benchmarks" / f"{bench}.py").read_text())
        found = [
            node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        ]
        assert found == [value], (bench, name)
