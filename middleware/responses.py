"""`PlainResponse`: a bare ASGI response (no Starlette cost), for the few answers the
middleware gives itself and the plugins' short-circuits (503 shed, 429 limited...)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

__all__ = ["BODY_TIMEOUT", "GATEWAY_TIMEOUT", "INTERNAL_ERROR", "PlainResponse"]


class PlainResponse:
    """One start message and one body, headers built once: reuse an instance freely.

    ``PlainResponse(503, b'{"error": "busy"}', content_type=b"application/json", retry_after=5)``.
    `retry_after` (seconds, rounded up to a whole number) adds ``Retry-After``;
    `headers` come after content-type and content-length, Retry-After last.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        content_type: bytes = b"text/plain; charset=utf-8",
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *(headers or ()),
        ]
        if retry_after is not None:
            self.headers.append((b"retry-after", str(math.ceil(retry_after)).encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


INTERNAL_ERROR = PlainResponse(500, b"Internal Server Error")
GATEWAY_TIMEOUT = PlainResponse(504, b"Gateway Timeout")
# The body did not arrive in time; the rest of it is never read, so the connection closes.
BODY_TIMEOUT = PlainResponse(408, b"Request Timeout", [(b"connection", b"close")])
