"""The request-body limit, enforced in Ray Serve's HTTP proxy before any body is buffered.

Serve's proxy reads a request body as fast as the client sends it and queues it until the
replica asks for it, so a limit checked only in the app (on the replica) comes too late: a
1 GB chunked upload was queued in the proxy up to a few hundred MB before the replica's 413.
:class:`BodyLimit` is an ASGI middleware that runs inside the proxy (``http_options``'
``middlewares``) and:

* refuses a declared ``Content-Length`` over the limit before reading any of the body;
* counts the bytes of a streamed (chunked) body as the proxy reads them and, at the limit,
  stops reading, ends the request for the replica and answers 413 itself.

The app keeps the same checks (:func:`segflow.serve.app.read_image`), so a server started
where Serve already ran with other options is still bounded on the replica.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def too_large_message(max_bytes: int) -> str:
    return (
        f"the request body is over the limit of {max_bytes:,} bytes; send a smaller image or "
        "start the server with a larger max_bytes"
    )


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413, the app's JSON error body)."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)  # nothing of the body is read
            return
        counted, tripped, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal counted, tripped
            if tripped:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                counted += len(message.get("body", b""))
                if counted > self.max_bytes:
                    # to the proxy this reads as a client that went away: it stops reading
                    # the body and cancels the replica's request
                    tripped = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if tripped and not started:
                return  # the 413 below replaces whatever the proxy would answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if tripped and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {"error": "too_large", "message": too_large_message(self.max_bytes), "status": 413}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    # the rest of the body is never read: the connection cannot be reused
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
