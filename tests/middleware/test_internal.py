"""The receive of a request the framework makes itself: one empty body, then a disconnect."""

from __future__ import annotations

import asyncio

from overdrive.middleware import internal
from overdrive.middleware.internal import EmptyRequest


def test_public_names() -> None:
    assert internal.__all__ == ["EmptyRequest"]


async def test_one_empty_body_then_a_disconnect_once_done() -> None:
    done = asyncio.Event()
    receive = EmptyRequest(done)
    assert await receive() == {"type": "http.request", "body": b"", "more_body": False}
    waiting = asyncio.ensure_future(receive())
    await asyncio.sleep(0)
    assert not waiting.done()  # a client that has not left yet
    done.set()
    assert await waiting == {"type": "http.disconnect"}
