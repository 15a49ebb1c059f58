"""Shared fixtures: a real S3 protocol server (moto, over HTTP on 127.0.0.1) and a ``location``
fixture that runs a test once against a local folder and once against S3."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from segflow.storage import StorageOptions, Store

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@dataclass(frozen=True)
class Location:
    """Where a test writes: ``url(name)`` gives a fresh URL; ``storage`` reaches it."""

    kind: str
    base: str
    storage: StorageOptions

    def url(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def store(self, name: str) -> Store:
        return Store(self.url(name), self.storage)


def make_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"segflow-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def location(request, tmp_path: Path) -> Location:
    if request.param == "local":
        return Location("local", str(tmp_path), StorageOptions())
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = make_bucket(endpoint)
    return Location("s3", f"s3://{bucket}/t", StorageOptions(endpoint_url=endpoint))


@pytest.fixture
def local(tmp_path: Path) -> Location:
    return Location("local", str(tmp_path), StorageOptions())


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def local_ray() -> Iterator[None]:
    """A real local Ray with 2 CPUs, as on the CI machine."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()
