"""One test per middleware bug the fuzzer found (tests/hardening/test_fuzz_middleware.py).

Each was a real failure of a property users rely on; each is pinned here as a
plain example so that it stays fixed even if the fuzzer's search wanders.
"""

from __future__ import annotations

from typing import Any

import pytest
from starlette.responses import PlainTextResponse, Response

import overdrive
from overdrive import Lease
from overdrive.contrib.testing import make_host
from overdrive.middleware import OverdriveMiddleware

Message = dict[str, Any]


class Boom(Exception):
    pass


async def drive(app: Any) -> tuple[list[Message], BaseException | None]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    try:
        await app(scope, receive, send)
    except Exception as exc:
        return sent, exc
    return sent, None


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"app"})


def status_and_body(sent: list[Message]) -> tuple[int, bytes]:
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


class Books(overdrive.Plugin):
    """Counts what the middleware promises: after_request once, each lease released once."""

    name = "books"

    def __init__(self, lease: bool = False, fallback: bool = False) -> None:
        self.lease = lease
        self.fallback = fallback
        self.after = 0
        self.released = 0
        self.failures: list[Any] = []
        self.stored: list[Any] = []

    @overdrive.hookimpl
    def cache_lookup(self, ctx: Any) -> None:
        ctx.capture_response(1 << 20)

    @overdrive.hookimpl
    def gpu_allocate(self, ctx: Any) -> Lease | None:
        return Lease(0, 1) if self.lease else None

    @overdrive.hookimpl
    def gpu_release(self, ctx: Any, lease: Any) -> None:
        self.released += 1

    @overdrive.hookimpl
    def on_failure(self, ctx: Any, error: Any) -> Response | None:
        self.failures.append(error)
        return PlainTextResponse("stale copy") if self.fallback else None

    @overdrive.hookimpl
    def cache_store(self, ctx: Any, response: Any) -> None:
        self.stored.append(response)

    @overdrive.hookimpl
    def after_request(self, ctx: Any) -> None:
        self.after += 1


class Strict(overdrive.Plugin):
    """A fail-closed plugin that raises in the hooks it is given, first in every chain."""

    name = "strict"
    fail_closed = True

    def __init__(self, *hooks: str) -> None:
        self.hooks = set(hooks)

    def _maybe(self, hook: str) -> None:
        if hook in self.hooks:
            raise Boom(hook)

    @overdrive.hookimpl(tryfirst=True)
    def before_request(self, ctx: Any) -> None:
        self._maybe("before_request")

    @overdrive.hookimpl(tryfirst=True)
    def on_response_start(self, ctx: Any, status: int, headers: Any) -> None:
        self._maybe("on_response_start")

    @overdrive.hookimpl(tryfirst=True)
    def on_failure(self, ctx: Any, error: Any) -> None:
        self._maybe("on_failure")

    @overdrive.hookimpl(tryfirst=True)
    def gpu_release(self, ctx: Any, lease: Any) -> None:
        self._maybe("gpu_release")

    @overdrive.hookimpl(tryfirst=True)
    def after_request(self, ctx: Any) -> None:
        self._maybe("after_request")


def fail_closed_in(*hooks: str) -> Strict:
    return Strict(*hooks)


async def test_fail_closed_on_response_start_answers_500_instead_of_nothing() -> None:
    # Was: the start was never sent and the middleware returned normally (no response).
    books = Books()
    app = OverdriveMiddleware(ok_app, host=make_host(fail_closed_in("on_response_start"), books))
    sent, error = await drive(app)
    assert error is None
    assert status_and_body(sent) == (500, b"Internal Server Error")
    assert books.after == 1 and books.stored == []


async def test_fail_closed_before_request_and_on_failure_still_answers_500() -> None:
    # Was: PluginFailure escaped the middleware while it sent its own 500.
    books = Books()
    plugin = fail_closed_in("before_request", "on_failure", "on_response_start")
    app = OverdriveMiddleware(ok_app, host=make_host(plugin, books))
    sent, error = await drive(app)
    assert error is None
    assert status_and_body(sent) == (500, b"Internal Server Error")
    assert books.after == 1


async def test_a_timeout_reaches_on_failure_once() -> None:
    # Was: on_failure ran for the TimeoutError, then again for the 504 we sent ourselves.
    import asyncio

    class Deadline(overdrive.Plugin):
        name = "deadline"

        @overdrive.hookimpl
        def before_request(self, ctx: Any) -> None:
            ctx.timeout = 0.01

    async def hang(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.Event().wait()

    books = Books()
    sent, error = await drive(OverdriveMiddleware(hang, host=make_host(Deadline(), books)))
    assert error is None and sent[0]["status"] == 504
    assert len(books.failures) == 1 and isinstance(books.failures[0], TimeoutError)


@pytest.mark.parametrize("hook", ["gpu_release", "after_request"])
async def test_fail_closed_release_hook_does_not_leak_others_leases(hook: str) -> None:
    # Was: the first fail-closed raise stopped the chain: other plugins' gpu_release
    # (a leaked lease) and every after_request were skipped.
    books = Books(lease=True)
    app = OverdriveMiddleware(ok_app, host=make_host(fail_closed_in(hook), books))
    sent, error = await drive(app)
    assert error is None and status_and_body(sent) == (200, b"app")
    assert (books.released, books.after) == (1, 1)


async def test_short_circuit_response_that_raises_answers_500() -> None:
    # Was: the plugin's exception escaped the middleware and the client got nothing.
    class Broken(Response):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            raise FileNotFoundError("the cached file is gone")

    class Shortcut(overdrive.Plugin):
        name = "shortcut"

        @overdrive.hookimpl
        def before_request(self, ctx: Any) -> Response:
            return Broken(b"")

    books = Books()
    sent, error = await drive(OverdriveMiddleware(ok_app, host=make_host(Shortcut(), books)))
    assert error is None
    assert status_and_body(sent) == (500, b"Internal Server Error")
    assert books.after == 1


async def test_a_fallback_is_never_stored_as_the_apps_response() -> None:
    # Was: a stale copy answered for a failing app was passed to cache_store as if the
    # app had produced it, so the stale copy was stored again as fresh.
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise Boom("app")

    books = Books(fallback=True)
    sent, error = await drive(OverdriveMiddleware(failing, host=make_host(books)))
    assert error is None and status_and_body(sent) == (200, b"stale copy")
    assert books.stored == []


async def test_app_error_after_start_propagates_when_on_failure_fails_closed() -> None:
    # Was: the app's exception was swallowed and the middleware returned normally with a
    # truncated response, which a server may take for a complete one.
    async def half(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"par", "more_body": True})
        raise Boom("app")

    books = Books()
    app = OverdriveMiddleware(half, host=make_host(fail_closed_in("on_failure"), books))
    _, error = await drive(app)
    assert isinstance(error, Boom) and str(error) == "app"
    assert books.after == 1


async def test_a_framework_500_reaches_on_failure_once() -> None:
    # Was: Starlette's ServerErrorMiddleware answers 500 then re-raises; on_failure ran
    # for the 500 start and again for the exception, so each failure was recorded twice.
    from starlette.applications import Starlette
    from starlette.routing import Route

    async def boom(request: Any) -> Response:
        raise Boom("app")

    books = Books()
    app = OverdriveMiddleware(Starlette(routes=[Route("/", boom)]), host=make_host(books))
    sent, error = await drive(app)
    assert isinstance(error, Boom)
    assert sent[0]["status"] == 500
    assert len(books.failures) == 1
    assert books.after == 1
