"""Single-flight under attack (issue 15): memory past the bound, a leader leaving, long polls.

Each test failed on the old code: a follower pinned every chunk of a 32 MiB
response under a 1 MiB bound; a leader whose client left broke its followers;
uncacheable URLs were collapsed again at every burst.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from overdrive.middleware import OverdriveMiddleware
from overdrive.plugins.cache import flight as flight_module


def scope_for(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
    }


class Client:
    """One ASGI client: what it received, whether its response completed or raised."""

    def __init__(self, slow: asyncio.Event | None = None, leave_after: int = 0) -> None:
        self.status = 0
        self.body = b""
        self.complete = False
        self.error: BaseException | None = None
        self.slow = slow  # hold every body message until this is set
        self.leave_after = leave_after  # bytes after which this client disconnects
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if not hasattr(self, "_sent"):
            self._sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.gone.is_set():
            raise OSError("the client is gone")
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            if self.slow is not None:
                await self.slow.wait()
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                self.complete = True
            if self.leave_after and len(self.body) >= self.leave_after:
                self.gone.set()

    async def get(self, app: Any, path: str) -> None:
        try:
            await app(scope_for(path), self.receive, self.send)
        except Exception as exc:
            self.error = exc


def streaming_app(chunks: int, size: int, gate: asyncio.Event, calls: list[int]) -> Starlette:
    async def body() -> AsyncIterator[bytes]:
        await gate.wait()
        for i in range(chunks):
            yield bytes([65 + i % 26]) * size
            await asyncio.sleep(0)

    async def stream(request: Request) -> StreamingResponse:
        calls.append(1)
        return StreamingResponse(body(), headers={"cache-control": "max-age=60"})

    return Starlette(routes=[Route("/stream", stream)])


async def until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def expected(chunks: int, size: int) -> bytes:
    return b"".join(bytes([65 + i % 26]) * size for i in range(chunks))


async def test_followers_never_make_the_flight_hold_more_than_max_entry_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit = 128 * 1024
    chunks, size = 64, 16 * 1024  # 1 MiB streamed under a 128 KiB bound
    most = [0]
    feed = flight_module.Flight.feed

    def traced(self: Any, chunk: bytes, more: bool) -> None:
        feed(self, chunk, more)
        most[0] = max(most[0], sum(map(len, self.chunks)))

    monkeypatch.setattr(flight_module.Flight, "feed", traced)
    gate, calls = asyncio.Event(), []
    app = OverdriveMiddleware(
        streaming_app(chunks, size, gate, calls),
        config={"plugins": ["cache"], "cache": {"max_entry_bytes": limit}},
    )
    await app.host.initialize()
    try:
        plugin = app.host.get_plugin("cache")
        leader, fast, stuck = Client(), Client(), Client(slow=asyncio.Event())
        tasks = [asyncio.ensure_future(leader.get(app, "/stream"))]
        await until(lambda: plugin._flights)
        tasks += [asyncio.ensure_future(c.get(app, "/stream")) for c in (fast, stuck)]
        await until(lambda: plugin.counts["collapsed"] == 2)
        gate.set()
        await until(lambda: leader.complete and fast.complete)
        stuck.slow.set()  # type: ignore[union-attr]
        await asyncio.gather(*tasks)
        assert leader.body == fast.body == expected(chunks, size)
        assert len(calls) == 1
        assert most[0] <= limit
        # The follower that fell behind was cut loose rather than pin the body.
        assert not stuck.complete and isinstance(stuck.error, flight_module.FlightAborted)
    finally:
        await app.host.cleanup()


async def test_a_response_announced_over_the_bound_is_not_shared() -> None:
    limit = 64 * 1024
    gate, calls = asyncio.Event(), []

    async def big(request: Request) -> Response:
        calls.append(1)
        await gate.wait()
        return Response(b"z" * (limit * 4), headers={"cache-control": "max-age=60"})

    app = OverdriveMiddleware(
        Starlette(routes=[Route("/big", big)]),
        config={"plugins": ["cache"], "cache": {"max_entry_bytes": limit}},
    )
    await app.host.initialize()
    try:
        plugin = app.host.get_plugin("cache")
        clients = [Client() for _ in range(3)]
        tasks = [asyncio.ensure_future(clients[0].get(app, "/big"))]
        await until(lambda: plugin._flights)
        tasks += [asyncio.ensure_future(c.get(app, "/big")) for c in clients[1:]]
        await until(lambda: plugin.counts["collapsed"] == 2)
        gate.set()
        await asyncio.gather(*tasks)
        assert all(c.complete and c.body == b"z" * (limit * 4) for c in clients)
        assert len(calls) == 3  # Content-Length over the bound: each called the app
    finally:
        await app.host.cleanup()


async def test_a_leader_whose_client_leaves_does_not_fail_its_followers() -> None:
    chunks, size = 32, 4096
    gate, calls = asyncio.Event(), []
    app = OverdriveMiddleware(
        streaming_app(chunks, size, gate, calls), config={"plugins": ["cache"]}
    )
    await app.host.initialize()
    try:
        plugin = app.host.get_plugin("cache")
        leader = Client(leave_after=size)  # resets after its first chunk
        followers = [Client() for _ in range(4)]
        tasks = [asyncio.ensure_future(leader.get(app, "/stream"))]
        await until(lambda: plugin._flights)
        tasks += [asyncio.ensure_future(f.get(app, "/stream")) for f in followers]
        await until(lambda: plugin.counts["collapsed"] == 4)
        gate.set()
        await asyncio.gather(*tasks)
        assert not leader.complete
        for f in followers:
            assert f.error is None and f.complete and f.body == expected(chunks, size)
        assert len(calls) == 1
        # The app finished the response for them: it is stored, a hit for the next client.
        after = Client()
        await after.get(app, "/stream")
        assert after.complete and after.body == expected(chunks, size)
        assert len(calls) == 1
    finally:
        await app.host.cleanup()


async def test_uncacheable_urls_are_remembered_and_not_collapsed() -> None:
    """Two long polls that can only finish together: after the URL answered
    uncacheable once, a burst goes to the app at once (Varnish's hit-for-miss)."""
    waiting: list[asyncio.Event] = []

    async def poll(request: Request) -> Response:
        mine = asyncio.Event()
        waiting.append(mine)
        if len(waiting) % 2 == 0:
            for event in waiting:
                event.set()
        else:
            await mine.wait()
        return Response("news", headers={"cache-control": "no-store"})

    app = OverdriveMiddleware(
        Starlette(routes=[Route("/poll", poll)]),
        config={"plugins": ["cache"], "cache": {"wait_timeout": 1}},
    )
    await app.host.initialize()
    try:
        plugin = app.host.get_plugin("cache")
        first = Client()
        waiting.append(asyncio.Event())  # the first poll answers alone
        await first.get(app, "/poll")
        assert first.complete
        burst = [Client(), Client()]
        await asyncio.gather(*(c.get(app, "/poll") for c in burst))
        assert all(c.complete and c.body == b"news" for c in burst)
        assert plugin.counts["collapsed"] == 0
        assert plugin.counts["hit_for_miss"] == 2
    finally:
        await app.host.cleanup()
