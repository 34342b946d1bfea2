"""Single-flight for HTTP responses, with the body streamed to the waiters as it comes.

The first miss on a key (the leader) calls the app; later misses on the same
key (followers) wait, bounded, for its response to start. If that response
may be shared (cacheable and the same Vary values), each follower replays the
leader's status and headers and then the body chunks as the leader's app
produces them: a follower of a long render gets its first byte when the
leader's client does, not after the last one. Otherwise the followers go to
the app themselves.

Memory: chunks are held once per flight (not per follower), and only those
that some follower has not sent yet. The bytes held never exceed the limit
(`max_entry_bytes`): a response that says it is larger (Content-Length), or
that has grown past the limit, takes no new followers (they call the app
themselves), and a follower that falls more than the limit behind the leader
is cut loose (its response breaks off, as a server's bounded write buffer
would), so no follower pins the body.

A leader whose client leaves does not fail its followers: while followers
read, the flight is the leader's `ctx.keeper`, so the middleware keeps the
app running (the disconnect is held back, writes to the gone client dropped).

Waiting uses anyio Events and cancel scopes, so followers work under asyncio
and trio alike.
"""

from __future__ import annotations

from typing import Any

import anyio

__all__ = ["Flight", "FlightAborted", "FollowerAnswer"]


class FlightAborted(Exception):
    """The leader's response broke off mid-body (or this follower fell too far behind)."""


class _Cursor:
    """One follower's place in the body: the absolute index of its next chunk."""

    __slots__ = ("cut", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.cut = False


class Flight:
    __slots__ = (
        "_changed",
        "_cursors",
        "_released",
        "_started",
        "base",
        "buffered",
        "chunks",
        "cut_loose",
        "done",
        "failed",
        "followers",
        "headers",
        "held",
        "joinable",
        "limit",
        "request",
        "shareable",
        "started",
        "status",
    )

    def __init__(self, limit: int, request: Any) -> None:
        self.limit = limit  # the most body bytes the flight holds at once
        self.request = request  # the leader's RequestContext (its headers, for Vary)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []  # the window: chunks base, base + 1, ...
        self.base = 0  # absolute index of chunks[0]
        self.held = 0  # bytes in `chunks`
        self.buffered = 0  # bytes the leader's app has sent so far
        self.followers = 0
        self.cut_loose = 0  # followers cut off for lagging more than `limit`
        self.started = False
        self._started: anyio.Event | None = None  # events are made only when waited on
        self.shareable = False
        self.joinable = True
        self.done = False
        self.failed = False
        self._changed: anyio.Event | None = None
        self._released: anyio.Event | None = None
        self._cursors: list[_Cursor] = []

    def start(self, status: int, headers: list[tuple[bytes, bytes]], shareable: bool) -> None:
        if self.started:
            return
        self.status = status
        self.headers = headers
        if shareable:
            for name, value in headers:
                if name.lower() == b"content-length":
                    length = value.strip()
                    if not length.isdigit() or int(length) > self.limit:
                        shareable = False  # too big to hold: followers call the app
                    break
        self.shareable = shareable
        if not shareable:
            self.joinable = False
        self.started = True
        if self._started is not None:
            self._started.set()

    def feed(self, chunk: bytes, more_body: bool) -> None:
        """A body observer: called by the middleware for each chunk the leader's app sends."""
        if chunk:
            self.buffered += len(chunk)
            if self.buffered > self.limit:
                self.joinable = False  # latecomers would need more than the limit held
            if self.shareable and (self.joinable or self._cursors):
                self.chunks.append(chunk)
                self.held += len(chunk)
                if self.held > self.limit:
                    self._trim()
        if not more_body:
            self.done = True
        self._notify()

    def _trim(self) -> None:
        """Drop the chunks every follower has sent; past the limit, cut the laggards loose."""
        cursors = self._cursors
        end = self.base + len(self.chunks)
        while True:
            if not self.joinable:
                low = min((c.index for c in cursors), default=end)
                drop = low - self.base
                if drop > 0:
                    self.held -= sum(len(c) for c in self.chunks[:drop])
                    del self.chunks[:drop]
                    self.base = low
            if self.held <= self.limit or not cursors:
                if not cursors and not self.joinable:
                    self.chunks.clear()
                    self.held = 0
                    self.base = end
                return
            slowest = min(cursors, key=lambda c: c.index)
            slowest.cut = True
            cursors.remove(slowest)
            self.cut_loose += 1

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

    # -- the leader's keeper (ctx.keeper) ---------------------------------------------------

    def holding(self) -> bool:
        """Whether followers still read the leader's response (the app must go on)."""
        return bool(self._cursors) and not self.done

    async def released(self) -> None:
        """Wait until no follower reads the leader's response any more."""
        while self.holding():
            if self._released is None:
                self._released = anyio.Event()
            await self._released.wait()

    def _leave(self, cursor: _Cursor | None) -> None:
        self.followers -= 1
        if cursor is not None and cursor in self._cursors:
            self._cursors.remove(cursor)
        if not self._cursors and self._released is not None:
            self._released.set()
            self._released = None

    # -- followers ----------------------------------------------------------------------------

    async def wait_start(self, timeout: float) -> _Cursor | None:
        """Wait for the leader's response to start; a place in its body when it may be
        shared with us (every chunk since the first is still held), else None."""
        self.followers += 1
        try:
            if not self.started:
                if self._started is None:
                    self._started = anyio.Event()
                with anyio.move_on_after(timeout):
                    await self._started.wait()
        except BaseException:
            self.followers -= 1
            raise
        if not (
            self.started
            and self.shareable
            and not self.failed
            and self.base == 0
            and self.held == self.buffered
        ):
            self.followers -= 1
            return None
        cursor = _Cursor(0)
        self._cursors.append(cursor)
        return cursor

    def abandon(self, cursor: _Cursor) -> None:
        """A follower that passed `wait_start` but will not stream (another variant)."""
        self._leave(cursor)

    async def stream(
        self, cursor: _Cursor, send: Any, headers: list[tuple[bytes, bytes]], head: bool
    ) -> None:
        """Send the leader's response to one follower from its place (`wait_start`)."""
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": headers})
            while True:
                changed = self._changed
                if changed is None:
                    changed = self._changed = anyio.Event()
                # Chunks before `base` were dropped only once every cursor had passed them.
                while not cursor.cut and cursor.index < self.base + len(self.chunks):
                    chunk = self.chunks[cursor.index - self.base]
                    cursor.index += 1
                    if not head:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if cursor.cut:
                    raise FlightAborted("this follower fell more than max_entry_bytes behind")
                if self.done:
                    if self.failed:
                        raise FlightAborted("the leading request's response broke off")
                    await send({"type": "http.response.body", "body": b""})
                    return
                await changed.wait()
        finally:
            self._leave(cursor)


class FollowerAnswer:
    """The ASGI answer a follower returns from `cache_lookup`."""

    __slots__ = ("cursor", "flight", "head", "headers")

    def __init__(
        self, flight: Flight, cursor: _Cursor, headers: list[tuple[bytes, bytes]], head: bool
    ) -> None:
        self.flight = flight
        self.cursor = cursor
        self.headers = headers
        self.head = head

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.flight.stream(self.cursor, send, self.headers, self.head)
