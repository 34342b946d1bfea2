"""The `otel` plugin: OpenTelemetry traces (and a request duration metric) from the hooks.

    pip install 'overdrive[otel]'            # opentelemetry-api and -sdk
    plugins = ["otel", ...]                  # first, so its span covers the others

One SERVER span per request, named ``{method} {route template}``, with the
HTTP semantic conventions (``http.request.method``, ``url.path``,
``url.scheme``, ``http.route``, ``http.response.status_code``,
``server.address``, ``server.port``, ``client.address``,
``user_agent.original``, ``error.type``), its parent taken from the request's
W3C ``traceparent``/``tracestate`` (the globally configured propagator).
What only Overdrive knows becomes span events on it: the cache's verdict
(``overdrive.cache``: HIT, MISS, STALE, BYPASS; never the key), an admission
answer (``overdrive.admission``: which plugin answered, the status, the
Retry-After), queue wait, the GPU lease (device, bytes). Each ``host.run``
operation is a child INTERNAL span, with an event per retry.

The span is attached to the context for the request's whole life, so the
app's own spans, the background tasks it starts (asyncio tasks copy the
context) and the structlog lines it writes (``trace_id`` and ``span_id`` are
bound with structlog's contextvars) belong to it; the pools' aiohttp sessions
send ``traceparent`` on their requests.

With opentelemetry-instrumentation-asgi around the app, a SERVER span is
already current when our hooks run: the plugin adds its attributes and events
to that span instead of starting a second one (no doubled spans). If a
MeterProvider is set, ``http.server.request.duration`` (seconds, a histogram)
is recorded too, with the method, route and status code.

The tracer and meter are the global ones (`trace.set_tracer_provider`): this
plugin configures no exporter; the SDK's own configuration (or
opentelemetry-distro's environment variables) does.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import Any, ClassVar

from overdrive import ConfigError, Plugin, hookimpl

__all__ = ["OtelPlugin"]

_SLOT = "otel"


class _Request:
    """The request's span and what to undo when it ends."""

    __slots__ = ("annotated", "own", "route", "span", "started", "token", "unbind")

    def __init__(self, span: Any, own: bool, token: Any, started: float, unbind: Any) -> None:
        self.span = span
        self.own = own  # ours to end; False: the ASGI instrumentation's
        self.token = token
        self.started = started
        self.unbind = unbind
        self.annotated = False
        self.route: str | None = None


def _getter() -> Any:
    from opentelemetry.propagators.textmap import Getter

    class HeadersGetter(Getter[Any]):
        """Reads the request's headers (lower-case names) for the propagator."""

        def get(self, carrier: Any, key: str) -> list[str] | None:
            value = carrier.get_header(key.lower())
            return [value] if value is not None else None

        def keys(self, carrier: Any) -> list[str]:
            return [name.decode("latin-1") for name, _ in carrier.raw_headers]

    return HeadersGetter()


