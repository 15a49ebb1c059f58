"""Ingest on a Dask distributed cluster (by address), and secrets kept out of artifacts."""

from __future__ import annotations

import json

from segflow.ingest import Dataset, IngestConfig, ingest
from segflow.storage import StorageOptions
from tests.conftest import make_bucket
from tests.makers import write_isic


def test_ingest_through_a_dask_scheduler_address(local):
    from distributed import LocalCluster

    src = local.store("raw")
    ids = write_isic(src, range(6))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster:
        res = ingest(
            IngestConfig(
                layout="isic",
                source=src.url,
                dataset=local.url("ds"),
                size=(32, 32),
                dask_address=cluster.scheduler_address,
                batch_size=2,
            )
        )
    assert (res.n_images, res.extra["decoded"]) == (6, 6)
    assert sorted(Dataset.open(local.url("ds")).ids) == ids


def test_secrets_stay_out_of_config_report_and_summary(s3_endpoint):
    bucket = make_bucket(s3_endpoint)
    storage = StorageOptions(endpoint_url=s3_endpoint, key="testing", secret="TOP-SECRET-123")
    cfg = IngestConfig(
        layout="isic", source=f"s3://{bucket}/raw", dataset=f"s3://{bucket}/ds", storage=storage
    )
    from segflow.storage import Store

    write_isic(Store(cfg.source, storage), range(2))
    res = ingest(cfg)
    ds = Store(cfg.dataset, storage)
    saved = [ds.read_bytes(f.rel) for f in ds.list() if f.rel.endswith(".json")]
    assert saved, "expected config.json, report.json and the marker"
    for blob in [*saved, json.dumps(res.to_dict()).encode(), repr(cfg).encode()]:
        assert b"TOP-SECRET-123" not in blob
    assert json.loads(ds.read_bytes("config.json"))["storage"]["endpoint_url"] == s3_endpoint
