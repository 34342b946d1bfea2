"""Fuzzing the middleware core: arbitrary requests, apps and faulty plugins.

Every case builds a host with a handful of test plugins whose behaviour is
drawn by hypothesis (raise in any hook, fail-closed or not, short-circuit,
lease, fallback, deadline, capture), an app whose behaviour is drawn too
(answer with any status, headers and body chunking; raise before or after the
start; hang; stream forever; return without answering), a raw ASGI scope
(methods, raw paths, query strings, header names and values with non-UTF-8
bytes and duplicates, keys missing) and a client that may leave at any point.

Properties, for every case:

* the middleware raises nothing of its own: only the app's exception (when no
  fallback answered), the server's send error, or the cancellation we caused;
* what reached the client is well-formed ASGI: one start first, bodies after
  it, nothing after the last body, and complete whenever the middleware
  returned normally (unless the app itself stopped mid-stream);
* a complete answer is exactly one of: the app's own bytes, a plugin's
  short-circuit, a fallback, the middleware's own 500/504;
* `after_request` ran exactly once; `gpu_release` exactly once per lease;
* `cache_store` only ever received the app's own complete response, within
  the capture bound.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from starlette.responses import Response

import overdrive
from overdrive import Lease
from overdrive.contrib.testing import make_host
from overdrive.middleware import OverdriveMiddleware
from overdrive.middleware.request_id import is_sane
from tests.hardening.profiles import FUZZ

Message = dict[str, Any]
HOOKS = (
    "before_request",
    "cache_lookup",
    "gpu_allocate",
    "on_response_start",
    "cache_store",
    "on_failure",
    "gpu_release",
    "after_request",
    "body_observer",
)


class AppError(Exception):
    """The app's own exception (may propagate)."""


class ChaosError(Exception):
    """A plugin's exception (must never propagate)."""


class ClientGone(OSError):
    """What a server's send raises once the client left (ASGI spec: an OSError)."""


# -- what hypothesis draws ---------------------------------------------------------------


@dataclass
class AppPlan:
    kind: str  # respond | raise_before | raise_after | hang_before | hang_after | forever | nothing
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    read_body: bool = False


@dataclass
class PluginPlan:
    raise_in: frozenset[str]
    fail_closed: bool
    short_circuit: str | None  # before_request | cache_lookup | None
    short_circuit_raises: bool
    lease: bool
    fallback: bool
    fallback_status: int
    timeout: float | None
    capture: int | None
    with_route: bool


@dataclass
class ClientPlan:
    body: list[bytes]
    send_fails_after: int | None  # the client leaves: send raises from this message on
    cancel: bool  # the server cancels the request task when the app hangs


PATHS = ["/", "/gpu/x", "/a/b/c", "//", "/%2e%2e/", "/" + "a" * 3000]
PATHS += ["/overdrive", "/overdrive/stats", "/overdrive/x", "/metrics"]  # plugins' own
header_names = st.one_of(
    st.sampled_from(
        [
            b"host",
            b"x-request-id",
            b"cache-control",
            b"authorization",
            b"cookie",
            b"range",
            b"if-none-match",
            b"vary",
            b"content-length",
            b"transfer-encoding",
            b"X-Request-ID",
            b"",
        ]
    ),
    st.binary(max_size=20),
)
header_values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"abc-123", b"a" * 129, b"bad id\r\nx-evil: 1", b"\xff\xfe", b"no-store"]),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=8)


@st.composite
def scopes(draw: st.DrawFn) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1"}
    optional = {
        "method": st.one_of(
            st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]),
            st.text(max_size=10),
        ),
        "path": st.one_of(
            st.sampled_from(PATHS),
            st.text(max_size=60),
        ),
        "raw_path": st.binary(max_size=60),
        "query_string": st.binary(max_size=60),
        "headers": st.one_of(headers, headers.map(lambda hs: [list(h) for h in hs])),
        "scheme": st.sampled_from(["http", "https"]),
        "root_path": st.sampled_from(["", "/prefix"]),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()) or (key in ("method", "path") and draw(st.integers(0, 9))):
            scope[key] = draw(strategy)
    return scope


