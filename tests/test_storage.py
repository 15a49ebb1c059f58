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


def test_listing_streams_in_sorted_pages(location):
    """Pages concatenate to the sorted listing (a folder ``a`` sorts after ``a.txt``, as its
    paths do), and the streamed listing hash equals the hash of the whole listing."""
    from segflow.pipeline.keys import listing_hash
    from segflow.storage import sha256_json

    st = location.store("p")
    for rel in ("a/b", "a.txt", "a!", "b/c/d.png", "z", "a/.tmp-x"):
        st.write_bytes(rel, rel.encode())
    pages = list(st.iter_list(page_size=2))
    assert [[f.rel for f in p] for p in pages] == [["a!", "a.txt"], ["a/b", "b/c/d.png"], ["z"]]
    assert [f.rel for f in st.list("b")] == ["b/c/d.png"]
    whole = sha256_json([(f.rel, f.fingerprint) for f in st.list()])
    assert listing_hash(st) == whole


@pytest.mark.s3
def test_s3_listing_is_paginated(s3_endpoint):
    """10,000 objects on the moto server: the listing is read one ListObjectsV2 page (1,000
    keys) at a time, each request after the first carrying the previous continuation token,
    and the first page arrives before the second is requested. The objects are put straight
    into the server's backend (10,000 PUTs over HTTP would take minutes); the listing, the
    part under test, goes over HTTP through the real client."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from tests.conftest import make_bucket

    bucket = make_bucket(s3_endpoint)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for k in range(10_000):
        backend.put_object(bucket, f"t/img/{k:05d}.jpg", b"x")
    st = Store(f"s3://{bucket}/t", StorageOptions(endpoint_url=s3_endpoint))
    calls: list[dict] = []
    st.fs.s3.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2", lambda params, **kw: calls.append(dict(params))
    )
    pages = st.iter_list()
    first = next(pages)
    assert len(first) == 1000 and len(calls) == 1
    rest = list(pages)
    assert len(calls) == 10 and [len(p) for p in rest] == [1000] * 9
    assert "ContinuationToken" not in calls[0]
    assert all(c.get("ContinuationToken") for c in calls[1:])
    rels = [f.rel for p in [first, *rest] for f in p]
    assert rels == sorted(rels) and rels[0] == "img/00000.jpg" and len(set(rels)) == 10_000


@pytest.mark.s3
def test_s3_single_object_store_lists_itself(s3_endpoint):
    """A Store whose URL names one object (a pairs CSV on S3) lists that object, like a local
    file: rewriting it changes listing_hash, so the ingest/plan cache keys see the edit."""
    from segflow.pipeline.keys import listing_hash
    from tests.conftest import make_bucket

    bucket = make_bucket(s3_endpoint)
    opts = StorageOptions(endpoint_url=s3_endpoint)
    Store(f"s3://{bucket}/x", opts).write_bytes("pairs.csv", b"image,mask\na,b\n")
    one = Store(f"s3://{bucket}/x/pairs.csv", opts)
    assert [f.size for f in one.list()] == [15]
    before = listing_hash(one)
    Store(f"s3://{bucket}/x", opts).write_bytes("pairs.csv", b"image,mask\na,c,\n")
    assert listing_hash(one) != before
    assert Store(f"s3://{bucket}/x/none.csv", opts).list() == []
