"""`PlainResponse`, the bare ASGI answer the middleware and the plugins' 503s share."""

from __future__ import annotations

from typing import Any

import overdrive.middleware.responses as responses
from overdrive.middleware.responses import PlainResponse


def test_all_is_sorted_and_pinned() -> None:
    assert responses.__all__ == sorted(responses.__all__)
    assert responses.__all__ == [
        "BODY_TIMEOUT",
        "GATEWAY_TIMEOUT",
        "INTERNAL_ERROR",
        "PlainResponse",
    ]


async def _messages(response: PlainResponse) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await response({"type": "http"}, receive, send)
    return sent


async def test_sends_one_start_and_one_body_with_length_type_and_retry_after() -> None:
    body = b'{"error": "busy"}'
    response = PlainResponse(
        503, body, [(b"x-reason", b"busy")], content_type=b"application/json", retry_after=2.1
    )
    start, sent_body = await _messages(response)
    assert start == {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-reason", b"busy"),
            (b"retry-after", b"3"),  # whole seconds, rounded up
        ],
    }
    assert sent_body == {"type": "http.response.body", "body": body}
    # an instance is reusable: the same answer again
    assert await _messages(response) == [start, sent_body]


async def test_text_by_default_and_no_retry_after_unless_asked() -> None:
    start, _ = await _messages(PlainResponse(500, b"Internal Server Error"))
    assert start["headers"] == [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"21"),
    ]
