"""Where the flows' task results and cache records live, and how they are written: as JSON
that can only ever be read back as a manifest, never as code.

Prefect's result records name their own serializer, and Prefect trusts that name: a record that
says ``pickle`` (or a JSON serializer with an ``object_decoder`` of the writer's choosing) is
unpickled or decoded with it on the next cache hit. Anyone who can write to the bucket would
then run code in the flow. So the flows' results go through :class:`ResultStorage`, which
hands Prefect a record only after checking that it is exactly what :class:`ManifestSerializer`
writes; any other record is refused, Prefect counts it as a cache miss, and the task reruns
and overwrites it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from pydantic import Field, PrivateAttr

from segflow.errors import SegflowError
from segflow.pipeline.manifests import REGISTRY, Manifest
from segflow.storage import StorageOptions, Store, sha256_json

log = logging.getLogger(__name__)

SERIALIZER = "segflow-manifest"


class UnsafeResultError(SegflowError):
    """A stored task result is not a segflow JSON manifest (it may have been tampered with)."""


class ManifestSerializer(Serializer):
    """Task results as ``{"manifest": <type name>, "data": {...}}``: read back only as one of
    the types in :data:`segflow.pipeline.manifests.REGISTRY`."""

    type: Literal["segflow-manifest"] = Field(default=SERIALIZER, frozen=True)

    def dumps(self, obj: Manifest) -> bytes:
        name = type(obj).__name__
        if REGISTRY.get(name) is not type(obj):
            raise TypeError(f"task results must be segflow manifests, got {name}")
        return json.dumps({"manifest": name, "data": obj.model_dump(mode="json")}).encode()

    def loads(self, blob: bytes) -> Manifest:
        doc = json.loads(blob)
        model = REGISTRY.get(doc.get("manifest")) if isinstance(doc, dict) else None
        if model is None:
            raise UnsafeResultError("stored result names no segflow manifest type")
        return model.model_validate(doc["data"])


def check_record(content: bytes, where: str) -> bytes:
    """``content`` if it is a Prefect result record written by :class:`ManifestSerializer`
    whose result parses as a manifest; :class:`UnsafeResultError` otherwise. Checked with the
    plain ``json`` module before Prefect sees the record, since Prefect's own parsing already
    imports what the record's serializer names."""
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
        ok = serializer == {"type": SERIALIZER} and isinstance(record["result"], str)
        if ok:
            ManifestSerializer().loads(record["result"].encode())
    except Exception:  # any malformed record is refused the same way
        ok = False
    if not ok:
        raise UnsafeResultError(
            f"the task result at {where} is not a segflow JSON manifest record; it was not "
            "read (the task runs again and replaces it). Check who can write to that location."
        )
    return content


class ResultStorage(WritableFileSystem):
    """A Prefect result storage at a segflow location (local folder or S3 prefix) that reads
    back only segflow manifest records. Saved server-side without credentials: the process that
    runs the flow has them in its environment (or in the options it was built with)."""

    _block_type_name = "segflow results"
    _block_type_slug = "segflow-results"

    url: str
    options: dict[str, Any] = Field(default_factory=dict, description="public storage options")
    _storage: StorageOptions | None = PrivateAttr(None)

    @classmethod
    def at(cls, url: str, storage: StorageOptions) -> ResultStorage:
        block = cls(url=Store(url, storage).uri(), options=storage.public_dict())
        block._storage = storage  # the full options, endpoint included: never saved
        return block

    @property
    def store(self) -> Store:
        return Store(self.url, self._storage or StorageOptions(**self.options))

    def read_path(self, path: str, **_: Any) -> bytes:
        try:
            return check_record(self.store.read_bytes(path), self.store.uri(path))
        except UnsafeResultError as e:
            log.warning("%s", e)  # Prefect takes any read error for a cache miss, silently
            raise

    def write_path(self, path: str, content: bytes, **_: Any) -> str:
        return self.store.write_bytes(path, content)

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


def result_storage(url: str, storage: StorageOptions) -> ResultStorage:
    """The result storage at ``url``, saved under a name derived from the location (Prefect
    needs result storage saved server-side)."""
    block = ResultStorage.at(url, storage)
    block.save(f"segflow-results-{sha256_json([block.url, block.options])[:16]}", overwrite=True)
    return block
