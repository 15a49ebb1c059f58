"""The HTTP API: a FastAPI app over a :class:`~segflow.serve.service.Service`.

``POST /v1/segment`` takes raw image bytes (``Content-Type: image/*``) or a
``multipart/form-data`` upload (parsed here with the standard library: python-multipart is
not a dependency) and returns the mask as JSON (base64 PNG) or, with ``?format=png``, as the
PNG itself. Every error is a JSON body ``{"error", "message", "status"}`` with a 4xx status
for bad input; nothing a client sends can stop the server.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from segflow import __version__
from segflow.imaging import Rejected
from segflow.predict.single import SingleResult, masked_crop_png
from segflow.serve.limits import (
    SEND_IMAGE,
    SNIFF_BYTES,
    HTTPError,
    check_signature,
    declared_too_large,
    media_kind,
    too_large,
    unsupported_media,
)
from segflow.serve.service import Service, VersionMismatch

__all__ = ["HTTPError", "create_app", "parse_multipart", "read_image"]

log = logging.getLogger("segflow.serve")
VERSION_HEADER = "X-Model-Version"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
#: a multipart body holds one file; a few more parts (form fields) are tolerated
MAX_PARTS = 16


# -- response bodies (also the OpenAPI schema) --------------------------------------------------
class ErrorBody(BaseModel):
    error: str = Field(description="short reason, e.g. unreadable, too_large")
    message: str = Field(description="what was wrong and what to do")
    status: int


class Crop(BaseModel):
    png_base64: str = Field(description="masked crop (outside the lesion black), base64 PNG")
    box: tuple[int, int, int, int] = Field(description="(x0, y0, x1, y1) in the image")


class SegmentResponse(BaseModel):
    version: str = Field(description="model version that made the mask")
    width: int
    height: int
    mask_png_base64: str = Field(description="mask, 0/255 greyscale PNG at the original size")
    bbox: tuple[int, int, int, int] | None = Field(
        description="(x0, y0, x1, y1), ends exclusive, of the largest 8-connected component; "
        "null for an empty mask"
    )
    component_area: int = Field(description="pixels of the largest component")
    n_components: int
    foreground_fraction: float = Field(description="foreground pixels / all pixels")
    threshold: float
    postprocess: str
    tta: str
    latency_ms: float = Field(description="server time from request to response")
    crop: Crop | None = Field(None, description="with ?crop=masked")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "not an image, an empty body, or a bad parameter",
        404: "unknown model version",
        413: "image over the pixel limit, or body over the byte limit",
        415: "unsupported Content-Type",
    }.items()
}
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


# -- the app ------------------------------------------------------------------------------------
def create_app(service: Service) -> FastAPI:
    app = FastAPI(
        title="segflow",
        version=__version__,
        description="Binary segmentation of one image by the fold ensemble "
        f"(model version {service.version}).",
    )
    _add_error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": service.version}

    @app.get("/v1/model")
    def model(
        version: Annotated[str | None, Query(description="must be the served version")] = None,
    ) -> dict[str, Any]:
        _check_version(service, version)
        return service.info

    @app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        responses={**_ERRORS, 200: {"content": {"image/png": {}}}},
        openapi_extra=_BODY_DOC,
    )
    async def segment(
        request: Request,
        format: Annotated[Literal["json", "png"], Query(description="response body")] = "json",
        crop: Annotated[Literal["none", "masked"], Query(description="also the crop")] = "none",
        version: Annotated[str | None, Query(description="must be the served version")] = None,
        x_model_version: Annotated[str | None, Header(description="as ?version")] = None,
    ) -> Any:
        t0 = time.perf_counter()
        _check_version(service, version or x_model_version)
        if format == "png" and crop != "none":
            raise HTTPError(
                400,
                "bad_parameter",
                "?crop=masked returns the crop inside the JSON body; drop ?format=png to get both",
            )
        data, name = await read_image(request, service.cfg.max_bytes)
        return await run_in_threadpool(_segment, service, data, name, format, crop, t0)

    return app


def _check_version(service: Service, requested: str | None) -> None:
    try:
        service.check_version(requested)
    except VersionMismatch as e:
        raise HTTPError(404, "unknown_version", str(e), available=e.available) from None


def _segment(service: Service, data: bytes, name: str, fmt: str, crop: str, t0: float) -> Any:
    """The CPU part of a request (decode, model, post-processing, encoding), off the loop."""
    try:
        prepared = service.prepare(data, name)
    except Rejected as r:
        raise _refused_image(r, service.cfg.max_pixels) from None
    except Exception as e:  # whatever a decoder raises on a bad file is the client's 400
        log.info("undecodable upload %s: %s: %s", name, type(e).__name__, e)
        raise HTTPError(
            400,
            "unreadable",
            f"the image cannot be decoded ({type(e).__name__}); {SEND_IMAGE}",
        ) from None
    result = service.segment(prepared)
    png = result.mask_png()
    cropped = None
    if crop == "masked":
        cropped = masked_crop_png(prepared, result, data, service.cfg.max_pixels)
    ms = round((time.perf_counter() - t0) * 1000, 2)
    if fmt == "png":
        return Response(png, media_type="image/png", headers=_png_headers(service, result, ms))
    return _json_body(service, result, png, cropped, ms)


def _refused_image(r: Rejected, max_pixels: int) -> HTTPError:
    if r.reason != "too_large":
        return HTTPError(400, r.reason, f"{r.detail}; {SEND_IMAGE}")
    # the decoder's own message may quote another limit (Pillow's bomb guard): quote ours
    if f"{max_pixels:,}" in r.detail:
        detail = r.detail
    else:
        size = re.search(r"\((\d+) pixels\)", r.detail)
        detail = f"the image has {int(size[1]):,} pixels" if size else "the image is too large"
    return HTTPError(
        413,
        "too_large",
        f"{detail}; this server takes images of at most {max_pixels:,} pixels: send a smaller "
        "image",
    )


def _json_body(service: Service, result: SingleResult, png: bytes, cropped, ms: float) -> Any:
    h, w = result.size
    resolved = service.resolved
    crop = None
    if cropped is not None:
        crop = Crop(png_base64=base64.b64encode(cropped[0]).decode(), box=cropped[1])
    return SegmentResponse(
        version=service.version,
        width=w,
        height=h,
        mask_png_base64=base64.b64encode(png).decode(),
        bbox=result.bbox,
        component_area=result.area,
        n_components=result.n_components,
        foreground_fraction=round(result.foreground, 6),
        threshold=resolved.threshold,
        postprocess=resolved.postprocess,
        tta=service.cfg.tta,
        latency_ms=ms,
        crop=crop,
    )


def _png_headers(service: Service, result: SingleResult, ms: float) -> dict[str, str]:
    return {
        VERSION_HEADER: service.version,
        "X-Bbox": ",".join(map(str, result.bbox)) if result.bbox else "",
        "X-Foreground-Fraction": f"{result.foreground:.6f}",
        "X-Latency-Ms": f"{ms:.2f}",
    }


# -- request bodies -----------------------------------------------------------------------------
async def read_image(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The image bytes of a request and a file name for them (it picks the decoder)."""
    ctype = request.headers.get("content-type", "")
    kind = media_kind(ctype)
    if refused := unsupported_media(ctype):
        raise refused
    body = await _read_body(request, max_bytes, sniff=kind != "multipart/form-data")
    if kind == "multipart/form-data":
        # off the event loop: a body of many tiny parts must not stall other requests
        data, filename = await run_in_threadpool(parse_multipart, body, ctype)
        name = filename or "upload"
    else:
        data, name = body, f"upload.{kind.removeprefix('image/')}"
    if not data:
        raise HTTPError(400, "empty", "the image is empty (0 bytes); send the file's bytes")
    return data, _decoder_name(name, data)


