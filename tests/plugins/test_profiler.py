"""The profiler: PerformanceProfiler (the seed's API), LogHistogram, the `profiler` plugin."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route

import overdrive
import overdrive.plugins.profiler as profiler_module
from overdrive import Overdrive, RequestContext, hookimpl
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.middleware import OverdriveMiddleware
from overdrive.plugins.profiler import (
    LogHistogram,
    PerformanceProfiler,
    ProfilerPlugin,
    RequestMetrics,
    route_template,
)
from overdrive.plugins.profiler.requests import OVERFLOW, UNMATCHED, RollingWindow


def test_public_names_are_pinned() -> None:
    assert profiler_module.__all__ == sorted(profiler_module.__all__)
    assert profiler_module.__all__ == [
        "LogHistogram",
        "PerformanceProfiler",
        "Profile",
        "ProfilerPlugin",
        "RequestMetrics",
        "route_template",
    ]


def test_plugin_meets_the_hook_contract() -> None:
    check_plugin(ProfilerPlugin)


def test_bad_settings_name_key_and_value() -> None:
    with pytest.raises(overdrive.ConfigError, match=r"profiler.max_series: expected >= 1, got 0"):
        make_host(ProfilerPlugin(), config={"plugins": ["profiler"], "profiler": {"max_series": 0}})


# -- LogHistogram ------------------------------------------------------------------


def _nearest_rank(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(math.ceil(q / 100 * len(sorted_values)) - 1, 0)]


def test_histogram_percentiles_are_within_the_stated_relative_error() -> None:
    rng = random.Random(1)
    values = [rng.lognormvariate(-4, 2.5) for _ in range(50_000)]
    values = [min(max(v, 10e-6), 3600.0) for v in values]
    h = LogHistogram()
    h.record_many(values)
    exact = sorted(values)
    for q in (1, 10, 50, 90, 95, 99, 99.9, 100):
        got, want = h.percentile(q), _nearest_rank(exact, q)
        assert abs(got - want) <= h.relative_error * want * 1.000001, (q, got, want)
    assert h.count == len(values)
    assert h.min == exact[0] and h.max == exact[-1]
    assert h.percentiles((50, 95, 99)) == [h.percentile(50), h.percentile(95), h.percentile(99)]


def test_histogram_memory_is_fixed_whatever_is_recorded() -> None:
    h = LogHistogram()
    size = len(h.counts)
    for v in (0.0, -1.0, 5e-6, 10e-6, 1.0, 3599.0, 3600.0, 1e9, float("inf")):
        h.record(v)
    assert len(h.counts) == size < 1100
    assert h.max == float("inf") and h.min == 0.0
    assert h.percentile(100) == float("inf")
    assert h.percentile(1) <= 10e-6  # the underflow reports "10 us at most"


def test_histogram_merge_and_prometheus_buckets() -> None:
    a, b = LogHistogram(), LogHistogram()
    a.record_many([0.001] * 10)
    b.record_many([0.5] * 5 + [100.0])
    a.merge(b)
    assert a.count == 16
    assert a.count_le([0.01, 1.0, 60.0, 3600.0]) == [10, 15, 15, 16]
    with pytest.raises(ValueError, match="layouts"):
        a.merge(LogHistogram(relative_error=0.02))
    assert LogHistogram().percentile(50) == 0.0


# -- PerformanceProfiler (the seed's names) ------------------------------------------


async def test_seed_start_stop_and_report() -> None:
    profiler = PerformanceProfiler()
    for _ in range(3):
        profiler.start_profiling("video_processing")
        try:
            await asyncio.sleep(0.001)
        finally:
            profiler.stop_profiling("video_processing")
    report = profiler.get_profile_report("video_processing")
    assert report["count"] == 3
    assert report["avg_time"] >= 0.001
    assert f"{report['avg_time']:.3f}s"  # the seed prints it like this
    assert f"{report['avg_memory_delta']:.2f}MB"
    assert report["memory_measure"] == "rss"
    assert report["p50"] <= report["p95"] <= report["p99"] <= report["max"]
    assert report["errors"] == 0


def test_unknown_name_reports_zeros_and_stop_without_start_is_harmless() -> None:
    profiler = PerformanceProfiler(track_memory=False)
    assert profiler.stop_profiling("never") == 0.0
    report = profiler.get_profile_report("never")
    assert report["count"] == 0 and report["avg_time"] == 0.0
    assert report["memory_measure"] == "off"


async def test_context_manager_and_decorator_count_errors() -> None:
    profiler = PerformanceProfiler(track_memory=False)
    with profiler.profile("block"):
        pass
    with pytest.raises(RuntimeError), profiler.profile("block"):
        raise RuntimeError("boom")

    @profiler.profile("sync_fn")
    def add(a: int, b: int) -> int:
        return a + b

    @profiler.profile("async_fn")
    async def fetch() -> str:
        await asyncio.sleep(0)
        return "ok"

    assert add(1, 2) == 3
    assert await fetch() == "ok"
    async with profiler.profile("async_block"):
        await asyncio.sleep(0)
    assert profiler.get_profile_report("block")["count"] == 2
    assert profiler.get_profile_report("block")["errors"] == 1
    assert profiler.get_profile_report("sync_fn")["count"] == 1
    assert profiler.get_profile_report("async_fn")["count"] == 1
    assert profiler.get_profile_report("async_block")["count"] == 1
    assert set(profiler.get_all_reports()) == {"block", "sync_fn", "async_fn", "async_block"}


async def test_concurrent_profiles_of_one_name_are_told_apart() -> None:
    profiler = PerformanceProfiler(track_memory=False)

    async def job(delay: float) -> None:
        profiler.start_profiling("job")
        await asyncio.sleep(delay)
        profiler.stop_profiling("job")

    await asyncio.gather(job(0.05), job(0.001))
    report = profiler.get_profile_report("job")
    assert report["count"] == 2
    assert report["max"] >= 0.05 * 0.99
    assert report["p50"] < 0.05  # the short job was not given the long one's start


def test_names_are_bounded() -> None:
    profiler = PerformanceProfiler(track_memory=False, max_names=3)
    for i in range(10):
        profiler.record(f"name-{i}", 0.01)
    assert len(profiler.names()) == 4
    assert profiler.get_profile_report("<other>")["count"] == 7


# -- the plugin ------------------------------------------------------------------------


def _app() -> Starlette:
    async def video(request):  # type: ignore[no-untyped-def]
        return PlainTextResponse("v" * 100)

    async def boom(request):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    async def slow(request):  # type: ignore[no-untyped-def]
        await asyncio.sleep(5)
        return PlainTextResponse("late")

    async def stream(request):  # type: ignore[no-untyped-def]
        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(3):
                yield b"x" * 10

        return StreamingResponse(chunks())

    inner = Starlette(routes=[Route("/items/{item_id}", video)])
    return Starlette(
        routes=[
            Route("/videos/{video_id}", video),
            Route("/boom", boom),
            Route("/slow", slow),
            Route("/stream", stream),
            Mount("/api", app=inner),
        ]
    )


def _series(host: Overdrive) -> dict[tuple[str, str, str], object]:
    return dict(host.request_metrics.series)


async def test_series_are_per_route_template_method_and_status_class() -> None:
    async with serve(_app(), config={"plugins": ["profiler"]}, raise_app_exceptions=False) as h:
        for i in range(5):
            assert (await h.client.get(f"/videos/{i}")).status_code == 200
        await h.client.post("/videos/1")  # 405: the route matched partially
        for i in range(3):
            await h.client.get(f"/scanner/{i}.php")
        await h.client.get("/api/items/7")
        await h.client.get("/boom")
        series = h.host.request_metrics.series
        keys = set(series)
        assert ("/videos/{video_id}", "GET", "2xx") in keys
        assert ("/videos/{video_id}", "POST", "4xx") in keys
        assert (UNMATCHED, "GET", "4xx") in keys
        assert ("/api/items/{item_id}", "GET", "2xx") in keys
        assert ("/boom", "GET", "5xx") in keys
        assert not any("/scanner" in k[0] or k[0] == "/videos/1" for k in keys)
        ok = series[("/videos/{video_id}", "GET", "2xx")]
        assert ok.count == 5 and ok.errors == 0 and ok.bytes == 500
        assert series[(UNMATCHED, "GET", "4xx")].count == 3
        assert series[("/boom", "GET", "5xx")].errors == 1
        stats = await h.host.get_system_stats()
        figures = stats["profiler"]
        assert figures["requests"] == 11
        assert figures["errors"] == 1
        assert figures["in_flight"] == 0
        assert figures["latency"]["p50"] > 0
        assert figures["recent_latency"]["count"] == 11


async def test_streamed_bytes_timeouts_and_server_timing() -> None:
    class Deadline:
        name = "deadline"

        @hookimpl
        def before_request(self, ctx: RequestContext) -> None:
            if ctx.path == "/slow":
                ctx.timeout = 0.01

    async with serve(
        _app(),
        plugins=[Deadline()],
        config={"plugins": ["profiler", "deadline"], "profiler": {"server_timing": True}},
    ) as h:
        r = await h.client.get("/stream")
        assert r.content == b"x" * 30
        assert "total;dur=" in r.headers["server-timing"]
        assert (await h.client.get("/slow")).status_code == 504
        series = h.host.request_metrics.series
        assert series[("/stream", "GET", "2xx")].bytes == 30
        slow = series[("/slow", "GET", "5xx")]
        assert slow.timeouts == 1 and slow.errors == 1


async def test_no_server_timing_unless_asked() -> None:
    async with serve(_app(), config={"plugins": ["profiler"]}) as h:
        r = await h.client.get("/videos/1")
        assert "server-timing" not in r.headers


async def test_queue_wait_is_kept_apart_from_running() -> None:
    class Queue:
        name = "queue"

        @hookimpl
        async def before_request(self, ctx: RequestContext) -> None:
            await asyncio.sleep(0.02)
            ctx.queue_wait += 0.02

    async with serve(_app(), plugins=[Queue()], config={"plugins": ["profiler", "queue"]}) as h:
        await h.client.get("/videos/1")
        series = h.host.request_metrics.series[("/videos/{video_id}", "GET", "2xx")]
        phases = dict(zip(profiler_module.requests.PHASES, series.phases, strict=True))
        assert phases["queue_wait"] == pytest.approx(0.02)
        total = series.histogram.sum
        assert phases["running"] == pytest.approx(total - 0.02)
        assert phases["admission"] >= 0.02  # the wait happened in admission
        assert phases["app"] > 0


async def test_in_flight_counts_requests_being_served() -> None:
    seen: list[int] = []
    host = make_host(config={"plugins": ["profiler"]})

    async def peek(request):  # type: ignore[no-untyped-def]
        seen.append(host.request_metrics.in_flight)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/peek", peek)])
    async with serve(app, host=host) as h:
        await asyncio.gather(*(h.client.get("/peek") for _ in range(3)))
        assert max(seen) >= 1
        assert host.request_metrics.in_flight == 0


async def test_operations_run_through_the_host_are_profiled() -> None:
    host = make_host(config={"plugins": ["profiler"]})

    async def call() -> str:
        return "ok"

    async def fail() -> None:
        raise ConnectionError("down")

    assert await host.run("external_api", call) == "ok"
    with pytest.raises(ConnectionError):
        await host.run("external_api", fail)
    report = host.profiler.get_profile_report("external_api")
    assert report["count"] == 2 and report["errors"] == 1
    assert isinstance(host.profiler, PerformanceProfiler)  # the seed's system.profiler


def test_a_million_distinct_raw_paths_keep_series_bounded() -> None:
    """A scanner: every path new. The series (and so the memory) stay bounded."""
    host = make_host(config={"plugins": ["profiler"], "profiler": {"max_series": 50}})
    plugin = host.get_plugin("profiler")
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    ctx = RequestContext(scope, "rid", host.routes.default, host)
    ctx.status = 404

    class FakeRoute:
        def __init__(self, path: str) -> None:
            self.path = path

    templates = [FakeRoute(f"/t{i}/{{id}}") for i in range(200)]  # more than max_series
    for i in range(1_000_000):
        scope["path"] = f"/wp-admin/{i}.php"
        if i % 4 == 0:
            scope["route"] = templates[i % 200]
            ctx.status = 200
        else:
            scope.pop("route", None)
            ctx.status = 404
        ctx.t_end = ctx.t_start + 0.001
        plugin.before_request(ctx)
        plugin.after_request(ctx)
    series = host.request_metrics.series
    assert len(series) <= 51
    assert (UNMATCHED, "GET", "4xx") in series
    assert series[(OVERFLOW, "GET", "2xx")].count > 0
    assert sum(s.count for s in series.values()) == 1_000_000


def test_route_template_reads_the_routed_scope() -> None:
    class R:
        path = "/videos/{id}"

    assert route_template({"path": "/videos/1"}) == UNMATCHED
    assert route_template({"route": R()}) == "/videos/{id}"
    assert route_template({"route": object()}) == UNMATCHED
    mounted = {"route": R(), "root_path": "/base/api", "app_root_path": "/base"}
    assert route_template(mounted) == "/api/videos/{id}"


def test_odd_methods_and_statuses_fold() -> None:
    m = RequestMetrics()
    assert m.get("/x", "BREW", 200).key == ("/x", "OTHER", "2xx")
    assert m.get("/x", "GET", None).key == ("/x", "GET", "5xx")
    assert m.get("/x", "GET", 999).key == ("/x", "GET", "5xx")


def test_rolling_window_rates() -> None:
    w = RollingWindow(10)
    for t in range(100, 110):
        for _ in range(5):
            w.add(t + 0.5, error=(t % 2 == 0))
    rps, error_rate = w.rates(110.2)
    assert rps == pytest.approx(5.0)
    assert error_rate == pytest.approx(0.5)
    assert w.rates(200.0) == (0.0, 0.0)  # old seconds fall out of the window


def test_recent_percentiles_cover_the_last_window_only() -> None:
    m = RequestMetrics(recent=30.0)
    old = m.get("/a", "GET", 200)
    for _ in range(100):
        old.histogram.record(2.0)  # slow, long ago
    assert m.recent(1000.0, m.total()).percentile(50) == pytest.approx(2.0, rel=0.01)
    for _ in range(10):
        old.histogram.record(0.01)  # fast, lately
    recent = m.recent(1031.0, m.total())  # the snapshot at t=1000 is the baseline
    assert recent.count == 10
    assert recent.percentile(99) == pytest.approx(0.01, rel=0.01)
    assert m.total().count == 110


async def test_in_flight_stays_right_when_an_earlier_plugin_short_circuits() -> None:
    class Shed:
        name = "shed"

        @hookimpl(tryfirst=True)
        def before_request(self, ctx: RequestContext) -> object:
            return PlainTextResponse("busy", 503)

    async with serve(_app(), plugins=[Shed()], config={"plugins": ["shed", "profiler"]}) as h:
        for _ in range(3):
            assert (await h.client.get("/videos/1")).status_code == 503
        assert h.host.request_metrics.in_flight == 0
        assert h.host.request_metrics.series[(UNMATCHED, "GET", "5xx")].count == 3


async def test_a_client_that_leaves_is_a_499_not_a_server_error() -> None:
    host = make_host(config={"plugins": ["profiler"]})
    started = asyncio.Event()

    async def wait(request):  # type: ignore[no-untyped-def]
        started.set()
        await asyncio.sleep(10)

    app = OverdriveMiddleware(Starlette(routes=[Route("/wait", wait)]), host=host)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": "/wait", "headers": [], "query_string": b""}
    task = asyncio.create_task(app(scope, receive, send))
    await started.wait()
    task.cancel()  # what a server does when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    series = host.request_metrics.series[("/wait", "GET", "4xx")]
    assert series.count == 1 and series.errors == 0
    assert host.request_metrics.in_flight == 0


def test_a_request_answered_before_routing_is_filed_under_its_route_rule() -> None:
    from dataclasses import dataclass
    from typing import Any

    from overdrive.context import RequestContext
    from overdrive.plugins.profiler.requests import UNMATCHED, route_template
    from overdrive.routes import RouteTable, parse_rules

    @dataclass
    class S:
        ttl: int | None = None

    table = RouteTable(
        parse_rules([{"path": "/thumbnails/{video_id}", "cache": {"ttl": 5}}], {"cache"}),
        {"cache": S()},
    )
    hit: dict[str, Any] = {"type": "http", "path": "/thumbnails/7"}
    hit["overdrive.ctx"] = RequestContext(hit, "r", table.lookup("GET", "/thumbnails/7"))
    assert route_template(hit) == "/thumbnails/{video_id}"
    other: dict[str, Any] = {"type": "http", "path": "/x"}
    other["overdrive.ctx"] = RequestContext(other, "r", table.lookup("GET", "/x"))
    assert route_template(other) == UNMATCHED
