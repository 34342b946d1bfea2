"""The middleware: a request's phases, lifespan, request ids, failures and bad input."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import overdrive
from overdrive import Lease, PluginFailure
from overdrive.contrib.testing import HookRecorder, make_host, serve
from overdrive.middleware import OverdriveMiddleware

Message = dict[str, Any]


def starlette_app(**routes: Callable[..., Any]) -> Starlette:
    return Starlette(routes=[Route(f"/{name}", fn) for name, fn in routes.items()])


async def ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def boom(request: Any) -> PlainTextResponse:
    raise RuntimeError("app failed")


async def call(
    app: Any, scope: dict[str, Any] | None = None, body_chunks: int = 0
) -> list[Message]:
    """Drive `app` with a raw ASGI scope; returns what it sent."""
    base: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/ok",
        "headers": [(b"host", b"test")],
        "query_string": b"",
    }
    base.update(scope or {})
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(base, receive, send)
    return sent


class Counter(overdrive.Plugin):
    """Counts after_request and keeps the last context."""

    name = "counter"

    def __init__(self) -> None:
        self.after = 0
        self.ctx: Any = None

    @overdrive.hookimpl
    def after_request(self, ctx: Any) -> None:
        self.after += 1
        self.ctx = ctx


async def test_phases_run_in_order() -> None:
    recorder = HookRecorder()
    async with serve(starlette_app(ok=ok), plugins=[recorder]) as h:
        response = await h.client.get("/ok")
    assert response.text == "ok"
    assert recorder.hooks == [
        "overdrive_configure",
        "overdrive_startup",
        "before_request",
        "cache_lookup",
        "gpu_allocate",
        "on_response_start",
        "after_request",
        "overdrive_shutdown",
    ]


async def test_request_id_incoming_sane_kept_insane_replaced() -> None:
    async with serve(starlette_app(ok=ok)) as h:
        kept = await h.client.get("/ok", headers={"x-request-id": "abc-123"})
        replaced = await h.client.get("/ok", headers={"x-request-id": b"bad id\xe9"})
        generated = await h.client.get("/ok")
        too_long = await h.client.get("/ok", headers={"x-request-id": "a" * 500})
    assert kept.headers["x-request-id"] == "abc-123"
    assert replaced.headers["x-request-id"] not in ("bad id\xe9", "")
    assert generated.headers["x-request-id"]
    assert len(too_long.headers["x-request-id"]) < 100
    assert len({replaced.headers["x-request-id"], generated.headers["x-request-id"]}) == 2


async def test_short_circuit_from_before_request_skips_the_app() -> None:
    calls = 0

    async def counted(request: Any) -> PlainTextResponse:
        nonlocal calls
        calls += 1
        return PlainTextResponse("app")

    class Deny(overdrive.Plugin):
        name = "deny"

        @overdrive.hookimpl
        def before_request(self, ctx: Any) -> Response:
            return PlainTextResponse("no", status_code=429, headers={"retry-after": "1"})

    counter = Counter()
    async with serve(starlette_app(ok=counted), plugins=[Deny(), counter]) as h:
        response = await h.client.get("/ok")
    assert (response.status_code, response.text, calls) == (429, "no", 0)
    assert response.headers["x-request-id"]
    assert counter.after == 1 and counter.ctx.status == 429


async def test_capture_is_bounded_and_feeds_cache_store() -> None:
    stored: list[Any] = []

    class Store(overdrive.Plugin):
        name = "store"

        @overdrive.hookimpl
        def cache_lookup(self, ctx: Any) -> None:
            ctx.capture_response(10)

        @overdrive.hookimpl
        def cache_store(self, ctx: Any, response: Any) -> None:
            stored.append(response)

    async def stream(request: Any) -> StreamingResponse:
        n = int(request.query_params["n"])

        async def chunks() -> Any:
            for _ in range(n):
                yield b"abcd"

        return StreamingResponse(chunks(), media_type="text/plain")

    async with serve(starlette_app(stream=stream), plugins=[Store()]) as h:
        small = await h.client.get("/stream?n=2")
        big = await h.client.get("/stream?n=5")
    assert small.content == b"abcdabcd"
    assert big.content == b"abcd" * 5  # streamed to the client in full
    assert [s.body for s in stored] == [b"abcdabcd"]  # over 10 bytes: not stored
    assert stored[0].status == 200


async def test_app_exception_goes_to_on_failure_and_fallback_answers() -> None:
    class Stale(overdrive.Plugin):
        name = "stale"

        def __init__(self) -> None:
            self.errors: list[Any] = []

        @overdrive.hookimpl
        def on_failure(self, ctx: Any, error: Any) -> Response:
            self.errors.append(error)
            return PlainTextResponse("stale copy", headers={"x-cache": "STALE"})

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise RuntimeError("raw app failed")

    # A raw app: the exception itself reaches on_failure.
    stale = Stale()
    async with serve(raw, plugins=[stale]) as h:
        response = await h.client.get("/")
    assert (response.status_code, response.text) == (200, "stale copy")
    assert isinstance(stale.errors[0], RuntimeError)
    # Starlette answers 500 itself before re-raising: on_failure sees the 5xx first,
    # its fallback answers, and the exception is still recorded on the context.
    stale, counter = Stale(), Counter()
    async with serve(starlette_app(boom=boom), plugins=[stale, counter]) as h:
        response = await h.client.get("/boom")
    assert (response.status_code, response.text) == (200, "stale copy")
    assert len(stale.errors) == 1 and isinstance(stale.errors[0], RuntimeError)
    assert isinstance(counter.ctx.error, RuntimeError)


async def test_app_exception_without_fallback_propagates_and_after_request_runs() -> None:
    counter = Counter()
    async with serve(starlette_app(boom=boom), plugins=[HookRecorder(), counter]) as h:
        with pytest.raises(RuntimeError, match="app failed"):
            await h.client.get("/boom")
    assert counter.after == 1
    assert isinstance(counter.ctx.error, RuntimeError)


async def test_5xx_can_be_replaced_by_a_fallback() -> None:
    async def five(request: Any) -> PlainTextResponse:
        return PlainTextResponse("upstream broke", status_code=502)

    class Stale(overdrive.Plugin):
        name = "stale"

        @overdrive.hookimpl
        def on_failure(self, ctx: Any, error: Any) -> Response | None:
            assert error is None and ctx.status == 502
            return PlainTextResponse("stale copy")

    async with serve(starlette_app(five=five), plugins=[Stale()]) as h:
        response = await h.client.get("/five")
    assert (response.status_code, response.text) == (200, "stale copy")
    assert response.headers["x-request-id"]


async def test_timeout_answers_504_cancels_the_app_and_after_request_runs() -> None:
    cancelled = asyncio.Event()

    async def slow(request: Any) -> PlainTextResponse:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return PlainTextResponse("late")

    class Deadline(overdrive.Plugin):
        name = "deadline"

        @overdrive.hookimpl
        def before_request(self, ctx: Any) -> None:
            ctx.timeout = 0.05

    counter = Counter()
    async with serve(starlette_app(slow=slow), plugins=[Deadline(), counter]) as h:
        response = await h.client.get("/slow")
    assert response.status_code == 504
    assert cancelled.is_set()
    assert counter.after == 1
    assert isinstance(counter.ctx.error, TimeoutError)


class FailClosedGate(overdrive.Plugin):
    name = "gate"
    fail_closed = True

    @overdrive.hookimpl
    def before_request(self, ctx: Any) -> None:
        raise RuntimeError("secret token abc")


async def test_fail_closed_plugin_gives_500_without_exception_text() -> None:
    counter = Counter()
    async with serve(starlette_app(ok=ok), plugins=[FailClosedGate(), counter]) as h:
        response = await h.client.get("/ok")
    assert response.status_code == 500
    assert "secret" not in response.text
    assert counter.after == 1


async def test_raising_plugin_is_fail_open_in_the_middleware() -> None:
    async with serve(
        starlette_app(ok=ok), plugins=[FailClosedGate()], config={"gate": {"fail_closed": False}}
    ) as h:
        response = await h.client.get("/ok")
    assert (response.status_code, response.text) == (200, "ok")
    stats = await h.host.get_system_stats()
    assert stats["host"]["plugins"]["gate"]["errors"] == 1


async def test_lease_released_once_when_the_app_raises_or_the_client_leaves() -> None:
    class Gpu(overdrive.Plugin):
        name = "gpu"

        def __init__(self) -> None:
            self.released: list[Any] = []

        @overdrive.hookimpl
        def gpu_allocate(self, ctx: Any) -> Lease:
            return Lease(0, 1024)

        @overdrive.hookimpl
        def gpu_release(self, ctx: Any, lease: Lease) -> None:
            self.released.append(lease)

    gpu = Gpu()
    app = OverdriveMiddleware(starlette_app(boom=boom, ok=ok), host=make_host(gpu))
    with pytest.raises(RuntimeError):
        await call(app, {"path": "/boom"})

    async def gone(message: Message) -> None:
        raise OSError("client went away")

    async def receive() -> Message:
        return {"type": "http.request"}

    with pytest.raises(OSError):
        await app({"type": "http", "method": "GET", "path": "/ok", "headers": []}, receive, gone)
    assert len(gpu.released) == 2


async def test_client_disconnect_mid_body_runs_after_request_once() -> None:
    async def stream(request: Any) -> StreamingResponse:
        async def chunks() -> Any:
            for _ in range(100):
                yield b"x" * 1000

        return StreamingResponse(chunks())

    counter = Counter()
    app = OverdriveMiddleware(starlette_app(stream=stream), host=make_host(counter))
    sent = 0

    async def send(message: Message) -> None:
        nonlocal sent
        sent += 1
        if sent == 3:
            raise OSError("disconnected")

    async def receive() -> Message:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    with pytest.raises(OSError):
        await app(
            {"type": "http", "method": "GET", "path": "/stream", "headers": []}, receive, send
        )
    assert counter.after == 1


@pytest.mark.parametrize(
    "scope",
    [
        {"headers": [(b"x-weird", b"\xff\xfe\x00bytes"), (b"\xff", b"v")]},
        {"path": "/" + "a" * 1_000_000},
        {"method": "HEAD"},
        {"method": "OPTIONS"},
        {"query_string": b"\xff\xfe=%%%"},
    ],
)
async def test_bad_input_does_not_crash_and_after_request_runs_once(scope: dict[str, Any]) -> None:
    counter = Counter()
    recorder = HookRecorder()
    app = OverdriveMiddleware(starlette_app(ok=ok), host=make_host(recorder, counter))
    sent = await call(app, scope)
    assert sent[0]["type"] == "http.response.start"
    assert counter.after == 1
    assert isinstance(counter.ctx.headers, dict)  # decodes without raising


async def test_missing_headers_key() -> None:
    counter = Counter()
    app = OverdriveMiddleware(starlette_app(ok=ok), host=make_host(counter))
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": "/ok"}, receive, send)
    assert sent[0]["status"] == 200
    assert counter.after == 1 and counter.ctx.headers == {}


async def test_websocket_passes_through() -> None:
    seen: list[str] = []

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    recorder = HookRecorder()
    app = OverdriveMiddleware(raw, host=make_host(recorder))
    await app({"type": "websocket", "path": "/ws", "headers": []}, None, None)
    assert seen == ["websocket"]
    assert "before_request" not in recorder.hooks


async def test_lifespan_our_startup_first_our_shutdown_last() -> None:
    from contextlib import asynccontextmanager

    log: list[tuple[str, str]] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        log.append(("app", "startup"))
        yield
        log.append(("app", "shutdown"))

    app = Starlette(routes=[Route("/ok", ok)], lifespan=lifespan)
    async with serve(app, plugins=[HookRecorder("od", log)]) as h:
        await h.client.get("/ok")
    order = [entry for entry in log if entry[1] in {"startup", "shutdown"} or "drive_s" in entry[1]]
    assert order == [
        ("od", "overdrive_startup"),
        ("app", "startup"),
        ("app", "shutdown"),
        ("od", "overdrive_shutdown"),
    ]


async def test_lifespan_for_an_app_without_lifespan_support() -> None:
    async def raw(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError("only http")  # a raw app that refuses lifespan
        await PlainTextResponse("raw")(scope, receive, send)

    # The refusal reaches the server as it would without us (tests/middleware/
    # test_lifespan.py); the harness goes on without a lifespan as uvicorn does, so
    # the host starts at the first request and the harness stops it.
    recorder = HookRecorder()
    async with serve(raw, plugins=[recorder]) as h:
        assert "overdrive_startup" not in recorder.hooks
        response = await h.client.get("/")
    assert response.text == "raw"
    assert recorder.hooks.count("overdrive_startup") == 1
    assert recorder.hooks[-1] == "overdrive_shutdown"


async def test_no_lifespan_from_the_server_starts_lazily_once() -> None:
    recorder = HookRecorder()
    async with serve(starlette_app(ok=ok), plugins=[recorder], lifespan=False) as h:
        await asyncio.gather(*(h.client.get("/ok") for _ in range(5)))
    assert recorder.hooks.count("overdrive_startup") == 1


async def test_startup_failure_of_a_fail_closed_plugin_fails_the_lifespan() -> None:
    class BadStart(overdrive.Plugin):
        name = "badstart"
        fail_closed = True

        @overdrive.hookimpl
        async def overdrive_startup(self, host: Any) -> None:
            raise ConnectionError("no database")

    app = OverdriveMiddleware(starlette_app(ok=ok), host=make_host(BadStart()))
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(PluginFailure):
        await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "badstart" in sent[0]["message"]
    assert "ConnectionError: no database" in sent[0]["message"]


async def test_add_middleware_on_starlette_and_fastapi() -> None:
    from fastapi import FastAPI

    fast = FastAPI()

    @fast.get("/ok")
    async def fast_ok() -> dict[str, str]:
        return {"ok": "yes"}

    for app in (starlette_app(ok=ok), fast):
        app.add_middleware(OverdriveMiddleware, config={}, plugins=[Counter()], env={})
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/ok")
        assert response.status_code == 200
        assert response.headers["x-request-id"]