async def _read_body(request: Request, max_bytes: int, sniff: bool = False) -> bytes:
    """The body, refused (413) by its declared length before any byte is read, else as soon
    as the bytes counted so far pass the limit.

    Serve's proxy reads a body as fast as the client sends it and queues it until this
    replica asks for it: the sooner the answer, the less it queues. So the answer comes
    before any read when the length is declared, the stream is pulled without a pause while
    counted, and a 413 says ``Connection: close``: the proxy stops reading the rest of the
    body instead of draining it for a next request. With ``sniff``, a body whose first bytes
    are no image signature is refused (400) as soon as they arrive."""
    if refused := declared_too_large(request.headers.get("content-length"), max_bytes):
        raise refused
    chunks, size, sniffed = [], 0, not sniff
    async for chunk in request.stream():  # counted as it arrives: a wrong length is no bypass
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        chunks.append(chunk)
        if not sniffed and size >= SNIFF_BYTES:
            check_signature(b"".join(chunks)[:SNIFF_BYTES])
            sniffed = True
    body = b"".join(chunks)
    if not sniffed and body:
        check_signature(body)
    return body


def _decoder_name(name: str, data: bytes) -> str:
    """TIFF goes to tifffile by name; a TIFF sent under another name or type still does."""
    if data[:4] in _TIFF_MAGIC and not name.lower().endswith((".tif", ".tiff")):
        return f"{name}.tif"
    return name


