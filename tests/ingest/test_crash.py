"""A run killed at any step, then a changed source, then a rerun: the dataset must equal a
clean ingest of the final source (ids, pixels, orig_size, content hashes, report counts).

Every point of ``segflow.ingest.crash.POINTS`` is crossed with every kind of change made while
the run is dead: a file added, an in-flight file removed, an in-flight file rewritten, nothing.
In-process runs stop by a BaseException raised at the point (fast); a few runs are killed for
real with ``SEGFLOW_CRASH_AT`` and SIGKILL in a child process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from segflow.dataset import Dataset
from segflow.ingest import IngestConfig, crash, ingest
from segflow.storage import Store
from tests.makers import coded_pair, jpeg_bytes, png_bytes

SIZE = (16, 16)


class Killed(BaseException):
    """Stands for SIGKILL: nothing in ingest catches a BaseException."""


def _kill() -> None:
    raise Killed


def _write(src: Store, k: int, content: int | None = None, big_mask: bool = False) -> None:
    """ISIC image ``k`` (pixels of ``content``, default k) with its mask; ``big_mask`` stores
    the mask at twice the image size (quirk ``mask_resized``)."""
    img, mask = coded_pair(k if content is None else content, 12, 16)
    if big_mask:
        mask = np.kron(mask, np.ones((2, 2), np.uint8))
    src.write_bytes(f"ISIC_{k:07d}.jpg", jpeg_bytes(img))
    src.write_bytes(f"ISIC_{k:07d}_segmentation.png", png_bytes(mask))


def _base(src: Store, dataset: str) -> IngestConfig:
    """Rows 0-2 committed; then, for the run that dies: 3 new but corrupt (a hole to fill),
    4 new, 5 new with a quirk, 1 rewritten."""
    for k in range(3):
        _write(src, k)
    cfg = IngestConfig(layout="isic", source=src.url, dataset=dataset, size=SIZE)
    ingest(cfg)
    _write(src, 1, content=7)
    src.write_bytes("ISIC_0000003.jpg", b"\xff\xd8 not really a jpeg")
    src.write_bytes("ISIC_0000003_segmentation.png", png_bytes(coded_pair(3, 12, 16)[1]))
    _write(src, 4)
    _write(src, 5, big_mask=True)
    return cfg


CHANGES = {
    "none": lambda src: None,
    "add": lambda src: _write(src, 6),
    "remove": lambda src: [
        src.delete("ISIC_0000004.jpg"),
        src.delete("ISIC_0000004_segmentation.png"),
    ],
    "rewrite": lambda src: _write(src, 5, content=8),
}


def _snapshot(url: str, storage=None) -> dict:
    ds = Dataset.open(url, storage)
    report = ds.store.read_json("report.json")
    rows = {}
    for i, image_id in enumerate(ds.ids):
        rows[image_id] = (
            ds.image(i).tobytes(),
            None if ds.mask(i) is None else ds.mask(i).tobytes(),
            tuple(int(v) for v in ds.column("orig_size")[i]),
            str(ds.column("content_hashes")[i]),
        )
    rejected = sorted((r["source"].rsplit("/", 1)[-1], r["reason"]) for r in report["rejected"])
    return {
        "n": ds.n,
        "rows": rows,
        "content_hash": ds.attrs["content_hash"],
        "images_len": ds.group["images"].shape[0],
        "counts": report["counts"],
        "quirks": report["quirks"],
        "row_quirks": report["row_quirks"],
        "rejected": rejected,
    }


def _clean(src: Store, tmp_path) -> dict:
    cfg = IngestConfig(layout="isic", source=src.url, dataset=str(tmp_path / "clean"), size=SIZE)
    ingest(cfg)
    return _snapshot(cfg.dataset)


def _completed_then_changed(src: Store, change: str, tmp_path) -> dict:
    """The reference once the killed run had committed (its journal written): the same run
    uninterrupted, then the change, then a rerun. It differs from a clean ingest only where a
    committed file was removed: its row is kept, as stale (docs/dataset.md)."""
    copy = Store(str(tmp_path / "ref-src"))
    shutil.copytree(src.root, copy.root)
    cfg = IngestConfig(layout="isic", source=copy.url, dataset=str(tmp_path / "ref"), size=SIZE)
    ingest(cfg)
    CHANGES[change](copy)
    ingest(cfg)
    return _snapshot(cfg.dataset)


def _check_rerun(cfg: IngestConfig, src: Store, tmp_path, want: dict | None = None) -> None:
    res = ingest(cfg)
    got, want = _snapshot(cfg.dataset), want or _clean(src, tmp_path)
    assert got == want
    assert res.n_images == want["n"] and res.content_hash == want["content_hash"]
    assert res.quirks == want["quirks"]
    assert not Store(cfg.dataset).exists("_staging")
    again = ingest(cfg)  # nothing left to do, nothing counted twice
    assert (again.status, again.n_new, again.n_updated) == ("up_to_date", 0, 0)
    assert _snapshot(cfg.dataset) == want


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("point", crash.POINTS)
def test_killed_at_any_point_then_source_changed(local, tmp_path, monkeypatch, point, change):
    src = local.store("raw")
    cfg = _base(src, local.url("ds"))
    monkeypatch.setattr(crash, "_kill", _kill)
    monkeypatch.setenv(crash.ENV, point)
    with pytest.raises(Killed):
        ingest(cfg)
    monkeypatch.delenv(crash.ENV)
    committed = crash.POINTS.index(point) >= crash.POINTS.index("journal")
    want = _completed_then_changed(src, change, tmp_path) if committed else None
    CHANGES[change](src)
    _check_rerun(cfg, src, tmp_path, want)
    if committed and change != "remove":  # the same as a clean ingest of the final source
        assert _snapshot(cfg.dataset) == _clean(src, tmp_path / "again")


def test_killed_after_the_marker_does_not_count_the_run_twice(local, tmp_path, monkeypatch):
    src = local.store("raw")
    cfg = _base(src, local.url("ds"))
    monkeypatch.setattr(crash, "_kill", _kill)
    monkeypatch.setenv(crash.ENV, "marker")
    with pytest.raises(Killed):
        ingest(cfg)
    monkeypatch.delenv(crash.ENV)
    before = Store(cfg.dataset).read_json("report.json")
    res = ingest(cfg)
    assert (res.status, res.n_new, res.n_updated) == ("up_to_date", 0, 0)
    assert res.quirks == before["quirks"] == {"mask_resized": 1}
    assert Store(cfg.dataset).read_json("ingest.complete.json")["n_new"] == 2


def test_an_updated_file_removed_while_dead_keeps_its_committed_row(local, monkeypatch):
    """The rewritten file's pixels went to a scratch row, so its committed row is intact
    and stays consistent (a stale row, kept) when the file disappears before the rerun."""
    src = local.store("raw")
    cfg = _base(src, local.url("ds"))
    committed = _snapshot(cfg.dataset)["rows"]["ISIC_0000001"]
    monkeypatch.setattr(crash, "_kill", _kill)
    monkeypatch.setenv(crash.ENV, "decoded")
    with pytest.raises(Killed):
        ingest(cfg)
    monkeypatch.delenv(crash.ENV)
    src.delete("ISIC_0000001.jpg")
    src.delete("ISIC_0000001_segmentation.png")
    res = ingest(cfg)
    snap = _snapshot(cfg.dataset)
    assert snap["rows"]["ISIC_0000001"] == committed
    assert res.n_stale == 1 and sorted(snap["rows"]) == [f"ISIC_{k:07d}" for k in (0, 1, 2, 4, 5)]


@pytest.mark.parametrize(
    ("point", "change"), [("planned", "remove"), ("fingerprints", "rewrite"), ("marker", "add")]
)
def test_sigkill_at_a_point_then_rerun(local, tmp_path, point, change):
    src = local.store("raw")
    cfg = _base(src, local.url("ds"))
    args = [sys.executable, "-m", "segflow.cli", "ingest", "--layout", "isic"]
    args += ["--source", src.url, "--dataset", cfg.dataset, "--size", "16", "16"]
    env = {**os.environ, crash.ENV: point}
    proc = subprocess.run(args, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    CHANGES[change](src)
    _check_rerun(cfg, src, tmp_path)


def test_killed_mid_commit_local_and_on_s3(location, tmp_path, monkeypatch):
    """The journal's row copies and index writes on an object store (and locally)."""
    src = location.store("raw")
    for k in range(3):
        _write(src, k)
    cfg = IngestConfig(
        layout="isic",
        source=src.url,
        dataset=location.url("ds"),
        size=SIZE,
        storage=location.storage,
    )
    ingest(cfg)
    _write(src, 1, content=7)  # an update: copied from its scratch row onto row 1
    src.write_bytes("ISIC_0000003.jpg", b"not a jpeg")  # a hole that row 4 moves into
    src.write_bytes("ISIC_0000003_segmentation.png", png_bytes(coded_pair(3, 12, 16)[1]))
    _write(src, 4)
    monkeypatch.setattr(crash, "_kill", _kill)
    monkeypatch.setenv(crash.ENV, "fingerprints")
    with pytest.raises(Killed):
        ingest(cfg)
    monkeypatch.delenv(crash.ENV)
    assert ingest(cfg).status == "up_to_date"  # the journal was finished first
    got = _snapshot(cfg.dataset, location.storage)
    row1 = Dataset.open(cfg.dataset, location.storage)
    assert sorted(got["rows"]) == [f"ISIC_{k:07d}" for k in (0, 1, 2, 4)]
    image = row1.image(row1.ids.index("ISIC_0000001"))
    want = np.array(coded_pair(7, 12, 16)[0][0, 0], int)
    assert np.abs(image[0, 0].astype(int) - want).max() < 12
    assert got["counts"] == {"unreadable": 1} and got["images_len"] == 4


