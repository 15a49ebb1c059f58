"""A guard in Ray Serve's HTTP proxy: uploads are refused there, before the replica is asked.

Serve's proxy reads every request body as fast as the client sends it and queues it, unbounded,
until the replica pulls it (``proxy.py``: ``proxy_asgi_receive`` into a ``MessageQueue``). So
a refusal the replica makes still costs the proxy whatever arrived meanwhile, plus a replica
round trip per upload: under a stream of junk uploads the proxy's RSS grew by 220 MB and
``/healthz`` (which goes through the same proxy) reached 360 ms p99.

Serve 2.60 refuses ``http_options.middlewares``; the one way into the proxy is the callback
named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (read in the proxy's own process), which
returns Starlette middlewares. :func:`middlewares` is that callback; :func:`proxy_env` gives the
environment a local Ray must start with (``segflow serve`` sets it before it starts Ray; a
cluster started by ``ray start`` needs it in the environment of ``ray start`` itself).

For ``POST /v1/segment`` the guard answers, without a replica round trip and before reading
more of the body:

- 415 for a Content-Type that is neither ``image/*`` nor multipart, 413 for a declared
  ``Content-Length`` over the limit: no body byte is read (uvicorn stops reading a connection
  whose app does not ask for its body, at 64 KiB);
- 400 for a raw body whose first bytes are no image signature;
- 413 as soon as the bytes counted pass the limit (chunked bodies, wrong lengths);
- 503 (``Retry-After``) when the bodies held in the proxy at once would pass
  ``SEGFLOW_SERVE_PROXY_BUDGET`` (default twice the limit): even uploads that look like images
  cannot make the proxy hold more than that.

The replica checks all of it again (``segflow.serve.app``): it is what guards a server whose
cluster was started without the guard.
"""

from __future__ import annotations

import json
import os
from typing import Any

from segflow.serve.limits import (
    CLOSE,
    SNIFF_BYTES,
    HTTPError,
    check_signature,
    declared_too_large,
    media_kind,
    too_large,
    unsupported_media,
)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
MAX_BYTES_ENV = "SEGFLOW_SERVE_MAX_BYTES"
BUDGET_ENV = "SEGFLOW_SERVE_PROXY_BUDGET"
GUARDED_PATH = "/v1/segment"
#: on the guard's own answers: which refusals the proxy made (the replica's carry no such header)
REFUSED_BY = ("X-Refused-By", "proxy")


def proxy_env(max_bytes: int) -> dict[str, str]:
    """The environment that installs the guard in the proxy of a Ray started with it."""
    return {CALLBACK_ENV: f"{__name__}.middlewares", MAX_BYTES_ENV: str(max_bytes)}


def middlewares() -> list[Any]:
    """The proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    from segflow.serve.config import DEFAULT_MAX_BYTES

    max_bytes = int(os.environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES)
    budget = int(os.environ.get(BUDGET_ENV) or 2 * max_bytes)
    return [Middleware(UploadGuard, max_bytes=max_bytes, budget=budget)]


class UploadGuard:
    """Pure ASGI middleware (no per-chunk work beyond a length and a sum)."""

    def __init__(self, app: Any, max_bytes: int, budget: int) -> None:
        self.app, self.max_bytes, self.budget = app, max_bytes, max(budget, max_bytes)
        self.held = 0  # body bytes of the requests in flight; one event loop: no lock

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"].rstrip("/") != GUARDED_PATH
        ):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get("content-type", "")
        refused = unsupported_media(ctype) or declared_too_large(
            headers.get("content-length"), self.max_bytes
        )
        pending: list[dict] = []  # messages read here, replayed to the app
        if refused is None and media_kind(ctype) != "multipart/form-data":
            refused = await self._sniff(receive, pending)
        if refused is not None:
            await _answer(send, refused)
            return
        await self._forward(scope, receive, send, pending)

    async def _sniff(self, receive: Any, pending: list[dict]) -> HTTPError | None:
        """Read until the first :data:`SNIFF_BYTES` bytes are in; refuse junk on them."""
        head = b""
        while len(head) < SNIFF_BYTES:
            message = await receive()
            pending.append(message)
            if message["type"] != "http.request":
                return None  # the client left; the app sees the disconnect
            head += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if not head:
            return None  # an empty body: the replica's 400 says so
        try:
            check_signature(head[:SNIFF_BYTES])
        except HTTPError as e:
            return e
        return None

    async def _forward(self, scope: dict, receive: Any, send: Any, pending: list[dict]) -> None:
        counted = 0
        refused: HTTPError | None = None
        started = False

        async def guarded_receive() -> dict:
            nonlocal counted, refused
            message = pending.pop(0) if pending else await receive()
            if message["type"] != "http.request" or started:
                return message
            size = len(message.get("body", b""))
            counted += size
            self.held += size
            if counted > self.max_bytes:
                refused = too_large(self.max_bytes)
            elif self.held > self.budget:
                refused = _busy(self.budget)
            if refused is not None:
                # the proxy stops reading and cancels the replica's request; the answer is ours
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if refused is not None and not started:
                return  # the proxy's own answer to the disconnect we made up
            started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            self.held -= counted
        if refused is not None and not started:
            await _answer(send, refused)


def _busy(budget: int) -> HTTPError:
    return HTTPError(
        503,
        "busy",
        f"the server holds {budget:,} bytes of uploads in flight already; retry in a moment",
        headers={**CLOSE, "Retry-After": "1"},
    )


async def _answer(send: Any, error: HTTPError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    extra = {**(error.headers or {}), REFUSED_BY[0]: REFUSED_BY[1]}
    headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
