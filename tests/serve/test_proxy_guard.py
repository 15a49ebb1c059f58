"""The upload guard of Ray Serve's HTTP proxy, driven through the ASGI protocol itself: what it
reads of a body and whether the app (in Serve: the proxy's round trip to a replica) is called."""

from __future__ import annotations

import asyncio
import json

from segflow.serve.proxy import UploadGuard, middlewares, proxy_env

JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 60


class Upload:
    """One request: ``receive`` hands out the body in chunks and counts what was pulled."""

    def __init__(self, chunks: list[bytes], headers: dict[str, str], path: str = "/v1/segment"):
        self.chunks, self.pulled, self.sent = list(chunks), 0, []
        self.scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }

    async def receive(self) -> dict:
        if not self.chunks:
            return {"type": "http.disconnect"}
        self.pulled += 1
        body = self.chunks.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(self.chunks)}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def body(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}


class App:
    """Stands for the proxy's forwarding: reads the whole body, answers 200 with its size."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.calls, self.hold = 0, hold

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                await send({"type": "http.response.start", "status": 499, "headers": []})
                await send({"type": "http.response.body", "body": b"{}"})
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        if self.hold is not None:
            await self.hold.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"size": size}).encode()})


def run(guard: UploadGuard, upload: Upload) -> Upload:
    asyncio.run(guard(upload.scope, upload.receive, upload.send))
    return upload


def test_refusals_by_headers_read_no_body_and_skip_the_app():
    app = App()
    guard = UploadGuard(app, max_bytes=1000, budget=2000)
    declared = run(
        guard, Upload([JPEG] * 40, {"content-type": "image/jpeg", "content-length": "2560"})
    )
    assert declared.status == 413 and declared.body["error"] == "too_large"
    assert "1,000 bytes" in declared.body["message"]
    assert declared.headers["connection"] == "close" and declared.headers["x-refused-by"] == "proxy"
    text = run(guard, Upload([b"hello"], {"content-type": "text/plain"}))
    assert text.status == 415 and text.body["error"] == "unsupported_media_type"
    assert declared.pulled == text.pulled == 0 and app.calls == 0


def test_junk_is_refused_on_its_first_bytes():
    app = App()
    guard = UploadGuard(app, max_bytes=10_000, budget=20_000)
    junk = run(
        guard, Upload([b"ju", b"nk" * 8] + [b"\0" * 64] * 50, {"content-type": "image/jpeg"})
    )
    assert junk.status == 400 and junk.body["error"] == "unreadable"
    assert "6a 75" in junk.body["message"]
    assert junk.pulled == 2 and app.calls == 0  # 2 chunks made the 12 bytes sniffed


def test_an_image_passes_whole_and_a_long_body_stops_at_the_limit():
    app = App()
    guard = UploadGuard(app, max_bytes=1000, budget=2000)
    ok = run(
        guard, Upload([JPEG[:5], JPEG[5:]] + [b"\0" * 64] * 10, {"content-type": "image/jpeg"})
    )
    assert ok.status == 200 and ok.body == {"size": 64 + 640} and ok.pulled == 12
    multipart = {"content-type": "multipart/form-data; boundary=B"}
    assert run(guard, Upload([b"--B\r\n" * 10], multipart)).status == 200  # not sniffed
    long = run(guard, Upload([JPEG] + [b"\0" * 64] * 100, {"content-type": "image/jpeg"}))
    assert long.status == 413 and long.body["error"] == "too_large"
    assert long.pulled == 16  # 1,024 bytes: the first chunk over the limit, no further
    assert guard.held == 0  # every request gave its bytes back


def test_bodies_held_at_once_are_capped():
    async def scenario() -> tuple[Upload, Upload, Upload]:
        release = asyncio.Event()
        guard = UploadGuard(App(hold=release), max_bytes=1000, budget=1000)
        jpeg = {"content-type": "image/jpeg"}
        first = Upload([JPEG] * 10, jpeg)  # 640 bytes, held until released
        task = asyncio.create_task(guard(first.scope, first.receive, first.send))
        await asyncio.sleep(0.05)
        second = Upload([JPEG] * 8, jpeg)  # 512 more: over the 1,000 held at once
        await guard(second.scope, second.receive, second.send)
        release.set()
        await task
        third = Upload([JPEG] * 8, jpeg)  # the first gave its bytes back
        await guard(third.scope, third.receive, third.send)
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert first.status == 200 and third.status == 200
    assert second.status == 503 and second.body["error"] == "busy"
    assert second.headers["retry-after"] == "1"


def test_other_routes_pass_untouched_and_the_callback_reads_the_environment(monkeypatch):
    app = App()
    guard = UploadGuard(app, max_bytes=10, budget=10)
    other = run(guard, Upload([b"x" * 100], {"content-type": "text/plain"}, path="/healthz"))
    assert other.status == 200 and app.calls == 1
    for key, value in proxy_env(12345).items():
        monkeypatch.setenv(key, value)
    [middleware] = middlewares()
    assert middleware.cls is UploadGuard and middleware.kwargs == {
        "max_bytes": 12345,
        "budget": 24690,
    }