body_chunks = st.lists(st.binary(max_size=64), max_size=6)


@st.composite
def app_plans(draw: st.DrawFn) -> AppPlan:
    kind = draw(
        st.sampled_from(
            ["respond"] * 4
            + ["raise_before", "raise_after", "hang_before", "hang_after", "forever", "nothing"]
        )
    )
    return AppPlan(
        kind=kind,
        status=draw(st.sampled_from([200, 200, 204, 206, 304, 404, 500, 502, 503])),
        headers=draw(st.lists(st.tuples(header_names, header_values), max_size=4)),
        chunks=draw(body_chunks),
        read_body=draw(st.booleans()),
    )


plugin_plans = st.builds(
    PluginPlan,
    raise_in=st.frozensets(st.sampled_from(HOOKS)),
    fail_closed=st.booleans(),
    short_circuit=st.sampled_from([None, None, "before_request", "cache_lookup"]),
    short_circuit_raises=st.booleans(),
    lease=st.booleans(),
    fallback=st.booleans(),
    fallback_status=st.sampled_from([200, 503]),
    timeout=st.sampled_from([None, None, 0.001, 0.01]),
    capture=st.sampled_from([None, 0, 10, 1 << 20]),
    with_route=st.booleans(),
)
client_plans = st.builds(
    ClientPlan,
    body=body_chunks,
    send_fails_after=st.one_of(st.none(), st.none(), st.integers(0, 4)),
    cancel=st.booleans(),
)


# -- the plugins under test --------------------------------------------------------------


SHORT_BODY = b"short-circuit"
FALLBACK_BODY = b"fallback"


