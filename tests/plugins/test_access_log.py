"""The `access_log` plugin: one structured event per request, the request id bound for the app."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import overdrive.plugins.access_log as access_log_module
from overdrive import Lease, RequestContext, hookimpl
from overdrive.contrib.testing import check_plugin, serve
from overdrive.plugins.access_log import AccessLogPlugin, RequestIdFilter

app_log = structlog.get_logger("app")
std_log = logging.getLogger("test.app")


async def video(request):  # type: ignore[no-untyped-def]
    app_log.info("rendering")
    std_log.warning("rendering (stdlib)")
    return JSONResponse(structlog.contextvars.get_contextvars())


async def boom(request):  # type: ignore[no-untyped-def]
    app_log.error("about to fail")
    raise RuntimeError("boom")


APP = Starlette(routes=[Route("/videos/{video_id}", video), Route("/boom", boom)])


def _events(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_public_names_are_pinned() -> None:
    assert access_log_module.__all__ == sorted(access_log_module.__all__)
    assert access_log_module.__all__ == ["AccessLogPlugin", "RequestIdFilter"]


def test_plugin_meets_the_hook_contract() -> None:
    check_plugin(AccessLogPlugin)


async def test_one_json_event_per_request_with_route_and_request_id() -> None:
    buf = io.StringIO()

    class Gpu:
        name = "gpu"

        @hookimpl
        def gpu_allocate(self, ctx: RequestContext) -> Lease:
            ctx.cache_status = "miss"
            return Lease(device=0, bytes=1024)

    async with serve(
        APP,
        plugins=[AccessLogPlugin(stream=buf), Gpu()],
        config={"plugins": ["access_log", "gpu"]},
    ) as h:
        r = await h.client.get("/videos/42", headers={"x-request-id": "abc-123"})
        assert r.status_code == 200
        # The app saw the request id bound in structlog's contextvars.
        assert r.json() == {"request_id": "abc-123"}
    [event] = _events(buf)
    assert event["event"] == "request"
    assert event["request_id"] == "abc-123"
    assert event["route"] == "/videos/{video_id}"
    assert "path" not in event  # raw paths stay out unless asked for
    assert event["method"] == "GET"
    assert event["status"] == 200
    assert event["duration_ms"] >= 0
    assert event["cache"] == "miss"
    assert event["lease"] == {"device": 0, "bytes": 1024}
    assert event["level"] == "info"
    assert "timestamp" in event
    assert structlog.contextvars.get_contextvars().get("request_id") is None  # unbound after


async def test_app_logs_carry_the_request_id_also_on_500() -> None:
    buf = io.StringIO()
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as app_events:
        async with serve(
            APP,
            plugins=[AccessLogPlugin(stream=buf)],
            config={"plugins": ["access_log"]},
            raise_app_exceptions=False,
        ) as h:
            r = await h.client.get("/boom", headers={"x-request-id": "req-500"})
            assert r.status_code == 500
    [failing] = [e for e in app_events if e["event"] == "about to fail"]
    assert failing["request_id"] == "req-500"
    [event] = _events(buf)
    assert event["status"] == 500
    assert event["error"] == "RuntimeError"
    assert event["level"] == "error"
    assert event["request_id"] == "req-500"


async def test_stdlib_logging_gets_the_request_id_through_the_filter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    async with serve(
        APP, plugins=[AccessLogPlugin(stream=io.StringIO())], config={"plugins": ["access_log"]}
    ) as h:
        with caplog.at_level(logging.WARNING, logger="test.app"):
            await h.client.get("/videos/1", headers={"x-request-id": "std-1"})
    [record] = [r for r in caplog.records if r.name == "test.app"]
    assert record.request_id == "std-1"  # type: ignore[attr-defined]


async def test_console_format_for_development() -> None:
    buf = io.StringIO()
    async with serve(
        APP,
        plugins=[AccessLogPlugin(stream=buf)],
        config={"plugins": ["access_log"], "access_log": {"format": "console"}},
    ) as h:
        await h.client.get("/videos/1", headers={"x-request-id": "dev-1"})
    line = buf.getvalue().strip()
    assert "request" in line and "request_id=dev-1" in line and "status=200" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


async def test_disabled_does_nothing() -> None:
    buf = io.StringIO()
    async with serve(
        APP,
        plugins=[AccessLogPlugin(stream=buf)],
        config={"plugins": ["access_log"], "access_log": {"enabled": False}},
    ) as h:
        r = await h.client.get("/videos/1")
        assert r.json() == {}  # nothing bound
    assert buf.getvalue() == ""


async def test_level_filters_successes_but_keeps_failures() -> None:
    buf = io.StringIO()
    async with serve(
        APP,
        plugins=[AccessLogPlugin(stream=buf)],
        config={"plugins": ["access_log"], "access_log": {"level": "warning"}},
        raise_app_exceptions=False,
    ) as h:
        await h.client.get("/videos/1")
        await h.client.get("/boom")
    assert [e["status"] for e in _events(buf)] == [500]


async def test_unmatched_paths_log_as_one_route_and_path_only_when_asked() -> None:
    buf = io.StringIO()
    async with serve(
        APP,
        plugins=[AccessLogPlugin(stream=buf)],
        config={"plugins": ["access_log"], "access_log": {"include_path": True}},
    ) as h:
        await h.client.get("/wp-login.php")
    [event] = _events(buf)
    assert event["route"] == "<unmatched>"
    assert event["path"] == "/wp-login.php"
    assert event["status"] == 404


async def test_500_when_the_middleware_sits_inside_starlettes_error_handler() -> None:
    """app.add_middleware: the exception passes our middleware before any response."""
    from overdrive.contrib.testing import make_host
    from overdrive.middleware import OverdriveMiddleware

    buf = io.StringIO()
    host = make_host(AccessLogPlugin(stream=buf), config={"plugins": ["profiler", "access_log"]})
    app = Starlette(routes=[Route("/boom", boom)])
    app.add_middleware(OverdriveMiddleware, host=host)
    async with serve(app, raise_app_exceptions=False) as h:
        assert (await h.client.get("/boom")).status_code == 500
    [event] = _events(buf)
    assert event["status"] == 500 and event["error"] == "RuntimeError"
    series = host.request_metrics.series[("/boom", "GET", "5xx")]
    assert series.count == 1 and series.errors == 1


async def test_other_plugins_add_fields_through_ctx_state_log() -> None:
    buf = io.StringIO()

    class Breaker:
        name = "breaker"

        @hookimpl
        def before_request(self, ctx: RequestContext) -> None:
            ctx.state.setdefault("log", {})["breaker"] = "half_open"
            ctx.state["log"]["status"] = 999  # cannot override the access log's own fields

    async with serve(
        APP,
        plugins=[AccessLogPlugin(stream=buf), Breaker()],
        config={"plugins": ["access_log", "breaker"]},
    ) as h:
        await h.client.get("/videos/1")
    [event] = _events(buf)
    assert event["breaker"] == "half_open"
    assert event["status"] == 200
