"""Incremental and resumable ingest: no-op reruns, appends that leave old chunks alone, and a
SIGKILL at an arbitrary moment followed by a rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from segflow.ingest import Dataset, IngestConfig, ingest
from tests.makers import colour_of, write_isic


def _check_rows_match_sources(ds: Dataset) -> None:
    for i, image_id in enumerate(ds.ids):
        k = int(image_id.split("_")[1])
        assert np.abs(ds.image(i)[1, 1].astype(int) - colour_of(k)).max() < 12, image_id


def test_rerun_is_noop_and_new_files_are_appended(location):
    src = location.store("raw")
    write_isic(src, range(5))
    cfg = IngestConfig(
        layout="isic",
        source=src.url,
        dataset=location.url("ds"),
        size=(32, 32),
        storage=location.storage,
    )
    first = ingest(cfg)
    chunks = location.store("ds").list("images/c")
    again = ingest(cfg)
    assert (again.status, again.n_images, again.n_new) == ("up_to_date", 5, 0)
    assert again.content_hash == first.content_hash

    write_isic(src, range(5, 8))
    third = ingest(cfg)
    assert (third.status, third.n_images, third.n_new, third.n_unchanged) == ("ingested", 8, 3, 5)
    assert third.extra["decoded"] == 3  # only the new files were decoded
    # the old rows' chunks were not rewritten (same fingerprints: size+mtime or ETag)
    after = {f.rel: f.fingerprint for f in location.store("ds").list("images/c")}
    assert all(after[f.rel] == f.fingerprint for f in chunks)
    ds = Dataset.open(cfg.dataset, location.storage)
    assert ds.ids[:5] == [f"ISIC_{k:07d}" for k in range(5)] and ds.n == 8
    _check_rows_match_sources(ds)
    assert third.content_hash != first.content_hash


def test_changed_file_is_rewritten_in_place(local):
    src = local.store("raw")
    write_isic(src, range(3))
    cfg = IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=(32, 32))
    ingest(cfg)
    time.sleep(0.01)
    write_isic(src, [1])  # same id, new mtime (content identical but the file was rewritten)
    # now really change the content of ISIC_0000002: reuse image 7's pixels
    from tests.makers import coded_pair, jpeg_bytes

    src.write_bytes("ISIC_0000002.jpg", jpeg_bytes(coded_pair(7)[0]))
    res = ingest(cfg)
    assert (res.n_images, res.n_new, res.n_updated) == (3, 0, 2)
    ds = Dataset.open(cfg.dataset)
    row = ds.ids.index("ISIC_0000002")
    assert np.abs(ds.image(row)[1, 1].astype(int) - colour_of(7)).max() < 12


def _count_records(dataset: Path) -> int:
    rows = dataset / "_staging" / "rows"
    return len(list(rows.glob("*.json"))) if rows.is_dir() else 0


def test_sigkill_mid_run_then_rerun_gives_exactly_the_source(local, tmp_path):
    src = local.store("raw")
    n = 160
    ids = write_isic(src, range(n), h=64, w=64)
    dataset = tmp_path / "ds"
    args = [sys.executable, "-m", "segflow.cli", "ingest", "--layout", "isic"]
    args += ["--source", src.url, "--dataset", str(dataset), "--size", "64", "64"]
    args += ["--workers", "1"]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("batch_size: 1\n")  # small batches: records land one by one
    proc = subprocess.Popen([*args, "--config", str(cfg_file)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count_records(dataset) < 30 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _count_records(dataset)
    assert 30 <= done_before < n, f"kill landed outside the run ({done_before} records)"

    res = ingest(IngestConfig(layout="isic", source=src.url, dataset=str(dataset), size=(64, 64)))
    assert res.n_images == n
    assert res.extra["resumed"] >= done_before - 1  # the finished part was not redone
    assert res.extra["decoded"] == n - res.extra["resumed"]
    ds = Dataset.open(str(dataset))
    assert sorted(ds.ids) == ids and len(set(ds.ids)) == n  # none lost, no duplicates
    assert ds.group["images"].shape[0] == n
    _check_rows_match_sources(ds)
    assert not (dataset / "_staging").exists()
    assert (
        ingest(
            IngestConfig(layout="isic", source=src.url, dataset=str(dataset), size=(64, 64))
        ).status
        == "up_to_date"
    )


def test_geometry_of_existing_dataset_cannot_change(local):
    import pytest

    from segflow.errors import DatasetError

    src = local.store("raw")
    write_isic(src, range(2))
    ingest(IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=(32, 32)))
    with pytest.raises(DatasetError, match=r"size=\[32, 32\].*size=\[64, 64\]"):
        ingest(IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=(64, 64)))