class Exploding(Response):
    """A short-circuit response whose sending raises before it starts (a plugin's bug)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raise ChaosError("short-circuit response raised")


class Chaos(overdrive.Plugin):
    """Raises in the hooks it was told to; may be fail-closed."""

    name = "chaos"

    def __init__(self, plan: PluginPlan) -> None:
        self.raise_in = plan.raise_in
        self.fail_closed = plan.fail_closed

    def _maybe(self, hook: str) -> None:
        if hook in self.raise_in:
            raise ChaosError(f"chaos in {hook}")

    @overdrive.hookimpl(tryfirst=True)
    def before_request(self, ctx: Any) -> None:
        self._maybe("before_request")
        if "body_observer" in self.raise_in:

            def observer(chunk: bytes, more: bool) -> None:
                raise ChaosError("observer")

            ctx.observe_body(observer)

    @overdrive.hookimpl(tryfirst=True)
    async def cache_lookup(self, ctx: Any) -> None:
        self._maybe("cache_lookup")

    @overdrive.hookimpl(tryfirst=True)
    def gpu_allocate(self, ctx: Any) -> None:
        self._maybe("gpu_allocate")

    @overdrive.hookimpl(tryfirst=True)
    def on_response_start(self, ctx: Any, status: int, headers: Any) -> None:
        self._maybe("on_response_start")

    @overdrive.hookimpl(tryfirst=True)
    async def cache_store(self, ctx: Any, response: Any) -> None:
        self._maybe("cache_store")

    @overdrive.hookimpl(tryfirst=True)
    def on_failure(self, ctx: Any, error: Any) -> None:
        self._maybe("on_failure")

    @overdrive.hookimpl(tryfirst=True)
    async def gpu_release(self, ctx: Any, lease: Any) -> None:
        self._maybe("gpu_release")

    @overdrive.hookimpl(tryfirst=True)
    def after_request(self, ctx: Any) -> None:
        self._maybe("after_request")


@dataclass
class LeaserSettings:
    bytes: int = 1


class Actor(overdrive.Plugin):
    """Well-behaved plugin doing what real ones do, and keeping the books."""

    name = "actor"
    Settings = LeaserSettings

    def __init__(self, plan: PluginPlan) -> None:
        self.plan = plan
        self.after: dict[int, int] = {}
        self.leases: dict[int, int] = {}  # id(lease) -> releases
        self.stored: list[Any] = []
        self.fallbacks = 0
        self.short_circuits = 0

    def _response(self, body: bytes, status: int = 200) -> Response:
        if self.plan.short_circuit_raises:
            return Exploding(body, status_code=status)
        return Response(body, status_code=status, headers={"x-from": "plugin"})

    @overdrive.hookimpl
    def before_request(self, ctx: Any) -> Response | None:
        if self.plan.timeout is not None:
            ctx.timeout = self.plan.timeout
        if self.plan.short_circuit == "before_request":
            self.short_circuits += 1
            return self._response(SHORT_BODY, 429)
        return None

    @overdrive.hookimpl
    async def cache_lookup(self, ctx: Any) -> Response | None:
        if self.plan.capture is not None:
            ctx.capture_response(self.plan.capture)
        if self.plan.short_circuit == "cache_lookup":
            self.short_circuits += 1
            return self._response(SHORT_BODY)
        return None

    @overdrive.hookimpl
    def gpu_allocate(self, ctx: Any) -> Lease | None:
        if not self.plan.lease:
            return None
        lease = Lease(0, ctx.settings("actor").bytes)
        self.leases[id(lease)] = 0
        return lease

    @overdrive.hookimpl
    async def gpu_release(self, ctx: Any, lease: Lease) -> None:
        self.leases[id(lease)] += 1

    @overdrive.hookimpl
    def on_failure(self, ctx: Any, error: Any) -> Response | None:
        if self.plan.fallback:
            self.fallbacks += 1
            return Response(FALLBACK_BODY, status_code=self.plan.fallback_status)
        return None

    @overdrive.hookimpl
    def cache_store(self, ctx: Any, response: Any) -> None:
        self.stored.append(response)

    @overdrive.hookimpl
    def after_request(self, ctx: Any) -> None:
        self.after[id(ctx)] = self.after.get(id(ctx), 0) + 1


# -- the app ---------------------------------------------------------------------------


class App:
    """A raw ASGI app doing what `plan` says; records what it sent."""

    def __init__(self, plan: AppPlan) -> None:
        self.plan = plan
        self.sent: list[Message] = []
        self.hung = asyncio.Event()
        self.finished = False

    async def _send(self, send: Any, message: Message) -> None:
        self.sent.append(message)
        await send(message)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        plan = self.plan
        if plan.read_body:
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
        if plan.kind == "raise_before":
            raise AppError("before start")
        if plan.kind == "hang_before":
            self.hung.set()
            await asyncio.Event().wait()
        if plan.kind == "nothing":
            self.finished = True
            return
        start = {"type": "http.response.start", "status": plan.status, "headers": plan.headers}
        await self._send(send, start)
        if plan.kind == "forever":
            for n in range(100_000):
                chunk = {"type": "http.response.body", "body": b"x", "more_body": True}
                await self._send(send, chunk)
                if n == 20:
                    self.hung.set()
                await asyncio.sleep(0)
            raise AssertionError("a stream meant to be cut ran to its end")
        for chunk in plan.chunks:
            await self._send(send, {"type": "http.response.body", "body": chunk, "more_body": True})
        if plan.kind == "raise_after":
            raise AppError("after start")
        if plan.kind == "hang_after":
            self.hung.set()
            await asyncio.Event().wait()
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        self.finished = True


# -- driving one case ------------------------------------------------------------------


@dataclass
class Outcome:
    sent: list[Message]
    error: BaseException | None
    cancelled_by_us: bool


async def drive(
    middleware: OverdriveMiddleware, app: App, scope: dict[str, Any], client: ClientPlan
) -> Outcome:
    sent: list[Message] = []
    body = list(client.body) or [b""]

    async def receive() -> Message:
        if body:
            chunk = body.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(body)}
        if client.send_fails_after is not None:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # the client is still there: nothing more to read
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if client.send_fails_after is not None and len(sent) >= client.send_fails_after:
            raise ClientGone("client went away")
        sent.append(message)

    task = asyncio.ensure_future(middleware(scope, receive, send))
    hung = asyncio.ensure_future(app.hung.wait())
    cancelled = False
    await asyncio.wait({task, hung}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        # The app hangs or streams forever. With a deadline the middleware ends it;
        # otherwise (or when the plan says so) the server cancels the request task,
        # as servers do when the client leaves or at shutdown.
        ctx = scope.get("overdrive.ctx")
        if client.cancel or ctx is None or ctx.timeout is None or ctx.timeout > 0.05:
            cancelled = True
            task.cancel()
    hung.cancel()
    error: BaseException | None = None
    try:
        await task
    except BaseException as exc:
        error = exc
    return Outcome(sent, error, cancelled)


def check_well_formed(sent: list[Message]) -> bool:
    """Assert ASGI well-formedness of what the client got; True when complete."""
    complete = False
    for i, message in enumerate(sent):
        assert not complete, f"message after the last body: {message}"
        if i == 0:
            assert message["type"] == "http.response.start", sent
            assert isinstance(message["status"], int)
            for name, value in message.get("headers") or ():
                assert isinstance(name, bytes) and isinstance(value, bytes)
        else:
            assert message["type"] == "http.response.body", sent
            assert isinstance(message.get("body", b""), bytes)
            complete = not message.get("more_body", False)
    return complete


def body_of(sent: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent[1:])


# The built-in plugins that act on a request's path, each with a config that makes it
# act (a deadline, a small concurrency limit, a GPU to lease, a low rate limit).
REAL_PLUGINS = {
    "profiler": ("overdrive.plugins.profiler", "ProfilerPlugin", {}),
    "access_log": ("overdrive.plugins.access_log", "AccessLogPlugin", {}),
    "ratelimit": ("overdrive.plugins.resilience", "RateLimitPlugin", {"limit": "1000/second"}),
    "concurrency": (
        "overdrive.plugins.resilience",
        "ConcurrencyPlugin",
        {"max_concurrent": 2, "max_queue": 4, "max_wait": 1.0},
    ),
    "breaker": ("overdrive.plugins.resilience", "BreakerPlugin", {}),
    "timeout": ("overdrive.plugins.resilience", "TimeoutPlugin", {"seconds": 5.0}),
    "cache": ("overdrive.plugins.cache", "CachePlugin", {"default_ttl": 30}),
    "gpu": (
        "overdrive.plugins.gpu",
        "GPUPlugin",
        {"backend": "simulated", "simulated_devices": 1, "memory_mb": 64, "max_wait": 1.0},
    ),
    "predictive": ("overdrive.plugins.predictive", "PredictivePlugin", {"min_support": 1.0}),
    "stats": ("overdrive.plugins.stats", "StatsPlugin", {"token": "fuzz-token-123"}),
    "prometheus": ("overdrive.contrib.prometheus", "PrometheusPlugin", {"path": "/metrics"}),
}


def real_plugins() -> tuple[list[Any], dict[str, Any]]:
    """Fresh instances of every built-in plugin installed here, and their config."""
    import importlib

    plugins, config = [], {}
    for name, (module, cls, settings) in REAL_PLUGINS.items():
        try:
            plugins.append(getattr(importlib.import_module(module), cls)())
        except ImportError:
            continue
        config[name] = settings
    return plugins, config


def run_case(
    scope: dict[str, Any],
    app_plan: AppPlan,
    plugin_plan: PluginPlan,
    client: ClientPlan,
    real: bool = False,
) -> None:
    chaos, actor = Chaos(plugin_plan), Actor(plugin_plan)
    config: dict[str, Any] = {"quarantine_after": 1000}
    if plugin_plan.with_route:
        config["routes"] = [{"path": "/gpu/**", "actor": {"bytes": 2}}]
    others: list[Any] = []
    if real:
        others, settings = real_plugins()
        config.update(settings)
    host = make_host(chaos, actor, *others, config=config)
    app = App(app_plan)
    middleware = OverdriveMiddleware(app, host=host)
    outcome = asyncio.run(drive(middleware, app, scope, client))
    error = outcome.error

    # 1. Nothing of the middleware's own escapes.
    if error is not None:
        allowed: tuple[type[BaseException], ...] = (AppError, ClientGone)
        if outcome.cancelled_by_us:
            allowed += (asyncio.CancelledError,)
        assert isinstance(error, allowed), f"middleware raised {error!r}"
        if isinstance(error, AppError):
            assert actor.fallbacks == 0 or any(
                m["type"] == "http.response.start" for m in app.sent
            ), "the app's exception escaped although a fallback answered"

    # 2. Well-formed; complete whenever the middleware returned normally, except when the
    # app itself stopped mid-stream (a deadline after the start) or never answered.
    complete = check_well_formed(outcome.sent)
    client_left = client.send_fails_after is not None
    if error is None and not client_left:
        app_stopped_mid_stream = app_plan.kind in ("hang_after", "forever") and any(
            m["type"] == "http.response.start" for m in app.sent
        )
        app_sent_nothing = app_plan.kind == "nothing" and not outcome.sent
        assert complete or app_stopped_mid_stream or app_sent_nothing, outcome.sent

    # 3. A complete answer is one of the legitimate ones, byte for byte.
    if complete:
        start, body = outcome.sent[0], body_of(outcome.sent)
        answers = {(504, b"Gateway Timeout"), (500, b"Internal Server Error")}
        answers.add((429 if plugin_plan.short_circuit == "before_request" else 200, SHORT_BODY))
        answers.add((plugin_plan.fallback_status, FALLBACK_BODY))
        if app.finished and app_plan.kind == "respond":
            answers.add((app_plan.status, b"".join(app_plan.chunks)))
        # Built-in plugins answer too: rate limited, shed, no GPU memory, breaker open.
        path = scope.get("path", "")
        theirs = real and (
            start["status"] in (429, 503)
            # The stats and metrics endpoints answer for themselves (401 without a token).
            or ((path.startswith("/overdrive") or path == "/metrics") and start["status"] < 500)
        )
        assert theirs or (start["status"], body) in answers, (start["status"], body)
        # The app's own X-Request-ID lines where it set them (kept as sent, nothing added),
        # else exactly one of ours, which is always sane.
        rid = [v for k, v in start["headers"] if k.lower() == b"x-request-id"]
        apps_own = [v for k, v in app_plan.headers if k.lower() == b"x-request-id"]
        assert rid == apps_own or (len(rid) == 1 and is_sane(rid[0])), start["headers"]

    # 4. after_request exactly once; every lease released exactly once.
    assert list(actor.after.values()) == [1]
    assert all(count == 1 for count in actor.leases.values()), actor.leases

    # 5. Only the app's own complete response is ever stored, within the bound.
    for stored in actor.stored:
        assert app.finished and app_plan.kind == "respond", "stored what the app did not answer"
        assert stored.status == app_plan.status
        assert stored.body == b"".join(app_plan.chunks)
        if not real:  # with the cache plugin on, its capture bound may be the one in force
            assert plugin_plan.capture is not None and len(stored.body) <= plugin_plan.capture

    # 6. With the built-in plugins: nothing held once the request is over.
    if real:
        from tests.hardening.test_faults import leaks

        held = asyncio.run(leaks(host))
        assert all(v == 0 for v in held.values()), held


@pytest.fixture(autouse=True)
def _quiet_logs() -> Any:
    """Plugins raise on purpose thousands of times: keep their tracebacks off the output."""
    import logging

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield
    structlog.configure(**saved)


@FUZZ
@given(scope=scopes(), app_plan=app_plans(), plugin_plan=plugin_plans, client=client_plans)
def test_middleware_survives_anything(
    scope: dict[str, Any], app_plan: AppPlan, plugin_plan: PluginPlan, client: ClientPlan
) -> None:
    run_case(scope, app_plan, plugin_plan, client)


@FUZZ
@given(scope=scopes(), app_plan=app_plans(), plugin_plan=plugin_plans, client=client_plans)
def test_middleware_survives_anything_with_every_plugin(
    scope: dict[str, Any], app_plan: AppPlan, plugin_plan: PluginPlan, client: ClientPlan
) -> None:
    if not real_plugins()[0]:
        pytest.skip("no built-in plugin is installed yet")
    run_case(scope, app_plan, plugin_plan, client, real=True)
