"""The ingest flow on a real local Prefect API (prefect_test_harness starts a server)."""

from __future__ import annotations

from flows.ingest import ingest_flow
from segflow.ingest import Dataset
from tests.makers import write_isic


def test_ingest_flow_runs_on_a_local_prefect_api(local, prefect_api):
    src = local.store("raw")
    write_isic(src, range(3))
    config = {"layout": "isic", "source": src.url, "dataset": local.url("ds"), "size": [32, 32]}
    first = ingest_flow(config)
    second = ingest_flow(config)
    assert (first["status"], first["n_images"]) == ("ingested", 3)
    assert second == first  # a cache hit: the same manifest, no work
    assert Dataset.open(local.url("ds")).n == 3
