"""Per-route request figures: what the `profiler` plugin records for each request.

Series are keyed by (route template, method, status class). The template is
read from ``scope["route"].path`` after the app routed the request (Starlette
and FastAPI set it, as OpenTelemetry's instrumentations read it), so nothing
is matched twice and a raw path never becomes a label: unrouted requests fold
into `UNMATCHED`, and past `max_series` new keys fold into `OVERFLOW`.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import MutableMapping
from typing import Any

from .histogram import LogHistogram

__all__ = [
    "OVERFLOW",
    "PHASES",
    "UNMATCHED",
    "RequestMetrics",
    "RollingWindow",
    "RouteName",
    "Series",
    "request_error",
    "route_template",
]

UNMATCHED = "<unmatched>"
OVERFLOW = "<other>"
# As in ``ctx.timings``: admission (before_request), before_app (everything before the
# app: admission, cache lookup, GPU admission), time_to_first_byte and app (from the
# app's start); queue_wait (what plugins added to ctx.queue_wait) and running (the
# request's whole time minus queue_wait) kept apart.
PHASES = ("admission", "before_app", "queue_wait", "running", "time_to_first_byte", "app")
_STATUS_CLASS = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
_STATUS_CODES = tuple(str(code) for code in range(100, 600))  # no str() per request
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)


def route_template(scope: MutableMapping[str, Any]) -> str:
    """The app's route template for this request (``/videos/{id}``), or `UNMATCHED`.

    A request answered before the app routed it (a cache hit, a 429) has no
    ``scope["route"]``: it is filed under the last route rule that matched it
    (an endpoint's own template when the endpoint declared a policy), which is
    as bounded as the templates are.
    """
    route = scope.get("route")
    if route is None:
        ctx = scope.get("overdrive.ctx")
        rules = ctx.policy.rules if ctx is not None else ()
        return rules[-1].path if rules else UNMATCHED
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    app_root = scope.get("app_root_path")
    if app_root is not None:  # inside a Mount: prefix the mount's part of root_path
        root = scope.get("root_path", "")
        if len(root) > len(app_root):
            return _mount_template(root[len(app_root) :], scope.get("path_params")) + path
    return path


def _mount_template(mounted: str, params: Any) -> str:
    """The mount's part of the path with its path parameters put back as ``{name}``.

    ``root_path`` holds the mount's prefix as requested (``/t/acme``); a label
    must hold its template (``/t/{tenant}``), or every tenant becomes a series.
    Starlette merges the mount's parameters into ``path_params``; each value
    found as whole segments of the prefix is replaced by its name. Only for
    requests under a Mount with parameters.
    """
    if not params or not isinstance(params, dict):
        return mounted
    segments = mounted.split("/")
    for name, value in params.items():
        text = str(value)
        if not text:
            continue
        wanted = text.split("/")
        n = len(wanted)
        i = 0
        while i + n <= len(segments):
            if segments[i : i + n] == wanted:
                segments[i : i + n] = ["{" + str(name) + "}"]
            i += 1
    return "/".join(segments)


class RouteName:
    """Stands in for a routed app's ``scope["route"]``, so that the profiler and the
    access log file our own endpoints under their path, not under "<unmatched>"."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


def request_error(ctx: Any) -> BaseException | None:
    """The exception that ended the request, if any.

    ``ctx.error`` is set when the middleware watched the app (a timeout or an
    `on_failure` plugin is in play); on its lean path the app's exception just
    propagates through `after_request`, which runs in the middleware's
    ``finally``, so it is read from `sys.exc_info` there. Only consulted when
    the response did not start or was a 5xx.
    """
    error = ctx.error
    if error is None and (ctx.status is None or ctx.status >= 500):
        error = sys.exc_info()[1]
        if not isinstance(error, Exception):
            error = None
    return error


class Series:
    """Figures of one (route, method, status class)."""

    __slots__ = ("bytes", "count", "errors", "histogram", "key", "phases", "timeouts")

    def __init__(self, key: tuple[str, str, str]) -> None:
        self.key = key
        self.histogram = LogHistogram()
        self.count = 0
        self.errors = 0
        self.timeouts = 0
        self.bytes = 0
        # seconds summed per phase, in PHASES order
        self.phases = [0.0] * len(PHASES)


class RollingWindow:
    """Requests and errors per second over the last `seconds` (a ring of 1 s slots)."""

    __slots__ = ("_errors", "_requests", "_seconds", "_stamp", "seconds")

    def __init__(self, seconds: int = 60) -> None:
        self.seconds = seconds
        self._requests = [0] * seconds
        self._errors = [0] * seconds
        self._seconds = [0] * seconds  # which second each slot holds
        self._stamp = -1

    def add(self, now: float, error: bool) -> None:
        sec = int(now)
        slot = sec % self.seconds
        if self._seconds[slot] != sec:
            self._seconds[slot] = sec
            self._requests[slot] = 0
            self._errors[slot] = 0
        self._requests[slot] += 1
        if error:
            self._errors[slot] += 1

    def rates(self, now: float) -> tuple[float, float]:
        """(requests per second, error ratio) over the complete seconds of the window."""
        sec = int(now)
        lo = sec - self.seconds
        requests = errors = 0
        for i in range(self.seconds):
            s = self._seconds[i]
            if lo <= s < sec:  # the current second is still filling
                requests += self._requests[i]
                errors += self._errors[i]
        span = self.seconds
        return requests / span, (errors / requests if requests else 0.0)


class RequestMetrics:
    """All request series of one host, plus in-flight and a recent-latency window."""

    def __init__(
        self,
        max_series: int = 1000,
        window: int = 60,
        recent: float = 30.0,
        exact_status: bool = False,
    ) -> None:
        self.max_series = max_series
        # Series by exact status code (200, 404) instead of class (2xx): at most 500 codes,
        # and max_series bounds the whole.
        self.exact_status = exact_status
        self.series: dict[tuple[str, str, str], Series] = {}
        self.live: set[int] = set()  # id() of the requests being served
        self.window = RollingWindow(window)
        # "Recent" percentiles: the total now minus a snapshot of it taken at least
        # `recent` seconds ago (snapshots are taken when figures are read, never per request).
        self.recent_seconds = recent
        self._snapshots: deque[tuple[float, list[int], int, float]] = deque(maxlen=256)

    @property
    def in_flight(self) -> int:
        """Requests being served now."""
        return len(self.live)

    def get(self, route: str, method: str, status: int | None) -> Series:
        if method not in _METHODS:
            method = "OTHER"
        if status is not None and 100 <= status < 600 and self.exact_status:
            cls = _STATUS_CODES[status - 100]
        else:
            cls = _STATUS_CLASS[status // 100] if status is not None and 0 < status < 600 else "5xx"
        key = (route, method, cls)
        series = self.series.get(key)
        if series is None:
            if len(self.series) >= self.max_series:
                key = (OVERFLOW, method, cls)
                series = self.series.get(key)
            if series is None:
                series = self.series[key] = Series(key)
        return series

    def recent(self, now: float, total: LogHistogram) -> LogHistogram:
        """Latencies recorded since a snapshot `recent_seconds` (or a little more) ago.

        `total` is `self.total()` now. Before the first such snapshot: `total`.
        """
        snaps = self._snapshots
        baseline = None
        while snaps and now - snaps[0][0] >= self.recent_seconds:
            baseline = snaps.popleft()
        if baseline is not None:
            snaps.appendleft(baseline)  # keep it until a younger one is old enough
        if not snaps or now - snaps[-1][0] >= 1.0:
            snaps.append((now, list(total.counts), total.count, total.sum))
        if baseline is None:
            return total
        _, counts, count, seconds = baseline
        recent = LogHistogram()
        recent.counts = [a - b for a, b in zip(total.counts, counts, strict=True)]
        recent.count = total.count - count
        recent.sum = total.sum - seconds
        recent.min, recent.max = total.min, total.max  # bounds for clamping only
        return recent

    def total(self) -> LogHistogram:
        merged = LogHistogram()
        for series in list(self.series.values()):
            merged.merge(series.histogram)
        return merged
