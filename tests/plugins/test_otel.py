"""The `otel` plugin, against the OpenTelemetry SDK's in-memory exporter and metric reader."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from overdrive.contrib.testing import serve
from overdrive.plugins.otel import OtelPlugin
from tests.support.server import serving

EXPORTER = InMemorySpanExporter()
READER = InMemoryMetricReader()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
METERS = MeterProvider(metric_readers=[READER])
# Providers of these tests' own, not the process-wide ones: the rest of the suite
# records nothing into them.


def otel() -> OtelPlugin:
    return OtelPlugin(tracer_provider=PROVIDER, meter_provider=METERS)


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(autouse=True)
def spans() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


async def video(request: Request) -> PlainTextResponse:
    return PlainTextResponse("v", headers={"cache-control": "max-age=60"})


def server_spans() -> list[Any]:
    return [s for s in EXPORTER.get_finished_spans() if s.kind is SpanKind.SERVER]


def config(*plugins: str, **extra: Any) -> dict[str, Any]:
    return {"plugins": list(plugins), **extra}


async def test_one_server_span_per_request_with_the_http_conventions() -> None:
    app = Starlette(routes=[Route("/videos/{video_id}", video)])
    async with serve(app, plugins=[otel()]) as h:
        r = await h.client.get(
            "/videos/7", headers={"traceparent": TRACEPARENT, "user-agent": "probe/1"}
        )
        assert r.status_code == 200
    (span,) = server_spans()
    assert span.name == "GET /videos/{video_id}"
    a = span.attributes
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/videos/7"
    assert a["http.route"] == "/videos/{video_id}"
    assert a["http.response.status_code"] == 200
    assert a["user_agent.original"] == "probe/1"
    assert "client.address" in a and "server.address" in a
    # The W3C parent from the request.
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID


async def test_a_5xx_marks_the_span_as_an_error() -> None:
    async def broken(request: Request) -> PlainTextResponse:
        return PlainTextResponse("no", status_code=503)

    async with serve(Starlette(routes=[Route("/b", broken)]), plugins=[otel()]) as h:
        await h.client.get("/b")
    (span,) = server_spans()
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == "503"


async def test_cache_verdicts_and_admission_answers_are_events() -> None:
    app = Starlette(routes=[Route("/videos/{video_id}", video)])
    settings = config("cache", "ratelimit", ratelimit={"limit": "2/minute", "headers": True})
    async with serve(app, plugins=[otel()], config=settings) as h:
        statuses = [(await h.client.get("/videos/1")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    first, second, third = sorted(server_spans(), key=lambda s: s.start_time)

    def named(span: Any, name: str) -> list[dict[str, Any]]:
        return [dict(e.attributes or {}) for e in span.events if e.name == name]

    assert named(first, "overdrive.cache") == [{"overdrive.cache.result": "MISS"}]
    assert named(second, "overdrive.cache") == [{"overdrive.cache.result": "HIT"}]
    assert named(second, "overdrive.admission") == [
        {"overdrive.plugin": "cache", "http.response.status_code": 200}
    ]
    (refused,) = named(third, "overdrive.admission")
    assert refused["overdrive.plugin"] == "ratelimit"
    assert refused["http.response.status_code"] == 429
    assert int(refused["overdrive.retry_after"]) >= 1
    for span in (first, second, third):  # the cache key never appears
        text = json.dumps([dict(e.attributes or {}) for e in span.events])
        assert "/videos/1" not in text


async def test_each_operation_is_a_child_span_with_its_retries() -> None:
    calls = {"n": 0}

    async def flaky() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("first try fails")
        return "ok"

    async def endpoint(request: Request) -> JSONResponse:
        host = request.scope["overdrive.ctx"].host
        return JSONResponse({"answer": await host.run("recommender", flaky)})

    app = Starlette(routes=[Route("/r", endpoint)])
    settings = config("retry", retry={"attempts": 3, "wait_initial": 0.001, "wait_max": 0.001})
    async with serve(app, plugins=[otel()], config=settings) as h:
        assert (await h.client.get("/r")).json() == {"answer": "ok"}
    (server,) = server_spans()
    (op,) = [s for s in EXPORTER.get_finished_spans() if s.name == "host.run recommender"]
    assert op.parent is not None and op.parent.span_id == server.context.span_id
    assert op.attributes["overdrive.attempts"] == 2
    assert [e.name for e in op.events] == ["exception", "overdrive.retry"]


async def test_beside_the_asgi_instrumentation_there_is_one_server_span() -> None:
    app = Starlette(routes=[Route("/videos/{video_id}", video)])
    async with serve(app, plugins=[otel()], config=config("cache")) as h:
        instrumented = OpenTelemetryMiddleware(h.app, tracer_provider=PROVIDER)
        import httpx

        transport = httpx.ASGITransport(app=instrumented)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            await c.get("/videos/3")
    (span,) = server_spans()  # theirs, with our attributes and events on it
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.asgi"
    assert span.attributes["http.route"] == "/videos/{video_id}"
    assert [e.name for e in span.events] == ["overdrive.cache"]


async def test_log_lines_background_tasks_and_outgoing_calls_carry_the_trace() -> None:
    out = io.StringIO()
    log = structlog.wrap_logger(
        structlog.PrintLogger(out),
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.JSONRenderer()],
    )
    seen: dict[str, Any] = {}

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"traceparent": request.headers.get("traceparent")})

    with serving(Starlette(routes=[Route("/echo", echo)]), lifespan="off") as echo_url:

        async def endpoint(request: Request) -> JSONResponse:
            log.info("generating")
            host = request.scope["overdrive.ctx"].host

            async def background() -> None:
                with PROVIDER.get_tracer("app").start_as_current_span("transcode"):
                    pass

            await asyncio.create_task(background())
            async with host.state["pools"]["echo"].get("/echo") as response:
                seen.update(await response.json())
            return JSONResponse({})

        app = Starlette(routes=[Route("/g", endpoint)])
        settings = config("pools", pools={"http": {"echo": {"base_url": echo_url}}})
        async with serve(app, plugins=[otel()], config=settings) as h:
            await h.client.get("/g")
    (server,) = server_spans()
    trace_id = f"{server.context.trace_id:032x}"
    line = json.loads(out.getvalue().splitlines()[0])
    assert line["trace_id"] == trace_id
    assert line["span_id"] == f"{server.context.span_id:016x}"
    (task,) = [s for s in EXPORTER.get_finished_spans() if s.name == "transcode"]
    assert task.parent is not None and task.parent.span_id == server.context.span_id
    assert seen["traceparent"] is not None and seen["traceparent"].split("-")[1] == trace_id
    # After the request, the ids are unbound again.
    assert "trace_id" not in structlog.contextvars.get_contextvars()


async def test_the_request_duration_metric() -> None:
    app = Starlette(routes=[Route("/videos/{video_id}", video)])
    async with serve(app, plugins=[otel()]) as h:
        await h.client.get("/videos/9")
    data = READER.get_metrics_data()
    points = [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "http.server.request.duration"
        for point in metric.data.data_points
        if point.attributes.get("http.route") == "/videos/{video_id}"
    ]
    assert points and points[0].count >= 1
    assert points[0].attributes["http.response.status_code"] == 200
