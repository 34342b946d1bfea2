"""A request's deadline and body deadline: one cancel scope around the hooks and the app.

A route whose plugins name a deadline (`timeout.seconds`), a body deadline
(`timeout.body_seconds`) or a body to read before admission
(`concurrency.admit_after_body`, `gpu.admit_after_body`) has them compiled onto
its `RoutePolicy` (`deadline`, `body_deadline`, `body_first`). For such a request
the middleware runs every request hook (before_request, cache_lookup,
gpu_allocate), the app and cache_store inside one cancel scope: it ends at the
request deadline, or earlier at the body deadline while the body is still
arriving. When it fires the client gets 408 (the body did not arrive in time) or
504 (the deadline passed), unless the response had started. `gpu_release` and
`after_request` run afterwards, outside it: they release what the request holds.

Reading the body before admission: up to `body_first` bytes are read (and given
to the app afterwards, unchanged) before before_request runs, so a client that
trickles its body holds a connection, never a concurrency slot or GPU memory.
A body larger than that is admitted once that much has arrived; the rest streams.
"""

from __future__ import annotations

import asyncio
from asyncio import _get_running_loop
from collections.abc import MutableMapping
from typing import Any

import anyio

from .responses import Message, Receive

__all__ = ["Deadline", "ReplayReceive", "may_have_body", "read_ahead"]


def may_have_body(scope: MutableMapping[str, Any]) -> bool:
    """True when the request announces a body (a non-zero length, or chunked)."""
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


class Deadline:
    """One cancel scope whose end moves: asyncio's `Timeout` where asyncio runs (cheaper),
    anyio's `CancelScope` elsewhere (trio). Times are the event loop's clock."""

    __slots__ = ("_cm", "_scope", "body_done", "body_end", "end", "fired_in_body")

    def __init__(self, end: float | None, body_end: float | None) -> None:
        self.end = end  # the request deadline (loop time), or None
        self.body_end = body_end  # the body deadline (loop time), or None
        self.body_done = body_end is None
        self.fired_in_body = False
        self._cm: Any = None
        self._scope: anyio.CancelScope | None = None

    def _when(self) -> float | None:
        ends = [e for e in (self.end, None if self.body_done else self.body_end) if e is not None]
        return min(ends) if ends else None

    def body_complete(self) -> None:
        """The last body chunk arrived: only the request deadline is left."""
        if self.body_done:
            return
        self.body_done = True
        when = self._when()
        if self._cm is not None:
            self._cm.reschedule(when)
        elif self._scope is not None:
            self._scope.deadline = when if when is not None else float("inf")

    async def run(self, fn: Any, *args: Any) -> bool:
        """Await ``fn(*args)`` inside the scope; True when it completed, False when the
        deadline ended it (then `fired_in_body` says whether the body was still due)."""
        when = self._when()
        if _get_running_loop() is not None:
            self._cm = cm = asyncio.timeout_at(when)
            try:
                async with cm:
                    await fn(*args)
            except TimeoutError:
                if not cm.expired():
                    raise  # the app's own TimeoutError, not our deadline
                self.fired_in_body = not self.body_done
                return False
            return True
        with anyio.CancelScope(deadline=when if when is not None else float("inf")) as scope:
            self._scope = scope
            await fn(*args)
        if scope.cancelled_caught:
            self.fired_in_body = not self.body_done
            return False
        return True


class ReplayReceive:
    """The app's `receive`: the messages read before admission, then the server's own;
    tells the deadline when the body is complete."""

    __slots__ = ("deadline", "messages", "receive")

    def __init__(self, receive: Receive, messages: list[Message], deadline: Deadline | None):
        self.receive = receive
        self.messages = messages
        self.deadline = deadline

    async def __call__(self) -> Message:
        if self.messages:
            return self.messages.pop(0)
        message = await self.receive()
        deadline = self.deadline
        if (
            deadline is not None
            and not deadline.body_done
            and (message["type"] != "http.request" or not message.get("more_body", False))
        ):
            deadline.body_complete()
        return message


async def read_ahead(receive: Receive, limit: int, deadline: Deadline | None) -> list[Message]:
    """Read body messages until the body is complete or `limit` bytes have arrived."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # the client left: the app sees it too
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            if deadline is not None:
                deadline.body_complete()
            return messages
        if size >= limit:
            return messages
