"""The seam between the stage functions and the flows: typed manifests out, keys from them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from segflow.ingest import IngestConfig
from segflow.pipeline import stages
from segflow.pipeline.manifests import ChoiceManifest, DatasetManifest, ResolvedVersion
from segflow.storage import Store
from segflow.versions import write_version
from tests.makers import write_isic


def test_ingest_returns_a_typed_manifest_whose_hash_is_the_data_hash(local):
    src = local.store("raw")
    write_isic(src, range(3), h=16, w=16)
    cfg = IngestConfig(layout="isic", source=src.url, dataset=local.url("ds"), size=(16, 16))
    m = stages.ingest_dataset(cfg)
    assert isinstance(m, DatasetManifest)
    assert (m.n_images, m.status, m.url) == (3, "ingested", local.url("ds"))
    assert m.hash == Store(m.url).read_json("zarr.json")["attributes"]["content_hash"]


def test_resolved_version_hash_ignores_when_it_was_written(local):
    record = {"version": "v1", "run": "runs/v1", "created_at": "2026-01-01", "folds": [0]}
    write_version(local.url("m"), record)
    first = stages.resolve(local.url("m"), None, local.storage)
    write_version(local.url("m"), {**record, "created_at": "2026-02-02"})
    again = stages.resolve(local.url("m"), "v1", local.storage)
    assert isinstance(first, ResolvedVersion) and first.id == "v1"
    assert again.hash == first.hash and again.model_version().models.endswith("runs/v1")


def test_manifests_take_their_own_fields_and_refuse_missing_ones():
    data = {
        "threshold": 0.5,
        "postprocess": "lcc",
        "oof_thresholded_jaccard": 0.7,
        "oof_by_threshold": {},
        "oof_by_postprocess": {},
        "n_images": 4,
        "reported_later": 1,
    }
    m = stages._manifest(ChoiceManifest, data)
    assert m.threshold == 0.5 and not hasattr(m, "reported_later") and len(m.hash) == 64
    with pytest.raises(ValidationError, match="postprocess"):
        stages._manifest(ChoiceManifest, {k: v for k, v in data.items() if k != "postprocess"})
