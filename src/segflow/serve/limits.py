"""What the server refuses from a request's headers and first bytes, with the error it answers.

Light on purpose (no FastAPI app, no torch): both the replica's app (``segflow.serve.app``)
and the guard in Ray Serve's HTTP proxy (``segflow.serve.proxy``) use these, so a request is
refused with the same words wherever it is caught.
"""

from __future__ import annotations

from typing import Any

SEND_IMAGE = "send a JPEG, PNG, TIFF or BMP"
#: the first bytes of the formats the server decodes (segflow.imaging.IMAGE_SUFFIXES; WebP's
#: RIFF....WEBP is checked apart)
SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"II*\x00",  # TIFF, little- and big-endian, and BigTIFF
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
    b"BM",
    b"GIF87a",
    b"GIF89a",
)
SNIFF_BYTES = 12
#: a refusal before the body is read ends the connection: the client's unread rest of the
#: body must not be drained as if it were the next request
CLOSE = {"Connection": "close"}


class HTTPError(Exception):
    """A request the server refuses: ``status``, a short ``reason`` and a ``message`` that says
    what was received and what to send instead."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.extra = status, reason, message, extra
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": self.reason, "message": self.message, "status": self.status, **self.extra}


def media_kind(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def unsupported_media(content_type: str) -> HTTPError | None:
    """415 unless the body is a raw image or a multipart upload."""
    kind = media_kind(content_type)
    if kind.startswith("image/") or kind == "multipart/form-data":
        return None
    return HTTPError(
        415,
        "unsupported_media_type",
        f"Content-Type {content_type or '(none)'!r} is not accepted; send the raw image with "
        "Content-Type: image/<type> (curl --data-binary @x.jpg -H 'Content-Type: "
        "image/jpeg') or a multipart/form-data upload with a file field (curl -F file=@x.jpg)",
        headers=CLOSE,
    )


def too_large(max_bytes: int) -> HTTPError:
    return HTTPError(
        413,
        "too_large",
        f"the request body is over the limit of {max_bytes:,} bytes; send a smaller image or "
        "start the server with a larger max_bytes",
        headers=CLOSE,
    )


def declared_too_large(content_length: str | None, max_bytes: int) -> HTTPError | None:
    """413 from the declared length alone, before any byte of the body is read."""
    declared = (content_length or "").strip()
    return too_large(max_bytes) if declared.isdigit() and int(declared) > max_bytes else None


def check_signature(head: bytes) -> None:
    """Refuse a raw body that does not start like an image the server decodes, before the
    rest of it is read: junk costs the server its first bytes, not its whole length."""
    if head.startswith(SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return
    raise HTTPError(
        400,
        "unreadable",
        f"the body does not start like a JPEG, PNG, TIFF, BMP, GIF or WebP image (first bytes "
        f"{head[:8].hex(' ')}); {SEND_IMAGE}",
        headers=CLOSE,
    )
