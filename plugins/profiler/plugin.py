"""The `profiler` plugin: per-route latency, throughput, errors and phase times.

Hot path: `before_request` counts the request in flight, `on_response_start`
notes the response size from Content-Length (and adds `Server-Timing` when
asked), `after_request` records into the request's series. No allocation per
request beyond the series key tuple; no locks (one event loop per process).
Operations run through ``host.run(name, ...)`` are profiled under their name.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter, time
from typing import Any, ClassVar

from overdrive import ConfigError, Plugin, hookimpl

from .profiler import PerformanceProfiler
from .requests import PHASES, RequestMetrics, request_error, route_template

__all__ = ["ProfilerPlugin"]

_CONTENT_LENGTH = b"content-length"
_SERVER_TIMING = b"server-timing"


class _ByteCounter:
    """Counts a streamed body's bytes when there is no Content-Length."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, body: bytes, more_body: bool) -> None:
        self.n += len(body)


class ProfilerPlugin(Plugin):
    """Per-route request figures and the seed's `PerformanceProfiler` (``host.profiler``)."""

    name: ClassVar[str] = "profiler"
    provides: ClassVar[dict[str, str]] = {"profiler": "profiler", "request_metrics": "metrics"}

    @dataclass
    class Settings:
        max_series: int = 1000  # (route, method, status class) series kept; then "<other>"
        window_seconds: int = 60  # throughput and error rate are over this rolling window
        recent_seconds: float = 30.0  # "recent" percentiles: since a snapshot this old
        server_timing: bool = False  # add a Server-Timing header to responses
        profile_operations: bool = True  # profile host.run(name, ...) under its name
        track_memory: bool = True  # RSS delta in PerformanceProfiler reports
        status_codes: str = "class"  # series (and the status label) by "class" (2xx) or "exact"

        def __post_init__(self) -> None:
            if self.max_series < 1:
                raise ConfigError(f"profiler.max_series: expected >= 1, got {self.max_series}")
            if self.window_seconds < 1:
                raise ConfigError(
                    f"profiler.window_seconds: expected >= 1, got {self.window_seconds}"
                )
            if self.status_codes not in ("class", "exact"):
                raise ConfigError(
                    f"profiler.status_codes: expected 'class' or 'exact', got {self.status_codes!r}"
                )
            if self.recent_seconds <= 0:
                raise ConfigError(
                    f"profiler.recent_seconds: expected > 0, got {self.recent_seconds}"
                )

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.profiler = PerformanceProfiler()
        self.metrics = RequestMetrics()
        self.started = time()
        self._server_timing = False
        self._operations = True

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s = self.settings or self.Settings()
        self.settings = s
        self.profiler = PerformanceProfiler(track_memory=s.track_memory)
        self.metrics = RequestMetrics(
            s.max_series, s.window_seconds, s.recent_seconds, s.status_codes == "exact"
        )
        self._server_timing = s.server_timing
        self._operations = s.profile_operations

    # -- requests ----------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def before_request(self, ctx: Any) -> None:
        self.metrics.live.add(id(ctx))

    @hookimpl(trylast=True)
    def on_response_start(self, ctx: Any, status: int, headers: list) -> None:
        for name, _ in headers:
            if name.lower() == _CONTENT_LENGTH:
                break
        else:  # a streamed body: count it as it goes
            counter = _ByteCounter()
            ctx.state["profiler.bytes"] = counter
            ctx.observe_body(counter)
        if self._server_timing:
            now = perf_counter()
            parts = []
            if ctx.t_admitted:
                parts.append(f"admission;dur={(ctx.t_admitted - ctx.t_start) * 1000:.3f}")
            if ctx.queue_wait:
                parts.append(f"queue;dur={ctx.queue_wait * 1000:.3f}")
            if ctx.t_app:
                parts.append(f"app;dur={(now - ctx.t_app) * 1000:.3f}")
            parts.append(f"total;dur={(now - ctx.t_start) * 1000:.3f}")
            headers.append((_SERVER_TIMING, ", ".join(parts).encode("latin-1")))

    @hookimpl(trylast=True)
    def after_request(self, ctx: Any) -> None:
        m = self.metrics
        # A set, not a counter: a plugin ordered before us may short-circuit before our
        # before_request ran, and its request must not be taken off the count.
        m.live.discard(id(ctx))
        if ctx.internal:
            return  # a prefetch the framework made: not client traffic
        status = ctx.status
        error = ctx.error
        if error is None and (status is None or status >= 500):
            error = request_error(ctx)
        if status is None:  # no response started: the app raised (500) or the client left
            status = 500 if error is not None else 499  # 499: nginx's "client closed request"
        series = m.get(route_template(ctx.scope), ctx.method, status)
        t_start = ctx.t_start
        t_end = ctx.t_end or perf_counter()
        total = t_end - t_start
        series.histogram.record(total)
        series.count += 1
        failed = error is not None or status >= 500
        if failed:
            series.errors += 1
            if isinstance(error, TimeoutError) and ctx.timeout is not None:
                series.timeouts += 1
        state = ctx._state
        counter = state.get("profiler.bytes") if state is not None else None
        if counter is not None:
            series.bytes += counter.n
        else:
            for name, value in ctx.response_headers or ():
                if name.lower() == _CONTENT_LENGTH:
                    if value.isdigit():
                        series.bytes += int(value)
                    break
        phases = series.phases
        wait = ctx.queue_wait
        if ctx.t_admitted:
            phases[0] += ctx.t_admitted - t_start
        t_app = ctx.t_app
        if t_app:
            phases[1] += t_app - t_start
            if ctx.t_first_byte:
                phases[4] += ctx.t_first_byte - t_app
            phases[5] += t_end - t_app
        if wait:
            phases[2] += wait
        phases[3] += total - wait
        m.window.add(t_end, failed)

    # -- operations ---------------------------------------------------------------

    @hookimpl
    def after_operation(self, op: Any) -> None:
        if self._operations:
            self.profiler.record(op.name, op.duration, error=op.error is not None)

    # -- figures ------------------------------------------------------------------

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Overall and per-route figures (seconds), the shape of stats["profiler"]."""
        m = self.metrics
        now = perf_counter()
        rps, error_rate = m.window.rates(now)
        total = m.total()
        recent = m.recent(now, total)
        p50, p95, p99 = total.percentiles((50, 95, 99))
        r50, r95, r99, rmax = recent.percentiles((50, 95, 99, 100))
        routes = []
        errors = timeouts = nbytes = 0
        for series in list(m.series.values()):
            h = series.histogram
            s50, s95, s99 = h.percentiles((50, 95, 99))
            errors += series.errors
            timeouts += series.timeouts
            nbytes += series.bytes
            route, method, status = series.key
            routes.append(
                {
                    "route": route,
                    "method": method,
                    "status": status,
                    "count": series.count,
                    "errors": series.errors,
                    "timeouts": series.timeouts,
                    "bytes": series.bytes,
                    "avg": h.mean,
                    "p50": s50,
                    "p95": s95,
                    "p99": s99,
                    "max": h.max,
                    "phases": dict(zip(PHASES, series.phases, strict=True)),
                }
            )
        return {
            "requests": total.count,
            "in_flight": m.in_flight,
            "errors": errors,
            "timeouts": timeouts,
            "response_bytes": nbytes,
            "throughput_rps": rps,
            "error_rate": error_rate,
            "window_seconds": m.window.seconds,
            "latency": {
                "avg": total.mean,
                "p50": p50,
                "p95": p95,
                "p99": p99,
                "max": total.max,
            },
            "recent_latency": {
                "count": recent.count,
                "p50": r50,
                "p95": r95,
                "p99": r99,
                "max": rmax,
            },
            "series": len(m.series),
            "routes": routes,
            "profiles": self.profiler.get_all_reports(),
        }