def parse_multipart(body: bytes, content_type: str) -> tuple[bytes, str | None]:
    """``(bytes, filename)`` of the first file part of a ``multipart/form-data`` body: the
    part named ``file``, or any part with a filename (RFC 7578). The body is split on its
    boundary as bytes (exact for binary data), at most :data:`MAX_PARTS` parts; each part's
    headers go through ``email``."""
    boundary = _param(content_type, "boundary")
    if not boundary:
        raise HTTPError(
            400,
            "bad_multipart",
            f"Content-Type {content_type!r} has no boundary; let the HTTP client build the "
            "multipart body (curl -F file=@x.jpg)",
        )
    delimiter = b"--" + boundary.encode("latin-1")
    # the first delimiter may open the body; every later one follows a CRLF
    start = 0 if body.startswith(delimiter) else body.find(b"\r\n" + delimiter)
    if start < 0:
        raise HTTPError(400, "bad_multipart", _NO_DELIMITER)
    start = start if start == 0 else start + 2
    delimiter = b"\r\n" + delimiter
    pos = start + len(delimiter) - 2
    for _ in range(MAX_PARTS):
        if body.startswith(b"--", pos):  # the close delimiter: no more parts
            break
        end = body.find(delimiter, pos)
        end = len(body) if end < 0 else end  # no close delimiter: the part runs to the end
        headers, content = _split_part(body[pos:end])
        name = headers.get_param("name", header="content-disposition")
        filename = headers.get_filename()
        if name == "file" or filename:
            return content, filename
        pos = end + len(delimiter)
    else:
        if not body.startswith(b"--", pos):
            raise HTTPError(
                400,
                "bad_multipart",
                f"the multipart body has more than {MAX_PARTS} parts before a file part; send "
                "the image in a field named 'file' (curl -F file=@x.jpg)",
            )
    raise HTTPError(
        400,
        "no_file",
        "the multipart body has no file part; send the image in a field named 'file' "
        "(curl -F file=@x.jpg)",
    )


_NO_DELIMITER = (
    "the multipart body does not follow its boundary; send a complete multipart/form-data body"
)


def _split_part(chunk: bytes) -> tuple[Message, bytes]:
    """One part after its delimiter: the rest of the delimiter line, headers, blank line,
    content (the CRLF before the next delimiter belongs to that delimiter)."""
    line_end = chunk.find(b"\r\n")
    if line_end < 0:
        raise HTTPError(
            400,
            "bad_multipart",
            "a multipart part is cut short; send a complete multipart/form-data body",
        )
    part = chunk[line_end + 2 :]
    if part.startswith(b"\r\n"):  # a part without headers
        return Message(), part[2:]
    head, sep, content = part.partition(b"\r\n\r\n")
    if not sep:
        raise HTTPError(
            400,
            "bad_multipart",
            "a multipart part has no blank line after its headers; send a complete "
            "multipart/form-data body",
        )
    return BytesHeaderParser().parsebytes(head + b"\r\n\r\n"), content


def _param(header_value: str, name: str) -> str | None:
    msg = Message()
    msg["content-type"] = header_value
    value = msg.get_param(name)
    return value if isinstance(value, str) else None


# -- errors -------------------------------------------------------------------------------------
def error_response(
    status: int, reason: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = HTTPError(status, reason, message, **extra).body()
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _refused(_: Request, e: HTTPError) -> JSONResponse:
        return error_response(e.status, e.reason, e.message, e.headers, **e.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        return error_response(400, "bad_parameter", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"{e.detail}: {request.method} {request.url.path}; see /docs for the API"
        return error_response(e.status_code, "http_error", message)

    @app.exception_handler(Exception)
    async def _crashed(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, "internal_error", f"{type(e).__name__}: {e}")
