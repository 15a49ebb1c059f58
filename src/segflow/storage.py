"""One storage interface for every stage: a URL in a local folder or in S3.

Contract (see docs/storage.md):

* Every location is a URL: a plain path or ``file://...`` (local), or ``s3://bucket/prefix``.
* ``write_bytes`` is atomic: readers see the old object or the whole new one, never a part.
  Locally that is a write to a temporary name in the same folder plus ``os.replace``; on S3 a
  single PUT already has that property.
* A stage marks a finished artifact with ``mark_complete(name, payload)``; ``read_marker``
  returns the payload or ``None``. A marker is written last, so its presence means "done".
* ``sha256_*`` are the content hashes that downstream cache keys are built from.
* Secrets (access keys, session tokens) live in :class:`StorageOptions` as ``SecretStr`` and are
  excluded from every dump, repr and log line; :data:`SECRET_FIELDS` is the one list of them,
  and :func:`redact` the one way to hide them (and the userinfo of URLs) before anything is
  printed, logged, handed to Prefect or saved.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict, SecretStr

from segflow.errors import SegflowError

# boto >= 1.36 sends checksums that MinIO and other S3-compatible servers reject.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")

MARKER_SUFFIX = ".complete.json"
LIST_PAGE = 1000  # objects per listing page, as S3's ListObjectsV2 returns them
_HASH_CHUNK = 4 << 20


class StorageError(SegflowError):
    """A location cannot be used: bad URL, missing object, or a refused request."""


#: The credential fields of :class:`StorageOptions` and the AWS variable each stands for: the one
#: list that dumps, error messages, flow parameters and ``segflow run`` all use.
SECRET_FIELDS: dict[str, str] = {
    "key": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
}
HIDDEN = "<hidden>"
# Names that hold credentials in input we did not define (a misspelt or unknown option): a value
# under such a name is hidden too, since we cannot tell a typo from a real secret.
_SECRET_NAME = re.compile(r"secret|token|passw|credential|(^|_)key($|_)|key_?id", re.IGNORECASE)
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def is_secret_name(name: object) -> bool:
    """Whether a field or key called ``name`` holds (or may hold) a credential."""
    return str(name) in SECRET_FIELDS or bool(_SECRET_NAME.search(str(name)))


def redact_url(text: str) -> str:
    """``text`` with the userinfo of every URL in it masked: ``http://u:p@host`` ->
    ``http://***@host``."""
    return _USERINFO.sub(r"\1***@", text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` safe to print, log, save or hand to Prefect: values under a secret
    name become ``<hidden>``, URLs lose their userinfo, ``SecretStr`` values are hidden."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {
            k: HIDDEN if v is not None and is_secret_name(k) else redact(v) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, SecretStr):
        return HIDDEN
    if isinstance(obj, str):
        return redact_url(obj)
    return obj


class StorageOptions(BaseModel):
    """How to reach object storage. Anything left unset comes from the usual AWS variables
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    key: SecretStr | None = None
    secret: SecretStr | None = None
    token: SecretStr | None = None
    anon: bool = False

    def fsspec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (secrets revealed here only)."""
        kw: dict[str, Any] = {"anon": self.anon}
        if self.endpoint_url:
            kw["endpoint_url"] = self.endpoint_url
        if self.region:
            kw["client_kwargs"] = {"region_name": self.region}
        if self.profile:
            kw["profile"] = self.profile
        if self.key:
            kw["key"] = self.key.get_secret_value()
        if self.secret:
            kw["secret"] = self.secret.get_secret_value()
        if self.token:
            kw["token"] = self.token.get_secret_value()
        return kw

    def public_dict(self) -> dict[str, Any]:
        """What may be logged or saved: everything but the secrets, and the endpoint without
        any credentials embedded in it."""
        data = self.model_dump(exclude=set(SECRET_FIELDS))
        if data["endpoint_url"]:
            data["endpoint_url"] = redact_url(data["endpoint_url"])
        return data

    def __repr_args__(self):
        # the default repr masks SecretStr but would print an endpoint's userinfo
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class FileInfo:
    """One listed object. ``rel`` is relative to the listed store; ``fingerprint`` changes
    whenever the content may have changed (size+mtime locally, ETag+size on S3)."""

    rel: str
    size: int
    fingerprint: str


def split_url(url: str) -> tuple[str, str]:
    """``(protocol, path)`` of a location URL; plain paths are local."""
    if not url:
        raise StorageError("empty location URL; give a path, file://... or s3://bucket/prefix")
    if "://" not in url:
        return "file", os.path.abspath(os.path.expanduser(url))
    protocol, _, rest = url.partition("://")
    if protocol == "file":
        return "file", os.path.abspath(rest)
    if protocol in ("s3", "s3a"):
        if not rest.strip("/"):
            raise StorageError(f"S3 URL {url!r} names no bucket; expected s3://bucket/prefix")
        return "s3", rest.rstrip("/")
    raise StorageError(f"unsupported storage URL {url!r}: use a local path, file://, or s3://")


class Store:
    """A folder-like location. Cheap to create and safe to pickle (the filesystem object is
    rebuilt lazily in each process, so a Store can be sent to Dask or Ray workers)."""

    def __init__(self, url: str, options: StorageOptions | None = None) -> None:
        self.protocol, self.root = split_url(url)
        self.options = options or StorageOptions()

    # -- identity ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.root if self.protocol == "file" else f"{self.protocol}://{self.root}"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "root": self.root, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self.is_local:
            return fsspec.filesystem("file", auto_mkdir=True)
        return fsspec.filesystem("s3", **self.options.fsspec_kwargs())

    def path(self, rel: str = "") -> str:
        rel = rel.strip("/")
        if ".." in rel.split("/"):
            raise StorageError(f"relative path {rel!r} escapes its store {self.url!r}")
        return posixpath.join(self.root, rel) if rel else self.root

    def uri(self, rel: str = "") -> str:
        p = self.path(rel)
        return p if self.is_local else f"{self.protocol}://{p}"

    def child(self, rel: str) -> Store:
        return Store(self.uri(rel), self.options)

    # -- reads -------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError as e:
            raise StorageError(f"no object at {self.uri(rel)}") from e

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def list(self, rel: str = "", pattern: str | None = None) -> list[FileInfo]:
        """All objects under ``rel`` (recursively), sorted, with paths relative to the store's
        root (not to ``rel``); ``pattern`` is an fnmatch on that path. Temporary files of
        in-flight atomic writes are never listed."""
        return [f for page in self.iter_list(rel, pattern) for f in page]

    def iter_list(
        self, rel: str = "", pattern: str | None = None, page_size: int = LIST_PAGE
    ) -> Iterator[list[FileInfo]]:
        """:meth:`list` one page at a time, in the same sorted order, so that an archive of a
        million objects is never held at once: S3 is read one ``ListObjectsV2`` page (up to
        1,000 keys) per request; a local folder is walked depth first, each folder's entries
        sorted with a folder ``a`` as ``a/`` (after ``a.txt``, as its paths are), so the
        pages concatenate to the sorted listing."""
        walk = self._walk_local(rel) if self.is_local else self._walk_s3(rel)
        page: list[FileInfo] = []
        for f in walk:
            if posixpath.basename(f.rel).startswith(".tmp-"):
                continue
            if pattern and not fnmatch.fnmatch(f.rel, pattern):
                continue
            page.append(f)
            if len(page) >= page_size:
                yield page
                page = []
        if page:
            yield page

    def _walk_local(self, rel: str) -> Iterator[FileInfo]:
        base = self.path(rel)
        if os.path.isfile(base):
            yield _local_info(base, posixpath.relpath(base, self.root))
        elif os.path.isdir(base):
            yield from self._walk_folder(base, set())

    def _walk_folder(self, folder: str, seen: set[tuple[int, int]]) -> Iterator[FileInfo]:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            return  # a link back to a folder being walked: once is enough, a loop never ends
        seen.add((st.st_dev, st.st_ino))
        # names only (not DirEntry objects): the one list a flat folder of a million files needs
        with os.scandir(folder) as it:
            names = sorted(e.name + "/" if e.is_dir() else e.name for e in it)
        for name in names:
            full = os.path.join(folder, name.rstrip("/"))
            try:
                if name.endswith("/"):
                    yield from self._walk_folder(full, seen)
                else:
                    yield _local_info(full, posixpath.relpath(full, self.root))
            except FileNotFoundError:
                # gone since the folder was read (a writer's temporary file renamed into place,
                # a deleted file): a listing is a snapshot, and it was not there to list
                continue
        seen.discard((st.st_dev, st.st_ino))

    def _walk_s3(self, rel: str) -> Iterator[FileInfo]:
        bucket, _, key = self.path(rel).partition("/")
        root_key = self.root.partition("/")[2]
        strip = len(root_key) + 1 if root_key else 0
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{key}/" if key else ""}
        listed = False
        while True:  # one request per page; S3 returns keys in UTF-8 byte (= code point) order
            try:
                page = self.fs.call_s3("list_objects_v2", **kwargs)
            except FileNotFoundError:
                return  # no such bucket: nothing listed, as for a missing folder
            for c in page.get("Contents", []):
                listed = True
                if c["Key"].endswith("/"):
                    continue  # a folder placeholder written by some S3 tools
                info = {"size": c["Size"], "ETag": c.get("ETag")}
                yield FileInfo(c["Key"][strip:], int(c["Size"]), _fingerprint(info))
            if not page.get("IsTruncated"):
                break
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
        if not listed and key:
            # nothing under "key/": the URL may name one object (a pairs or annotations CSV),
            # which lists as itself like a local file does; else an edit never reaches a cache key
            try:
                head = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return
            info = {"size": head["ContentLength"], "ETag": head.get("ETag")}
            name = key[strip:] if len(key) > len(root_key) else "."  # "." as the local walk
            yield FileInfo(name, int(head["ContentLength"]), _fingerprint(info))

    # -- writes ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes, durable: bool = True) -> str:
        """Atomically write ``data`` at ``rel`` and return its URI. ``durable=False`` skips the
        fsync: still atomic against a killed process, not against a power cut."""
        target = self.path(rel)
        if self.is_local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    if durable:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(target, data)  # one PUT: atomic by S3's semantics
        return self.uri(rel)

    def write_json(self, rel: str, obj: Any, durable: bool = True) -> str:
        data = json.dumps(obj, indent=2, sort_keys=True).encode()
        return self.write_bytes(rel, data, durable)

    def flush(self) -> None:
        """Make every ``write_bytes(..., durable=False)`` so far durable: locally one
        ``sync()`` (a planner writing thousands of files pays one flush, not an fsync each);
        nothing on S3, where each PUT already is."""
        if self.is_local:
            os.sync()

    def delete(self, rel: str, recursive: bool = False) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)

    # -- stage markers -----------------------------------------------------------------------
    def mark_complete(self, name: str, payload: dict[str, Any]) -> str:
        """Write the marker that says artifact ``name`` is finished; write it last."""
        return self.write_json(f"{name}{MARKER_SUFFIX}", payload)

    def read_marker(self, name: str) -> dict[str, Any] | None:
        rel = f"{name}{MARKER_SUFFIX}"
        return self.read_json(rel) if self.exists(rel) else None

    def clear_marker(self, name: str) -> None:
        self.delete(f"{name}{MARKER_SUFFIX}")

    # -- zarr ----------------------------------------------------------------------------------
    def zarr_store(self, rel: str = "", read_only: bool = False):
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.uri(rel),
            storage_options={**self.options.fsspec_kwargs(), "asynchronous": True},
            read_only=read_only,
        )


def _local_info(full: str, rel: str) -> FileInfo:
    """What ``fsspec``'s local listing reported (size and mtime of a link's target), so
    fingerprints, and the listing hashes built from them, did not change with the walk."""
    try:
        st = os.stat(full)
    except FileNotFoundError:  # a dangling link
        st = os.lstat(full)
    return FileInfo(rel, st.st_size, _fingerprint({"size": st.st_size, "mtime": st.st_mtime}))


def _fingerprint(info: dict[str, Any]) -> str:
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return "etag:" + str(etag).strip('"') + f":{size}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"mt:{mtime}:{size}"


def sha256_bytes(*parts: bytes) -> str:
    """Hash of the concatenation, with lengths, so ``(a, b)`` and ``(ab,)`` differ."""
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def sha256_object(store: Store, rel: str) -> str:
    """Streaming hash of one object, for files too large to hold in memory."""
    h = hashlib.sha256()
    with store.open(rel) as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def ref_uri(store: Store, ref: str) -> str:
    """The URL of ``ref``: a path relative to ``store``, or kept as it is when it is already a
    URL or an absolute path (a pairs CSV may name files by URL, or outside the store)."""
    return ref if "://" in ref or ref.startswith("/") else store.uri(ref)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_listing(store: Store, rel: str = "") -> str:
    """:func:`sha256_json` of ``[[rel, fingerprint], ...]`` for every object under ``rel``,
    streamed page by page: the same value, without a million-entry list and its JSON text."""
    h = hashlib.sha256(b"[")
    sep = b""
    for page in store.iter_list(rel):
        for f in page:
            h.update(sep + json.dumps([f.rel, f.fingerprint]).encode())
            sep = b", "
    h.update(b"]")
    return h.hexdigest()


def iter_batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
