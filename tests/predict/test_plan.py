"""Planning a bulk predict run without holding the archive: the sharded manifest (round trip,
resume, a changed input, a crash before the index, old manifests), the lister seam that
benchmarks/plan.py feeds a synthetic million-object listing through, and the progress
figures."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from segflow.predict.config import PredictConfig
from segflow.predict.manifest import ITEMS, items_path
from segflow.predict.run import (
    MANIFEST,
    Inputs,
    list_inputs,
    pending_shards,
    plan_shards,
    read_shard,
    shard_marker,
)
from segflow.progress import progress_figures
from segflow.storage import FileInfo, Store

REPO = Path(__file__).resolve().parents[2]


def listing(n: int, changed: dict[int, str] | None = None, extra: tuple[str, ...] = ()):
    """A fake lister: ``n`` objects ``img/<k>.jpg`` (ids img/0000...), unsorted on purpose."""
    changed = changed or {}

    def lister(url, storage):
        for k in reversed(range(n)):
            yield FileInfo(f"img/{k:04d}.jpg", 10, changed.get(k, f"etag:{k}:10"))
        for rel in extra:
            yield FileInfo(rel, 10, f"etag:{rel}:10")

    return lister


def _plan(tmp_path: Path, lister, size: int = 4):
    cfg = PredictConfig(
        models="unused", source="fake://", out=str(tmp_path / "out"), shard_size=size
    )
    out = Store(cfg.out)
    return cfg, out, plan_shards(out, list_inputs(cfg, lister), size)


def _finish(out: Store, shards) -> None:
    for s in shards:
        out.mark_complete(shard_marker(s["shard"]), {"outputs": [], "errors": []})


def test_sharded_manifest_round_trip(tmp_path):
    cfg, out, shards = _plan(tmp_path, listing(10))
    index = out.read_json(MANIFEST)
    # the index names the shards; no JSON file lists every item
    assert index["format"] == 2 and [s["n"] for s in index["shards"]] == [4, 4, 2]
    assert all(set(s) == {"shard", "n", "hash"} for s in index["shards"])
    assert "items" not in json.dumps(index)
    items = [it for s in shards for it in read_shard(out, s)["items"]]
    assert [it[0] for it in items] == [f"img/{k:04d}" for k in range(10)]  # sorted by id
    assert items[3] == ["img/0003", "img/0003.jpg", "img/0003.png", "etag:3:10"]
    for s in shards:
        data = out.read_bytes(items_path(s["shard"]))
        assert s["hash"] == hashlib.sha256(data).hexdigest()
        assert len(json.loads(data)["items"]) == s["n"] <= 4
    assert len(pending_shards(cfg, shards)) == 3


def test_resume_rewrites_nothing(tmp_path):
    cfg, out, first = _plan(tmp_path, listing(10))
    _finish(out, first)
    stamp = {f.rel: f.fingerprint for f in out.list(ITEMS)} | {"index": out.list(MANIFEST)[0]}
    _, _, again = _plan(tmp_path, listing(10))
    assert again == first and pending_shards(cfg, again) == []
    assert {f.rel: f.fingerprint for f in out.list(ITEMS)} | {
        "index": out.list(MANIFEST)[0]
    } == stamp


def test_a_changed_input_reruns_its_shard_and_new_inputs_get_new_shards(tmp_path):
    cfg, out, first = _plan(tmp_path, listing(10))
    _finish(out, first)
    _, _, again = _plan(tmp_path, listing(12, changed={5: "etag:new:10"}))
    assert [s["n"] for s in again] == [4, 4, 2, 2]  # old shards keep their items
    assert [s["shard"] for s in pending_shards(cfg, again)] == [1, 3]
    assert read_shard(out, again[1])["items"][1][3] == "etag:new:10"
    assert again[1]["hash"] != first[1]["hash"] and again[0] == first[0]
    assert [it[0] for it in read_shard(out, again[3])["items"]] == ["img/0010", "img/0011"]


class _CrashBeforeIndex(Store):
    """A store whose process dies as the planner writes the index."""

    def write_json(self, rel, obj, durable=True):
        if rel == MANIFEST:
            raise KeyboardInterrupt("killed before the index")
        return super().write_json(rel, obj, durable)


def test_a_crash_before_the_index_reruns_the_changed_shard(tmp_path):
    cfg, out, first = _plan(tmp_path, listing(10))
    _finish(out, first)
    crashing = _CrashBeforeIndex(cfg.out)
    with pytest.raises(KeyboardInterrupt):
        plan_shards(crashing, list_inputs(cfg, listing(10, {5: "etag:new:10"})), 4)
    assert out.read_json(MANIFEST)["shards"][1]["hash"] == first[1]["hash"]  # stale index
    _, _, again = _plan(tmp_path, listing(10, {5: "etag:new:10"}))
    assert [s["shard"] for s in pending_shards(cfg, again)] == [1]  # never skipped
    assert again[1]["hash"] == hashlib.sha256(out.read_bytes(items_path(1))).hexdigest()
    assert out.read_json(MANIFEST)["shards"][1]["hash"] == again[1]["hash"]


def test_an_old_manifest_is_read_and_upgraded_without_rerunning(tmp_path):
    """Format 1 (before this one): every shard's items inline in manifest.json."""
    cfg = PredictConfig(models="unused", source="fake://", out=str(tmp_path / "out"), shard_size=4)
    out = Store(cfg.out)
    items = [
        [f"img/{k:04d}", f"img/{k:04d}.jpg", f"img/{k:04d}.png", f"etag:{k}:10"] for k in range(6)
    ]
    old = {"shard_size": 4, "layout": "folder", "rejected": [], "shards": []}
    old["shards"] = [{"shard": 0, "items": items[:4]}, {"shard": 1, "items": items[4:]}]
    out.write_json(MANIFEST, old)
    _finish(out, old["shards"])
    assert read_shard(out, old["shards"][1])["items"] == items[4:]  # an inline ref reads as is
    shards = plan_shards(out, list_inputs(cfg, listing(6)), 4)
    assert pending_shards(cfg, shards) == []  # same inputs: nothing reruns
    index = out.read_json(MANIFEST)
    assert index["format"] == 2 and "items" not in json.dumps(index)
    assert [it for s in shards for it in read_shard(out, s)["items"]] == items


