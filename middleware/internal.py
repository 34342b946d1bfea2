"""Requests the framework makes itself (a stale-while-revalidate refresh, a prefetch).

Such a request has no client: its `receive` gives one empty body, then waits
until the caller says the response is done and reports a disconnect, as a
server would when the client goes away.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["EmptyRequest"]


class EmptyRequest:
    """The `receive` of a bodyless internal request; `done` ends it."""

    __slots__ = ("done", "sent")

    def __init__(self, done: asyncio.Event) -> None:
        self.done = done
        self.sent = False

    async def __call__(self) -> dict[str, Any]:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.done.wait()
        return {"type": "http.disconnect"}
