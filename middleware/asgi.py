"""`OverdriveMiddleware`: the only hot path. Pure ASGI; walks the host's compiled chains.

A request's life (DESIGN.md section 3): before_request -> cache_lookup ->
gpu_allocate -> the app (on_response_start as it starts, body observers as it
streams) -> cache_store -> on_failure when it broke -> gpu_release ->
after_request. Whatever happens, `gpu_release` runs once per lease and
`after_request` once per request, in `finally`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from asyncio import _get_running_loop
from collections.abc import Mapping, Sequence
from time import perf_counter
from types import CoroutineType
from typing import Any

import anyio
import structlog

from overdrive.context import CapturedResponse, Lease, RequestContext
from overdrive.errors import OverdriveError, PluginFailure
from overdrive.host import Overdrive
from overdrive.redact import plain_traceback

from .deadline import Deadline, ReplayReceive, may_have_body, read_ahead
from .dependencies import cache_rules
from .endpoints import endpoint_rules, find_routes
from .lifespan import run_lifespan, start_on_request
from .request_id import is_sane, new_request_id, sets_header
from .responses import (
    BODY_TIMEOUT,
    GATEWAY_TIMEOUT,
    INTERNAL_ERROR,
    Message,
    Receive,
    Scope,
    Send,
)

Headers = list[tuple[bytes, bytes]]

logger = structlog.get_logger("overdrive.middleware")

ASGIApp = Any  # any ASGI 3 callable; kept loose so raw apps and Starlette apps both fit


class OverdriveMiddleware:
    """Apply an Overdrive host to `app`.

    Either pass a built `host`, or `config` and/or `plugins` to build one::

        app.add_middleware(OverdriveMiddleware, config={"plugins": ["cache"]})
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: Overdrive | None = None,
        config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        plugins: Sequence[Any] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        if host is not None and (config is not None or plugins):
            raise TypeError("pass either host= or config=/plugins=, not both")
        self.app = app
        #: Why this middleware cannot start (a configuration or plugin-load error), or
        #: None. Kept, not raised: Starlette builds its middleware inside the server's
        #: first call, where a raise reads as "no lifespan support" and startup goes
        #: on. It is answered as lifespan.startup.failed instead (middleware/lifespan.py).
        self.error: BaseException | None = None
        self.error_logged = False
        try:
            self.host = host if host is not None else Overdrive(config, plugins=plugins, env=env)
        except OverdriveError as exc:
            self.error = exc
            self.host = Overdrive({}, env={})  # an empty stand-in that is never started
        self.host.state.setdefault("app", app)
        self._rid_name = self.host.settings.request_id_header.encode("latin-1")
        self._prepared = False

    async def _startup(self) -> None:
        """Once: turn endpoint-declared policies into route rules, then start the host."""
        if not self._prepared:
            routes = find_routes(self.app)
            rules = endpoint_rules(routes)
            cache = self.host.get_plugin("cache")
            if cache is not None:
                # A hit skips FastAPI's dependencies: key on what they read, or refuse.
                explicit = {
                    r["path"]: r["cache"] for r in rules if isinstance(r.get("cache"), dict)
                }
                trusted = bool(
                    getattr(getattr(cache, "settings", None), "trust_dependencies", False)
                )
                rules += cache_rules(routes, explicit, trusted)
            if rules:
                self.host.add_routes(rules, first=True)  # raises on a bad policy: no start
            self._prepared = True
        await self.host.initialize()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The HTTP path is written out here rather than in helpers: each coroutine
        # it avoids is a measurable share of the per-request cost (benchmarks/overhead.py).
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await run_lifespan(self, scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        host = self.host
        if not host.started and not await start_on_request(self, scope, receive, send):
            return
        if host._release_at:
            host.release_quarantine(perf_counter())
        chains = host.chains
        rid_name = self._rid_name

        request_id: str | None = None
        rid_value = b""
        for name, value in scope.get("headers") or ():
            if name == rid_name:
                if is_sane(value):
                    request_id = value.decode("ascii")
                    rid_value = value
                break
        if request_id is None:
            request_id = new_request_id()
            rid_value = request_id.encode("ascii")
        if not host.plugins:
            # Nothing to run (the "installed, all off" case): the request id alone, and
            # no context; `overdrive.contrib.fastapi.get_context` builds one if asked.
            scope["overdrive.host"] = host
            scope["overdrive.request_id"] = request_id
            id_header = (rid_name, rid_value)

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = list(message.get("headers") or ())
                    if not sets_header(headers, rid_name):
                        headers.append(id_header)
                    message["headers"] = headers
                await send(message)

            await self.app(scope, receive, send_with_id)
            return
        routes = host.routes
        policy = (
            routes.lookup(scope.get("method", "GET"), scope.get("path", "/"))
            if routes.rules
            else routes.default
        )
        ctx = RequestContext(scope, request_id, policy, host, receive)
        scope["overdrive.ctx"] = ctx
        extensions = scope.get("extensions")
        if extensions and "overdrive.internal" in extensions:
            ctx.internal = True
        rid_header = (rid_name, rid_value)
        on_failure = chains.get("on_failure")

        async def send_wrapper(message: Message) -> None:
            if ctx.replaced:
                return  # a fallback answered instead of the app: drop the app's messages
            if message["type"] == "http.response.start":
                status = message["status"]
                # on_failure once per request: not again for the 504/500/fallback that
                # answers an error it has already seen.
                if status >= 500 and on_failure and not ctx.response_started and ctx.error is None:
                    ctx.status = status
                    # A framework answering 500 for an exception (Starlette's
                    # ServerErrorMiddleware) does so while handling it: pass it on.
                    handling = sys.exc_info()[1]
                    if handling is not None:
                        ctx.error = handling
                    fallback = await host.call_first("on_failure", ctx, handling)
                    if fallback is not None:
                        ctx.replaced = True
                        await fallback(scope, receive, _FallbackSend(self, ctx, send, rid_header))
                        return
                headers = self._start(ctx, status, message.get("headers") or [], rid_header)
                if headers is None:
                    await self._fail_start(ctx, send, rid_header)
                    return
                message["headers"] = headers
            elif ctx.body_observers is not None and message["type"] == "http.response.body":
                _observe(ctx, message)
            if ctx.keeper is None:
                await send(message)
            else:
                await _send_kept(ctx, send, message)

        every = host.settings.hook_timing_sample
        if every:
            host._ticks += 1
            host.timed = host._ticks % every == 0
        try:
            if policy.guarded:  # a deadline, a body deadline or a body to read first
                await self._guarded(ctx, scope, send_wrapper, on_failure)
            else:
                await self._phases(ctx, scope, receive, send_wrapper, on_failure)
        except PluginFailure as exc:
            # Already logged and counted; the client gets a 500 without the exception text.
            ctx.error = ctx.error or exc
            if not ctx.response_started:
                await INTERNAL_ERROR(scope, receive, send_wrapper)
        finally:
            # gpu_release once per lease, after_request once per request; never raises.
            # always=True: a fail-closed plugin raising here must not keep the others'
            # gpu_release (a leaked lease) or after_request from running.
            ctx.t_end = perf_counter()
            if ctx.lease is not None:
                await host.call_all("gpu_release", ctx, ctx.lease, always=True)
            if chains.get("after_request"):
                pending = host.each("after_request", ctx, always=True)
                if pending is not None:
                    await pending
            # ctx.scope -> scope -> ctx is a cycle: break it so that both are freed now
            # by reference counting, not later by the garbage collector.
            scope.pop("overdrive.ctx", None)

    async def _phases(
        self,
        ctx: RequestContext,
        scope: Scope,
        receive: Receive,
        send_wrapper: Send,
        on_failure: Any,
    ) -> None:
        """The request hooks, then the app or a plugin's answer, then cache_store."""
        host = self.host
        chains = host.chains
        response = None
        if chains.get("before_request"):
            response = host.first("before_request", ctx)
            if type(response) is CoroutineType:
                response = await response
            ctx.t_admitted = perf_counter()
            receive = ctx.receive  # type: ignore[assignment]  # a plugin may replay a body it read
        if response is None and chains.get("cache_lookup"):
            response = host.first("cache_lookup", ctx)
            if type(response) is CoroutineType:
                response = await response
        if response is None and chains.get("gpu_allocate"):
            result = host.first("gpu_allocate", ctx)
            if type(result) is CoroutineType:
                result = await result
            if isinstance(result, Lease):
                ctx.lease = result
            else:
                response = result
        if response is not None:
            try:
                await response(scope, receive, send_wrapper)
            except Exception as exc:
                # A plugin's response broke. Before the start, the client gets a 500
                # (never the plugin's exception); after it, the server must abort.
                if ctx.response_started:
                    raise
                ctx.error = exc
                logger.error("short-circuit response raised", error=repr(exc))
                await INTERNAL_ERROR(scope, receive, send_wrapper)
        else:
            ctx.t_app = perf_counter()
            if ctx.keeper is not None:
                receive = _KeptReceive(receive, ctx)
            if ctx.timeout is None and not on_failure:
                try:
                    await self.app(scope, receive, send_wrapper)
                except Exception as exc:
                    ctx.error = exc  # for after_request (logs, metrics); then as before
                    raise
            else:
                await self._call_app(ctx, scope, receive, send_wrapper, on_failure)
            # Only the app's own response is stored: never a fallback, a 504, a 500.
            if ctx.capture is not None and not ctx.replaced and ctx.error is None:
                await self._store(ctx)

    async def _guarded(
        self, ctx: RequestContext, scope: Scope, send: Send, on_failure: Any
    ) -> None:
        """`_phases` inside the route's deadline scope (middleware/deadline.py); the body
        read first when the route admits after it. Answers 408 or 504 when it fires."""
        policy = ctx.policy
        has_body = (policy.body_first or policy.body_deadline is not None) and may_have_body(scope)
        started = anyio.current_time() - (perf_counter() - ctx.t_start)
        end = started + policy.deadline if policy.deadline is not None else None
        body_end = (
            started + policy.body_deadline
            if has_body and policy.body_deadline is not None
            else None
        )
        deadline = Deadline(end, body_end)
        receive: Any = ctx.receive
        if has_body:
            receive = ctx.receive = ReplayReceive(receive, [], deadline)
            if policy.body_first:
                done = await deadline.run(
                    self._admit_after_body, ctx, scope, receive, send, on_failure
                )
            else:
                done = await deadline.run(self._phases, ctx, scope, receive, send, on_failure)
        else:
            done = await deadline.run(self._phases, ctx, scope, receive, send, on_failure)
        if done:
            return
        if deadline.fired_in_body:
            # The client's fault, not the app's: no ctx.error, no on_failure, no trial.
            if not ctx.response_started:
                await BODY_TIMEOUT(scope, receive, send)
            return
        assert policy.deadline is not None
        error = TimeoutError(f"the request's deadline of {policy.deadline:g} s passed")
        ctx.error = error
        fallback = await self.host.call_first("on_failure", ctx, error) if on_failure else None
        if not ctx.response_started:
            await (fallback or GATEWAY_TIMEOUT)(scope, receive, send)

    async def _admit_after_body(
        self, ctx: RequestContext, scope: Scope, receive: Any, send: Send, on_failure: Any
    ) -> None:
        """Read the body (up to `policy.body_first` bytes) before any admission hook."""
        messages = await read_ahead(receive.receive, ctx.policy.body_first, receive.deadline)
        if messages[-1]["type"] == "http.disconnect":
            return  # the client left while sending: nothing to admit, nobody to answer
        receive.messages = messages
        await self._phases(ctx, scope, receive, send, on_failure)

    def _start(
        self,
        ctx: RequestContext,
        status: int,
        original: Headers,
        rid_header: tuple[bytes, bytes],
    ) -> Headers | None:
        """Record the response start on `ctx`; the headers to send (ours added), or
        None when a fail-closed `on_response_start` plugin raised (answer 500 instead).
        """
        headers = list(original)
        if not sets_header(original, rid_header[0]):
            headers.append(rid_header)
        ctx.status = status
        ctx.response_headers = original
        ctx.response_started = True
        ctx.t_first_byte = perf_counter()
        if self.host.chains.get("on_response_start"):
            try:
                self.host.call_sync("on_response_start", ctx, status, headers)
            except PluginFailure:
                return None
        return headers

    async def _fail_start(
        self, ctx: RequestContext, send: Send, rid_header: tuple[bytes, bytes]
    ) -> None:
        """A fail-closed plugin raised in on_response_start: answer 500 instead of the
        response that was starting, and drop the rest of it (nothing was sent yet).
        """
        ctx.replaced = True
        ctx.status = INTERNAL_ERROR.status
        ctx.response_headers = INTERNAL_ERROR.headers
        ctx.response_started = True
        headers = [*INTERNAL_ERROR.headers, rid_header]
        await send({"type": "http.response.start", "status": ctx.status, "headers": headers})
        await send({"type": "http.response.body", "body": INTERNAL_ERROR.body})

    async def _store(self, ctx: RequestContext) -> None:
        capture = ctx.capture
        if (
            capture is not None
            and capture.complete
            and ctx.status is not None
            and self.host.chains.get("cache_store")
        ):
            captured = CapturedResponse(ctx.status, list(ctx.response_headers or ()), capture.body)
            await self.host.call_all("cache_store", ctx, captured)

    async def _call_app(
        self,
        ctx: RequestContext,
        scope: Scope,
        receive: Receive,
        send: Send,
        on_failure: Any,
    ) -> None:
        host = self.host
        timeout = ctx.timeout
        expired = False
        try:
            if timeout is None:
                await self.app(scope, receive, send)
            elif _get_running_loop() is not None:
                # asyncio's own timeout where it runs (~3 us cheaper than anyio's
                # cancel scope); `expired()` tells our deadline from the app's own
                # TimeoutError, which goes on below like any other exception.
                deadline = asyncio.timeout(timeout)
                try:
                    async with deadline:
                        await self.app(scope, receive, send)
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    expired = True
            else:  # trio, or any loop anyio knows
                with anyio.move_on_after(timeout) as cancel_scope:
                    await self.app(scope, receive, send)
                expired = cancel_scope.cancelled_caught
        except Exception as exc:
            ctx.error = exc
            if ctx.replaced:
                # A fallback already answered the 5xx this exception produced.
                logger.warning("app raised after a fallback answered", error=repr(exc))
                return
            if not on_failure:
                raise
            if ctx.response_started and (ctx.status or 0) >= 500:
                # A framework answered 500 for this exception (Starlette's
                # ServerErrorMiddleware) and on_failure saw that start: once is enough.
                raise
            try:
                fallback = await host.call_first("on_failure", ctx, exc)
            except PluginFailure:
                if ctx.response_started:
                    raise exc from None  # too late for a 500: the server must abort
                raise
            if fallback is None or ctx.response_started:
                raise
            await fallback(scope, receive, send)
            return
        if expired:
            # Our deadline passed: the app was cancelled. A 504 (or on_failure's
            # fallback) unless the response had already started.
            error = TimeoutError(f"the request's deadline of {timeout:g} s passed")
            ctx.error = error
            fallback = await host.call_first("on_failure", ctx, error) if on_failure else None
            if not ctx.response_started:
                await (fallback or GATEWAY_TIMEOUT)(scope, receive, send)


async def _send_kept(ctx: RequestContext, send: Send, message: Message) -> None:
    """Send for a request whose response others depend on (`ctx.keeper`): once the
    client is gone, the app's messages still feed the observers but go nowhere."""
    if ctx.client_gone:
        return
    try:
        await send(message)
    except Exception:
        if not ctx.keeper.holding():
            raise
        ctx.client_gone = True  # the server refused the write: the client left


class _KeptReceive:
    """The app's `receive` while `ctx.keeper` may hold: a disconnect is held back
    until nobody depends on the response any more (the app finishes it for them)."""

    __slots__ = ("__wrapped__", "ctx", "receive")

    def __init__(self, receive: Receive, ctx: RequestContext) -> None:
        self.receive = receive
        self.__wrapped__ = receive  # inspect.unwrap finds the server's receive
        self.ctx = ctx

    async def __call__(self) -> Message:
        message = await self.receive()
        if message.get("type") == "http.disconnect":
            keeper = self.ctx.keeper
            if keeper is not None and keeper.holding():
                self.ctx.client_gone = True
                await keeper.released()
        return message


def _observe(ctx: RequestContext, message: Message) -> None:
    body = message.get("body", b"")
    more = message.get("more_body", False)
    for observer in ctx.body_observers or ():
        try:
            observer(body, more)
        except Exception as exc:
            logger.error(
                "body observer raised", request_id=ctx.request_id, traceback=plain_traceback(exc)
            )


class _FallbackSend:
    """The send given to a fallback that replaces a failing (5xx) response."""

    __slots__ = ("ctx", "failed", "middleware", "rid_header", "send")

    def __init__(
        self,
        middleware: OverdriveMiddleware,
        ctx: RequestContext,
        send: Send,
        rid_header: tuple[bytes, bytes],
    ) -> None:
        self.middleware = middleware
        self.ctx = ctx
        self.send = send
        self.rid_header = rid_header
        self.failed = False

    async def __call__(self, message: Message) -> None:
        if self.failed:
            return  # a fail-closed plugin replaced this fallback with a 500
        if message["type"] == "http.response.start":
            original = message.get("headers") or []
            headers = self.middleware._start(self.ctx, message["status"], original, self.rid_header)
            if headers is None:
                self.failed = True
                await self.middleware._fail_start(self.ctx, self.send, self.rid_header)
                return
            message["headers"] = headers
        await self.send(message)
