"""Task results are JSON manifests; a stored record that is anything else is never decoded."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, PickleSerializer

from segflow.pipeline.manifests import OverlaysManifest, ShardEntry
from segflow.pipeline.results import (
    ManifestSerializer,
    ResultStorage,
    UnsafeResultError,
    check_record,
)
from segflow.storage import StorageOptions


class Boom:
    """Unpickling this touches a file: the proof that a record was decoded as a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _record(result, serializer) -> bytes:
    meta = ResultRecordMetadata(storage_key="k", serializer=serializer)
    return ResultRecord(metadata=meta, result=result).serialize()


def test_manifests_round_trip_as_plain_json():
    m = OverlaysManifest(url="s3://b/x.png", hash="h")
    blob = ManifestSerializer().dumps(m)
    data = {"url": "s3://b/x.png", "hash": "h"}
    assert json.loads(blob) == {"manifest": "OverlaysManifest", "data": data}
    assert ManifestSerializer().loads(blob) == m
    record = _record(m, ManifestSerializer())
    assert check_record(record, "x") == record
    assert ResultRecord.deserialize(record).result == m


def test_only_registered_manifests_are_written_or_read():
    with pytest.raises(TypeError, match="segflow manifests"):
        ManifestSerializer().dumps(ShardEntry(shard=0, n=1, hash="h"))  # a part, not a result
    with pytest.raises(UnsafeResultError):
        ManifestSerializer().loads(b'{"manifest": "Path", "data": {}}')


@pytest.mark.parametrize("kind", ["pickle record", "raw pickle", "json with decoder", "junk"])
def test_records_that_could_run_code_are_refused_unread(kind, tmp_path):
    marker = tmp_path / "pwned"
    if kind == "pickle record":
        blob = _record(Boom(marker), PickleSerializer())
    elif kind == "raw pickle":
        blob = pickle.dumps(Boom(marker))
    elif kind == "json with decoder":  # Prefect would import and call the named decoder
        blob = _record({"x": 1}, JSONSerializer(object_decoder="pathlib.Path.touch"))
    else:
        blob = base64.b64encode(b"\x00" * 16)
    store = ResultStorage.at(str(tmp_path / "results"), StorageOptions())
    store.write_path("key", blob)
    with pytest.raises(UnsafeResultError, match="not a segflow JSON manifest record"):
        store.read_path("key")
    assert not marker.exists()


def test_storage_saves_no_credentials():
    opts = StorageOptions(endpoint_url="http://u:pw-9@minio:9000", secret="s3cr3t-9")
    block = ResultStorage.at("s3://bucket/_prefect", opts)
    saved = block.model_dump_json()
    assert "s3cr3t-9" not in saved and "pw-9" not in saved
    assert block.store.options.fsspec_kwargs()["endpoint_url"] == "http://u:pw-9@minio:9000"