def test_duplicate_ids_keep_the_first_path_whatever_the_listing_order(tmp_path):
    cfg = PredictConfig(models="unused", source="fake://", out="x", layout="isic")

    def lister(order):
        return lambda url, storage: (FileInfo(r, 1, f"f:{r}") for r in order)

    kept = []
    for k, order in enumerate((["b/a.png", "a.jpg", "c.jpg"], ["c.jpg", "a.jpg", "b/a.png"])):
        out = Store(str(tmp_path / f"out{k}"))
        shards = plan_shards(out, list_inputs(cfg, lister(order)), 4)
        kept.append(read_shard(out, shards[0])["items"])
        [rejected] = out.read_json(MANIFEST)["rejected"]
        assert (rejected["file"], rejected["reason"]) == ("b/a.png", "duplicate_id")
        assert "a.jpg" in rejected["detail"]
    assert kept[0] == kept[1] and [it[1] for it in kept[0]] == ["a.jpg", "c.jpg"]


def test_no_images_is_a_clear_error(tmp_path):
    from segflow.errors import InputError

    cfg = PredictConfig(models="unused", source="fake://", out=str(tmp_path / "out"))
    lister = listing(0, extra=("notes.txt", "a_mask.png"))
    with pytest.raises(InputError, match="no images found under fake://"):
        plan_shards(Store(cfg.out), list_inputs(cfg, lister), 4)


def test_plan_benchmark_through_the_lister_seam(tmp_path):
    """benchmarks/plan.py's phases at a small N: the first plan packs every object, the
    replan after one changed object has exactly one shard to run."""
    spec = importlib.util.spec_from_file_location("bench_plan", REPO / "benchmarks/plan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    out = str(tmp_path / "out")
    first = bench.phase(out, 3000, 256, None)
    assert (first["items"], first["shards"], first["to_run"]) == (3000, 12, 12)
    bench.mark_all_done(out, first["shards"])
    again = bench.phase(out, 3000, 256, 1500)
    assert (again["items"], again["shards"], again["to_run"]) == (3000, 12, 1)


def test_inputs_may_come_sorted_or_not(tmp_path):
    """``Inputs`` built by hand (pairs manifests, tests) plan like a listing does."""
    out = Store(str(tmp_path / "out"))
    items = [[i, f"{i}.jpg", f"{i}.png", "f"] for i in ("c", "a", "b")]
    shards = plan_shards(out, Inputs(items, [], "folder"), 2)
    assert [it[0] for s in shards for it in read_shard(out, s)["items"]] == ["a", "b", "c"]


def test_progress_figures_over_the_whole_archive():
    # 600 of 1,000 were done by an earlier run; this run did 100 in 10 s
    fig = progress_figures(done=700, total=1000, ran=100, seconds=10.0)
    assert (fig.rate, fig.eta_s, fig.percent) == (10.0, 30.0, 70.0)
    assert fig.line() == "700/1,000 images, 10.0/s, ETA 0:00:30"
    assert progress_figures(600, 1000, 0, 0.0).eta_s is None
