"""Any event loop: the plugins that wait on the request path, under asyncio and trio.

Starlette, FastAPI and Hypercorn run on trio as well as asyncio (through anyio).
Each test here runs twice, once per backend (`anyio.run(..., backend=...)`: a
plain test function, because pytest-asyncio's auto mode would take an
`anyio`-marked coroutine test and run it on asyncio whatever the backend
parameter says), against a real Starlette app behind the middleware,
and checks that the plugin did its job *and* raised no plugin fault: a plugin
that touches asyncio under trio is isolated as a fault and silently stops working.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import httpx
import pytest
import sniffio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from overdrive.contrib.testing import make_host, serve
from overdrive.middleware import OverdriveMiddleware

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


def run(scenario: Any, backend: str, *args: Any) -> None:
    """Run `scenario` on `backend`, checking that it really is that event loop."""

    async def checked() -> None:
        assert sniffio.current_async_library() == backend
        await scenario(*args)

    anyio.run(checked, backend=backend)


def no_faults(host: Any) -> None:
    faults = {name: info.last_error for name, info in host.plugins.items() if info.errors}
    assert faults == {}


async def wait_until(predicate: Any) -> None:
    with anyio.fail_after(5):
        while not predicate():
            await anyio.sleep(0.005)


# -- timeout -----------------------------------------------------------------------------


async def _the_deadline_answers_504_and_a_fast_request_passes() -> None:
    async def slow(request: Request) -> Response:
        await anyio.sleep(30)
        return PlainTextResponse("late")

    async def fast(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/slow", slow), Route("/fast", fast)])
    config = {"plugins": ["timeout"], "timeout": {"seconds": 0.05}}
    async with serve(app, config=config) as h:
        assert (await h.client.get("/fast")).text == "ok"
        late = await h.client.get("/slow")
        assert late.status_code == 504
        no_faults(h.host)


@BACKENDS
def test_the_deadline_answers_504_and_a_fast_request_passes(backend: str) -> None:
    run(_the_deadline_answers_504_and_a_fast_request_passes, backend)


async def _the_apps_own_timeout_error_is_the_apps_error_not_a_504() -> None:
    """An endpoint's own `TimeoutError` (its call to a model timed out) reaches the
    server as the app's exception, exactly as without the timeout plugin."""

    async def own(request: Request) -> Response:
        raise TimeoutError("the model did not answer")

    app = Starlette(routes=[Route("/own", own)])
    config = {"plugins": ["timeout"], "timeout": {"seconds": 60}}
    async with serve(app, config=config) as h:
        with pytest.raises(TimeoutError, match="the model did not answer"):
            await h.client.get("/own")
        no_faults(h.host)


@BACKENDS
def test_the_apps_own_timeout_error_is_the_apps_error_not_a_504(backend: str) -> None:
    run(_the_apps_own_timeout_error_is_the_apps_error_not_a_504, backend)


async def _asyncio_wait_for_is_the_apps_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.wait_for(asyncio.sleep(10), 0.01)

    host = make_host(config={"plugins": ["timeout"], "timeout": {"seconds": 60}})
    wrapped = OverdriveMiddleware(app, host=host)
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(TimeoutError):
            await client.get("/")


def test_asyncio_wait_for_in_an_endpoint_reaches_the_server_as_the_apps_error() -> None:
    """The issue's case on asyncio: `asyncio.wait_for` inside a raw ASGI app."""
    run(_asyncio_wait_for_is_the_apps_error, "asyncio")


# -- concurrency -------------------------------------------------------------------------


async def _max_concurrent_1_lets_one_request_in_at_a_time() -> None:
    inside = 0
    most = 0
    gate = anyio.Event()

    async def work(request: Request) -> Response:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await gate.wait()
        inside -= 1
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/work", work)])
    config = {
        "plugins": ["concurrency"],
        "concurrency": {"max_concurrent": 1, "max_queue": 10, "max_wait": 10},
    }
    codes: list[int] = []
    async with serve(app, config=config) as h:

        async def call() -> None:
            codes.append((await h.client.get("/work")).status_code)

        limiter = h.host.get_plugin("concurrency").limiter
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call)
            await wait_until(lambda: inside == 1 and limiter.queued == 2)
            gate.set()
        assert codes == [200, 200, 200]
        assert most == 1
        no_faults(h.host)


