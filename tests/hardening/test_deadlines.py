"""Deadlines that hostile clients and hung plugins cannot outlast (issue 16, items 9, 10).

Item 10: the request deadline (`timeout.seconds`) covers every request hook, not
only the app: a plugin hook that never returns ends in a 504, under asyncio and
trio. Item 9: a route's body deadline (`timeout.body_seconds`) answers 408, and
routes behind scarce slots (concurrency, GPU) read the body before they take one,
so clients trickling bodies cannot take the slots from everyone else (against a
real uvicorn, with raw sockets).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
import sniffio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from overdrive import hookimpl
from overdrive.contrib.testing import serve
from overdrive.middleware import OverdriveMiddleware

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


class Hang:
    """A plugin whose `hook` never returns; counts the release hooks that still ran."""

    name = "hang"

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.after = 0

    async def _forever(self) -> None:
        await anyio.sleep_forever()

    @hookimpl
    async def before_request(self, ctx: Any) -> None:
        if self.hook == "before_request":
            await self._forever()

    @hookimpl
    async def cache_lookup(self, ctx: Any) -> None:
        if self.hook == "cache_lookup":
            await self._forever()

    @hookimpl
    async def gpu_allocate(self, ctx: Any) -> None:
        if self.hook == "gpu_allocate":
            await self._forever()

    @hookimpl
    async def cache_store(self, ctx: Any, response: Any) -> None:
        if self.hook == "cache_store":
            await self._forever()

    @hookimpl
    def on_response_start(self, ctx: Any, status: int, headers: Any) -> None:
        if self.hook == "cache_store":
            ctx.capture_response(1 << 20)  # so that cache_store is called

    @hookimpl
    def after_request(self, ctx: Any) -> None:
        self.after += 1


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _a_hung_hook_is_ended_by_the_deadline(hook: str, expected: int) -> None:
    hang = Hang(hook)
    app = Starlette(routes=[Route("/", ok)])
    # timeout first: its before_request runs before the hung one (and after it, too).
    for order in (["timeout", "hang"], ["hang", "timeout"]):
        config = {"plugins": order, "timeout": {"seconds": 0.2}}
        async with serve(app, plugins=[hang], config=config) as h:
            with anyio.fail_after(10):  # a bound for the test, not a timing assertion
                r = await h.client.get("/")
        assert r.status_code == expected, (order, r.text)
    assert hang.after == 2  # after_request still ran, once per request


@BACKENDS
@pytest.mark.parametrize(
    ("hook", "expected"),
    [("before_request", 504), ("cache_lookup", 504), ("gpu_allocate", 504), ("cache_store", 200)],
)
def test_a_hook_that_never_returns_is_ended_by_the_request_deadline(
    backend: str, hook: str, expected: int
) -> None:
    async def checked() -> None:
        assert sniffio.current_async_library() == backend
        await _a_hung_hook_is_ended_by_the_deadline(hook, expected)

    anyio.run(checked, backend=backend)


# -- item 9: slow bodies ---------------------------------------------------------------------


async def echo(request: Request) -> Response:
    body = await request.body()
    return PlainTextResponse(f"{len(body)} bytes: {body[:20].decode()}")


def _app(config: dict[str, Any]) -> Any:
    app = Starlette(routes=[Route("/generate", echo, methods=["POST"])])
    return OverdriveMiddleware(app, config=config)


@contextmanager
def uvicorn_serving(app: Any) -> Iterator[int]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


async def _trickle(port: int, stop: asyncio.Event, answers: list[bytes]) -> None:
    """POST a 100-byte body one byte every 0.2 s until `stop` (or the server answers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n"
    writer.write(head)
    reading = asyncio.ensure_future(reader.read(4096))
    try:
        for _ in range(100):
            if stop.is_set() or reading.done():
                break
            writer.write(b"x")
            await writer.drain()
            await asyncio.wait({reading}, timeout=0.2)
        answers.append(await reading if reading.done() else b"")
    except (ConnectionError, OSError):
        answers.append(b"")
    finally:
        reading.cancel()
        writer.close()


async def test_clients_trickling_bodies_do_not_take_the_slots() -> None:
    """12 clients sending a byte every 0.2 s to a route limited to 4 at once (and none
    queued): a real request still gets through; it used to get a 503."""
    config = {"plugins": ["concurrency"], "concurrency": {"max_concurrent": 4, "max_queue": 0}}
    with uvicorn_serving(_app(config)) as port:
        stop = asyncio.Event()
        answers: list[bytes] = []
        slow = [asyncio.ensure_future(_trickle(port, stop, answers)) for _ in range(12)]
        await asyncio.sleep(1.0)  # all 12 are sending
        async with httpx.AsyncClient(timeout=20) as client:
            r = await client.post(f"http://127.0.0.1:{port}/generate", content=b"a real prompt")
        stop.set()
        await asyncio.gather(*slow)
    assert (r.status_code, r.text) == (200, "13 bytes: a real prompt")


async def test_a_body_that_misses_its_deadline_gets_408() -> None:
    config = {"plugins": ["timeout", "concurrency"], "timeout": {"body_seconds": 0.5}}
    with uvicorn_serving(_app(config)) as port:
        stop = asyncio.Event()
        answers: list[bytes] = []
        await asyncio.wait_for(_trickle(port, stop, answers), 20)
        async with httpx.AsyncClient(timeout=20) as client:
            r = await client.post(f"http://127.0.0.1:{port}/generate", content=b"in time")
    assert answers[0].startswith(b"HTTP/1.1 408 "), answers[0][:200]
    assert (r.status_code, r.text) == (200, "7 bytes: in time")


async def test_a_body_read_before_admission_reaches_the_app_unchanged() -> None:
    """Chunked, in several messages: the app gets the same messages, in order."""
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message)
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    chunks = [
        {"type": "http.request", "body": b"one,", "more_body": True},
        {"type": "http.request", "body": b"two,", "more_body": True},
        {"type": "http.request", "body": b"three", "more_body": False},
    ]
    sent: list[dict[str, Any]] = []

    queue = list(chunks)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    config = {"plugins": ["concurrency"], "concurrency": {"admit_after_body": 6}}
    wrapped = OverdriveMiddleware(app, config=config)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"transfer-encoding", b"chunked")],
        "query_string": b"",
    }
    await wrapped(scope, receive, send)
    assert seen == chunks
    assert sent[0]["status"] == 200
