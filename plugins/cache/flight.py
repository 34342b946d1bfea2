"""Single-flight for HTTP responses, with the body streamed to the waiters as it comes.

The first miss on a key (the leader) calls the app; later misses on the same
key (followers) wait, bounded, for its response to start. If that response
may be shared (cacheable and the same Vary values), each follower replays the
leader's status and headers and then the body chunks as the leader's app
produces them: a follower of a long render gets its first byte when the
leader's client does, not after the last one. Otherwise the followers go to
the app themselves. Chunks are held once per flight (not per follower) and
only while the flight runs.

Waiting uses anyio Events and cancel scopes, so followers work under asyncio
and trio alike.
"""

from __future__ import annotations

from typing import Any

import anyio

__all__ = ["Flight", "FlightAborted", "FollowerAnswer"]


class FlightAborted(Exception):
    """The leader's response broke off mid-body; its followers' responses break off too."""


class Flight:
    __slots__ = (
        "_changed",
        "_started",
        "buffered",
        "chunks",
        "done",
        "failed",
        "followers",
        "headers",
        "joinable",
        "limit",
        "request",
        "shareable",
        "started",
        "status",
    )

    def __init__(self, limit: int, request: Any) -> None:
        self.limit = limit  # bytes kept for followers that join later
        self.request = request  # the leader's RequestContext (its headers, for Vary)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.followers = 0
        self.started = False
        self._started: anyio.Event | None = None  # events are made only when waited on
        self.shareable = False
        self.joinable = True
        self.done = False
        self.failed = False
        self._changed: anyio.Event | None = None

    def start(self, status: int, headers: list[tuple[bytes, bytes]], shareable: bool) -> None:
        if self.started:
            return
        self.status = status
        self.headers = headers
        self.shareable = shareable
        if not shareable:
            self.joinable = False
        self.started = True
        if self._started is not None:
            self._started.set()

    def feed(self, chunk: bytes, more_body: bool) -> None:
        """A body observer: called by the middleware for each chunk the leader's app sends."""
        if self.shareable and (self.joinable or self.followers) and chunk:
            self.chunks.append(chunk)
            self.buffered += len(chunk)
            if self.buffered > self.limit:
                self.joinable = False  # too big to hold for latecomers
                if not self.followers:
                    self.chunks.clear()
        if not more_body:
            self.done = True
        self._notify()

    def finish(self, failed: bool) -> None:
        """The leader's request ended; `failed` when its body did not complete."""
        if not self.started:
            self.start(0, [], False)
        if not self.done:
            self.failed = failed
            self.done = True
        self.joinable = False
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_start(self, timeout: float) -> bool:
        """Wait for the leader's response to start; True when it may be shared with us."""
        self.followers += 1
        try:
            if not self.started:
                if self._started is None:
                    self._started = anyio.Event()
                with anyio.move_on_after(timeout):
                    await self._started.wait()
                if not self.started:
                    self.followers -= 1
                    return False
        except BaseException:
            self.followers -= 1
            raise
        if not (self.shareable and (self.joinable or self.chunks or not self.buffered)):
            self.followers -= 1
            return False
        return True

    async def stream(self, send: Any, headers: list[tuple[bytes, bytes]], head: bool) -> None:
        """Send the leader's response to one follower (who already passed `wait_start`)."""
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": headers})
            index = 0
            while True:
                changed = self._changed
                if changed is None:
                    changed = self._changed = anyio.Event()
                chunks = self.chunks
                while index < len(chunks):
                    chunk = chunks[index]
                    index += 1
                    if not head:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if self.done and index >= len(self.chunks):
                    if self.failed:
                        raise FlightAborted("the leading request's response broke off")
                    await send({"type": "http.response.body", "body": b""})
                    return
                await changed.wait()
        finally:
            self.followers -= 1


class FollowerAnswer:
    """The ASGI answer a follower returns from `cache_lookup`."""

    __slots__ = ("flight", "head", "headers")

    def __init__(self, flight: Flight, headers: list[tuple[bytes, bytes]], head: bool) -> None:
        self.flight = flight
        self.headers = headers
        self.head = head

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.flight.stream(send, self.headers, self.head)