@BACKENDS
def test_max_concurrent_1_lets_one_request_in_at_a_time(backend: str) -> None:
    run(_max_concurrent_1_lets_one_request_in_at_a_time, backend)


async def _a_queued_request_is_shed_after_max_wait() -> None:
    gate = anyio.Event()

    async def work(request: Request) -> Response:
        await gate.wait()
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/work", work)])
    config = {
        "plugins": ["concurrency"],
        "concurrency": {"max_concurrent": 1, "max_queue": 10, "max_wait": 0.05},
    }
    async with serve(app, config=config) as h:
        first: list[int] = []

        async def hold() -> None:
            first.append((await h.client.get("/work")).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            limiter = h.host.get_plugin("concurrency").limiter
            await wait_until(lambda: limiter.in_flight == 1)
            with anyio.fail_after(5):  # not admitted: it must not wait for the gate
                shed = await h.client.get("/work")
            gate.set()
        assert shed.status_code == 503
        assert "retry-after" in shed.headers
        assert first == [200]
        assert limiter.queued == 0 and limiter.in_flight == 0
        no_faults(h.host)


@BACKENDS
def test_a_queued_request_is_shed_after_max_wait(backend: str) -> None:
    run(_a_queued_request_is_shed_after_max_wait, backend)


# -- cache single-flight ---------------------------------------------------------------


async def _concurrent_misses_on_one_key_call_the_app_once() -> None:
    calls = 0
    gate = anyio.Event()

    async def render(request: Request) -> Response:
        nonlocal calls
        calls += 1
        await gate.wait()
        return PlainTextResponse("frame", headers={"cache-control": "max-age=60"})

    app = Starlette(routes=[Route("/render", render)])
    async with serve(app, config={"plugins": ["cache"]}) as h:
        cache = h.host.get_plugin("cache")
        bodies: list[str] = []

        async def call() -> None:
            bodies.append((await h.client.get("/render")).text)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(call)
            await wait_until(lambda: calls == 1 and cache.counts["collapsed"] == 3)
            gate.set()
        assert bodies == ["frame"] * 4
        assert calls == 1
        assert (await h.client.get("/render")).headers["x-cache"] == "HIT"
        no_faults(h.host)


@BACKENDS
def test_concurrent_misses_on_one_key_call_the_app_once(backend: str) -> None:
    run(_concurrent_misses_on_one_key_call_the_app_once, backend)


async def _a_follower_that_waits_too_long_goes_to_the_app_itself() -> None:
    calls = 0
    gate = anyio.Event()

    async def render(request: Request) -> Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        return PlainTextResponse("frame", headers={"cache-control": "max-age=60"})

    app = Starlette(routes=[Route("/render", render)])
    config = {"plugins": ["cache"], "cache": {"wait_timeout": 0.05}}
    async with serve(app, config=config) as h:
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.client.get, "/render")
            await wait_until(lambda: calls == 1)
            with anyio.fail_after(5):
                follower = await h.client.get("/render")
            gate.set()
        assert follower.text == "frame"
        assert calls == 2
        no_faults(h.host)


@BACKENDS
def test_a_follower_that_waits_too_long_goes_to_the_app_itself(backend: str) -> None:
    run(_a_follower_that_waits_too_long_goes_to_the_app_itself, backend)


# -- request id ------------------------------------------------------------------------


async def _the_apps_own_request_id_is_kept_not_doubled(plugins: list[str]) -> None:
    async def own(request: Request) -> Response:
        return PlainTextResponse("ok", headers={"X-Request-ID": "from-the-app"})

    app = Starlette(routes=[Route("/own", own)])
    async with serve(app, config={"plugins": plugins}) as h:
        response = await h.client.get("/own")
        assert response.headers.get_list("x-request-id") == ["from-the-app"]
        other = await h.client.get("/own", headers={"x-request-id": "from-the-client"})
        assert other.headers.get_list("x-request-id") == ["from-the-app"]


@BACKENDS
@pytest.mark.parametrize("plugins", [[], ["timeout"]])
def test_the_apps_own_request_id_is_kept_not_doubled(backend: str, plugins: list[str]) -> None:
    run(_the_apps_own_request_id_is_kept_not_doubled, backend, plugins)