class OtelPlugin(Plugin):
    """Traces requests and operations with the OpenTelemetry API; see the module doc."""

    name: ClassVar[str] = "otel"

    @dataclass
    class Settings:
        tracer_name: str = "overdrive"  # the instrumentation scope of the spans
        log_ids: bool = True  # bind trace_id/span_id for structlog (merge_contextvars)
        propagate_http: bool = True  # send traceparent on the pools' aiohttp requests
        duration_metric: bool = True  # http.server.request.duration, with a MeterProvider

    def __init__(
        self, settings: Any = None, *, tracer_provider: Any = None, meter_provider: Any = None
    ) -> None:
        """`tracer_provider`/`meter_provider`: instead of the global ones (tests, or an
        app that keeps its providers to itself)."""
        super().__init__(settings)
        self.tracer: Any = None
        self._duration: Any = None
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        try:
            from opentelemetry import metrics, propagate, trace
            from opentelemetry.trace import SpanKind, Status, StatusCode
        except ImportError as exc:
            raise ConfigError(
                "otel: the OpenTelemetry API is not installed (pip install 'overdrive[otel]')"
            ) from exc
        s = self.settings or self.Settings()
        self.settings = s
        self._trace = trace
        self._propagate = propagate
        self._server = SpanKind.SERVER
        self._internal = SpanKind.INTERNAL
        self._error = Status(StatusCode.ERROR)
        self._getter = _getter()
        self.tracer = trace.get_tracer(s.tracer_name, tracer_provider=self._tracer_provider)
        if s.duration_metric:
            meter = metrics.get_meter(s.tracer_name, meter_provider=self._meter_provider)
            self._duration = meter.create_histogram(
                "http.server.request.duration",
                unit="s",
                description="Duration of HTTP server requests",
            )

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        if not self.settings.propagate_http:
            return
        for session in (host.state.get("pools") or {}).values():
            configs = getattr(session, "_trace_configs", None)
            if isinstance(configs, list):  # an aiohttp ClientSession
                configs.append(self._aiohttp_trace())

    def _aiohttp_trace(self) -> Any:
        import aiohttp

        propagate = self._propagate

        async def inject(session: Any, trace_ctx: Any, params: Any) -> None:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            for key, value in carrier.items():
                params.headers[key] = value

        config = aiohttp.TraceConfig()
        config.on_request_start.append(inject)
        config.freeze()
        return config

    # -- the request ---------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def before_request(self, ctx: Any) -> None:
        if ctx.internal:
            return
        trace = self._trace
        current = trace.get_current_span()
        if current.is_recording() and getattr(current, "kind", None) is self._server:
            span, own = current, False  # opentelemetry-instrumentation-asgi's span
        else:
            parent = self._propagate.extract(ctx, getter=self._getter)
            span = self.tracer.start_span(
                ctx.method, context=parent, kind=self._server, attributes=self._attributes(ctx)
            )
            own = True
        from opentelemetry import context

        token = context.attach(trace.set_span_in_context(span))
        unbind = None
        if self.settings.log_ids and span.is_recording():
            from structlog.contextvars import bind_contextvars

            sc = span.get_span_context()
            unbind = bind_contextvars(trace_id=f"{sc.trace_id:032x}", span_id=f"{sc.span_id:016x}")
        ctx.state[_SLOT] = _Request(span, own, token, perf_counter(), unbind)

    @staticmethod
    def _attributes(ctx: Any) -> dict[str, Any]:
        scope = ctx.scope
        attributes: dict[str, Any] = {
            "http.request.method": ctx.method,
            "url.path": ctx.path,
            "url.scheme": scope.get("scheme", "http"),
        }
        server = scope.get("server")
        if server:
            attributes["server.address"] = str(server[0])
            if server[1] is not None:
                attributes["server.port"] = int(server[1])
        client = scope.get("client")
        if client:
            attributes["client.address"] = str(client[0])
        agent = ctx.get_header("user-agent")
        if agent:
            attributes["user_agent.original"] = agent
        return attributes

    @hookimpl(trylast=True)
    def on_response_start(self, ctx: Any, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        # Annotated here, not at the end: the ASGI instrumentation ends its span when the
        # body is sent, before after_request runs.
        req = ctx.state.get(_SLOT)
        if req is not None and not req.annotated:
            self._annotate(ctx, req, status, headers)

    def _annotate(
        self, ctx: Any, req: _Request, status: int | None, headers: list[tuple[bytes, bytes]]
    ) -> None:
        from overdrive.plugins.profiler.requests import route_template

        req.annotated = True
        span = req.span
        if not span.is_recording():
            return
        route = route_template(ctx.scope)
        if route != "<unmatched>":
            req.route = route
            if req.own:
                span.update_name(f"{ctx.method} {route}")
            span.set_attribute("http.route", route)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(self._error)
        if ctx.cache_status is not None:  # HIT, MISS, STALE, BYPASS: never the key
            span.add_event("overdrive.cache", {"overdrive.cache.result": ctx.cache_status})
        answered_by = getattr(ctx, "answered_by", None)
        if answered_by is not None:
            attributes: dict[str, Any] = {"overdrive.plugin": answered_by}
            if status is not None:
                attributes["http.response.status_code"] = status
            for name, value in headers:
                if name.lower() == b"retry-after":
                    attributes["overdrive.retry_after"] = bytes(value).decode("latin-1")
            span.add_event("overdrive.admission", attributes)
        if ctx.queue_wait:
            span.add_event("overdrive.queue", {"overdrive.queue.wait_seconds": ctx.queue_wait})
        lease = ctx.lease
        if lease is not None:
            span.add_event(
                "overdrive.gpu.lease",
                {"gpu.device": str(lease.device), "gpu.memory.bytes": int(lease.bytes)},
            )

    @hookimpl(trylast=True)
    def after_request(self, ctx: Any) -> None:
        req = ctx.state.pop(_SLOT, None)
        if req is None:
            return
        from opentelemetry import context

        span = req.span
        status = ctx.status
        try:
            if not req.annotated:  # no response started: the app raised or the client left
                self._annotate(ctx, req, status, [])
            error = ctx.error
            if error is not None and span.is_recording():
                span.record_exception(error)
                span.set_attribute("error.type", type(error).__qualname__)
                span.set_status(self._error)
        finally:
            if req.own:
                span.end()
            context.detach(req.token)
            if req.unbind is not None:
                from structlog.contextvars import reset_contextvars

                reset_contextvars(**req.unbind)
        if self._duration is not None:
            attributes: dict[str, Any] = {"http.request.method": ctx.method}
            if req.route is not None:
                attributes["http.route"] = req.route
            if status is not None:
                attributes["http.response.status_code"] = status
            self._duration.record(perf_counter() - req.started, attributes)

    # -- operations (host.run) -----------------------------------------------------

    @hookimpl(tryfirst=True)
    def before_operation(self, op: Any) -> None:
        held = op.state.get(_SLOT)
        if held is None:
            from opentelemetry import context

            span = self.tracer.start_span(
                f"host.run {op.name}",
                kind=self._internal,
                attributes={"overdrive.operation": op.name},
            )
            # Current while the operation runs: the calls it makes are its children.
            op.state[_SLOT] = (span, context.attach(self._trace.set_span_in_context(span)))
        elif held[0].is_recording():
            held[0].add_event("overdrive.retry", {"overdrive.attempt": op.attempt})

    @hookimpl(tryfirst=True)  # a firstresult hook: before the plugin that answers it
    def on_operation_failure(self, op: Any, error: BaseException) -> None:
        held = op.state.get(_SLOT)
        if held is not None and held[0].is_recording():
            held[0].record_exception(error, {"overdrive.attempt": op.attempt})

    @hookimpl
    def after_operation(self, op: Any) -> None:
        held = op.state.pop(_SLOT, None)
        if held is None:
            return
        from opentelemetry import context

        span, token = held
        if span.is_recording():
            span.set_attribute("overdrive.attempts", op.attempt)
            if op.error is not None:
                span.set_attribute("error.type", type(op.error).__qualname__)
                span.set_status(self._error)
        span.end()
        context.detach(token)
