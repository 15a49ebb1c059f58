"""The storage contract, run against a local folder and a moto S3 server alike."""

from __future__ import annotations

import pickle

import pytest

from segflow.config import StageConfig
from segflow.storage import (
    SECRET_FIELDS,
    StorageError,
    StorageOptions,
    Store,
    redact,
    sha256_bytes,
    sha256_object,
)


def test_write_read_list_exists_delete(location):
    st = location.store("a")
    assert not st.exists("x/1.bin") and st.list() == []
    uri = st.write_bytes("x/1.bin", b"one")
    st.write_json("x/2.json", {"k": [1, 2]})
    assert uri == st.uri("x/1.bin")
    assert st.read_bytes("x/1.bin") == b"one" and st.read_json("x/2.json") == {"k": [1, 2]}
    listed = st.list()
    assert [f.rel for f in listed] == ["x/1.bin", "x/2.json"]
    assert listed[0].size == 3 and listed[0].fingerprint
    assert [f.rel for f in st.list("x", pattern="*.json")] == ["x/2.json"]
    st.delete("x", recursive=True)
    assert st.list() == []


def test_overwrite_changes_fingerprint_and_hash(location):
    st = location.store("b")
    st.write_bytes("f", b"first")
    before = st.list()[0].fingerprint
    st.write_bytes("f", b"second!")
    assert st.list()[0].fingerprint != before
    assert sha256_object(st, "f") == __import__("hashlib").sha256(b"second!").hexdigest()


def test_missing_object_error_names_the_url(location):
    st = location.store("c")
    with pytest.raises(StorageError, match=r"no object at .*c/nope"):
        st.read_bytes("nope")


def test_markers(location):
    st = location.store("d")
    assert st.read_marker("ingest") is None
    st.mark_complete("ingest", {"n": 3})
    assert st.read_marker("ingest") == {"n": 3}
    st.clear_marker("ingest")
    assert st.read_marker("ingest") is None


def test_local_atomic_write_leaves_no_temporary_files(tmp_path):
    st = Store(str(tmp_path))
    for i in range(5):
        st.write_bytes("same.bin", bytes([i]) * 100)
    assert [p.name for p in tmp_path.iterdir()] == ["same.bin"]
    assert st.read_bytes("same.bin") == bytes([4]) * 100


def test_store_pickles_without_its_filesystem(location):
    st = location.store("e")
    st.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(st))
    assert clone.read_bytes("k") == b"v" and clone.url == st.url


def test_urls_are_validated():
    with pytest.raises(StorageError, match="unsupported storage URL 'gs://x'"):
        Store("gs://x")
    with pytest.raises(StorageError, match="names no bucket"):
        Store("s3://")
    with pytest.raises(StorageError, match="escapes its store"):
        Store("/tmp/a").path("../etc/passwd")
    assert Store("file:///tmp/a").url == "/tmp/a"


def test_hash_distinguishes_part_boundaries():
    assert sha256_bytes(b"ab", b"c") != sha256_bytes(b"a", b"bc")


def test_secrets_never_appear_in_dumps_or_reprs():
    opts = StorageOptions(endpoint_url="http://minio:9000", key="AKIAEXAMPLE", secret="s3cr3t")
    cfg = StageConfig(storage=opts)
    text = repr(opts) + str(cfg.public_dict()) + repr(cfg) + cfg.model_dump_json()
    assert "s3cr3t" not in text and "AKIAEXAMPLE" not in text
    assert cfg.public_dict()["storage"]["endpoint_url"] == "http://minio:9000"
    assert opts.fsspec_kwargs()["secret"] == "s3cr3t"  # only handed to the client


def test_redact_hides_secret_names_and_url_userinfo_at_any_depth():
    data = {
        "storage": {"key": "AKIA1", "secret": None, "endpoint_url": "http://u:pw@h:9/x"},
        "sections": [{"aws_secret_access_key": "s"}, "see https://a:b@c.d/e and s3://bkt/p@q"],
        "size": (4, 4),
    }
    assert redact(data) == {
        "storage": {"key": "<hidden>", "secret": None, "endpoint_url": "http://***@h:9/x"},
        "sections": [
            {"aws_secret_access_key": "<hidden>"},
            "see https://***@c.d/e and s3://bkt/p@q",
        ],
        "size": (4, 4),
    }
    assert set(SECRET_FIELDS) == {"key", "secret", "token"}