def _kill_at(cfg: IngestConfig, monkeypatch, point: str) -> None:
    monkeypatch.setattr(crash, "_kill", _kill)
    monkeypatch.setenv(crash.ENV, point)
    with pytest.raises(Killed):
        ingest(cfg)
    monkeypatch.delenv(crash.ENV)


@pytest.mark.parametrize("plan_left", [True, False], ids=["plan-left", "plan-removed"])
def test_step_markers_left_by_an_update_only_run_are_not_trusted(
    local, tmp_path, monkeypatch, plan_left
):
    """An update-only run (its plan survives: base_n == n) killed after its journal was
    removed, or part-way through removing _staging, leaves the commit step markers. The next
    journal must still copy its updated rows, or the index gets the new content hash over the
    old pixels and every later run reports up_to_date."""
    src = local.store("raw")
    for k in range(3):
        _write(src, k)
    cfg = IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=SIZE)
    ingest(cfg)
    _write(src, 1, content=7)
    _kill_at(cfg, monkeypatch, "journal_removed")
    ds = Store(cfg.dataset)
    assert ds.exists("_staging/commit.updates-copied") and ds.exists("_staging/commit.new-moved")
    if not plan_left:  # the recursive delete of _staging died after removing the plan
        ds.delete("_staging/plan.json")
    _write(src, 2, content=9)  # rewritten while the run is dead
    res = ingest(cfg)
    assert (res.status, res.n_new, res.n_updated) == ("ingested", 0, 1)
    assert _snapshot(cfg.dataset) == _clean(src, tmp_path)
    assert ingest(cfg).status == "up_to_date"


def test_a_record_left_without_its_plan_is_not_trusted(local, tmp_path, monkeypatch):
    """A recursive delete of _staging killed after it removed the plan leaves records behind.
    The next run trims the scratch rows and plans afresh, so a record there whose name still
    matches a new slot would describe pixels that are gone."""
    src = local.store("raw")
    for k in range(3):
        _write(src, k)
    cfg = IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=SIZE)
    ingest(cfg)
    _write(src, 4)
    _kill_at(cfg, monkeypatch, "decoded")
    ds = Store(cfg.dataset)
    assert ds.list("_staging/rows")
    ds.delete("_staging/plan.json")
    res = ingest(cfg)
    assert (res.n_new, res.extra["decoded"]) == (1, 1)
    assert _snapshot(cfg.dataset) == _clean(src, tmp_path)
