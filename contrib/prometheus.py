"""Prometheus metrics for every plugin's figures, on `prometheus_client`.

    from overdrive.contrib.prometheus import PrometheusPlugin, make_asgi_app
    host = Overdrive({"plugins": ["profiler", "prometheus"]})   # serves /metrics itself
    app.mount("/metrics", make_asgi_app(host))                   # or mount it yourself

Nothing is done per request: the `profiler` plugin already keeps per-route
histograms and counters, and other plugins report through `collect_stats`;
this module turns those into metric families when Prometheus scrapes.

Single process: a custom collector reads the figures at scrape time; the
scrape also carries prometheus_client's global registry (the application's
own metrics, process figures) unless ``include_default_registry = false``.
Multiprocess (``PROMETHEUS_MULTIPROC_DIR`` set, several workers): custom
collectors do not survive it, so each worker copies its figures into
prometheus_client's file-backed metrics every `flush_seconds` (counters by
their increase, gauges with a `multiprocess_mode`: ``livesum`` for figures
that add up across workers, ``livemostrecent`` for machine-wide ones such as
GPU memory and system figures, ``liveall`` (a ``pid`` label) for the other
plugins' gauges, whose meaning across workers we cannot know), and the
scrape reads all workers' files through `MultiProcessCollector`.

Names follow Prometheus conventions: base units (seconds, bytes, ratios),
``_total`` for counters. Keys in a plugin's stats are mapped generically:
``*_mb`` -> ``*_bytes`` (x 2**20), ``*_ms`` -> ``*_seconds``, ``*_percent``
-> ``*_ratio``, a ``state`` string -> ``*_state{state="open"} 1``, nested
tables of tables (``breakers``, ``devices``, ``pools``) -> one label.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from overdrive import Plugin, hookimpl
from overdrive.plugins.profiler.requests import RouteName

__all__ = [
    "DEFAULT_BUCKETS",
    "PrometheusExporter",
    "PrometheusPlugin",
    "flatten_stats",
    "make_asgi_app",
]

logger = logging.getLogger("overdrive.prometheus")

DEFAULT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
_COUNTER_KEYS = frozenset(
    {
        "hits",
        "misses",
        "errors",
        "failures",
        "successes",
        "requests",
        "evictions",
        "rejections",
        "rejected",
        "timeouts",
        "trips",
        "retries",
        "calls",
        "stores",
        "quarantines",
        "admitted",
        "releases",
    }
)
_LABEL_FOR = {
    "breakers": "breaker",
    "devices": "device",
    "gpus": "device",
    "pools": "pool",
    "models": "model",
    "queues": "queue",
    "caches": "cache",
    "workers": "worker",
}
_IDENTITY = frozenset({"index", "device", "id"})
# Cumulative figures that do not look like counters by their key alone.
_COUNTER_NAMES = frozenset({"disk_read_bytes", "disk_write_bytes"})
_MACHINE_WIDE = frozenset({"system", "gpu"})
_SKIP_SECTIONS = frozenset({"profiler", "host", "timestamp"})
_BAD = re.compile(r"[^a-zA-Z0-9_]")
_MB = float(2**20)


@dataclass
class Sample:
    """One gauge or counter value: what both the collector and the flusher consume."""

    name: str
    kind: str  # "gauge" or "counter" (name without _total)
    doc: str
    labels: dict[str, str]
    value: float
    mode: str = "liveall"  # multiprocess_mode for gauges


@dataclass
class Hist:
    name: str
    doc: str
    labels: dict[str, str]
    cumulative: list[int]  # per bound, then +Inf last
    sum: float
    count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _metric_name(*parts: str) -> str:
    name = "_".join(p for p in parts if p)
    name = _BAD.sub("_", name).strip("_").lower()
    return re.sub("_+", "_", name)


def _leaf(prefix: str, key: str, value: Any) -> tuple[str, float, str] | None:
    """(metric name, value in base units, kind) for one numeric leaf, or None."""
    if isinstance(value, bool):
        return _metric_name(prefix, key), float(value), "gauge"
    if not isinstance(value, (int, float)) or value != value:  # NaN
        return None
    v = float(value)
    if key.endswith("_mb"):
        key, v = key[:-3] + "_bytes", v * _MB
    elif key.endswith("_ms"):
        key, v = key[:-3] + "_seconds", v / 1000
    elif key.endswith("_s"):
        key = key[:-2] + "_seconds"
    elif key.endswith("_percent"):
        key, v = key[:-8] + "_ratio", v / 100
    elif key == "percent":
        key, v = "ratio", v / 100
    if key.endswith("_total"):
        return _metric_name(prefix, key[:-6]), v, "counter"
    if key in _COUNTER_KEYS or key in _COUNTER_NAMES or key.rsplit("_", 1)[-1] in _COUNTER_KEYS:
        return _metric_name(prefix, key), v, "counter"
    return _metric_name(prefix, key), v, "gauge"


def flatten_stats(
    stats: Mapping[str, Any], namespace: str = "overdrive", skip: frozenset[str] = _SKIP_SECTIONS
) -> list[Sample]:
    """Every plugin section of `get_system_stats()` as samples (see the module doc)."""
    out: list[Sample] = []
    for section, figures in stats.items():
        if section in skip or not isinstance(figures, Mapping):
            continue
        mode = "livemostrecent" if section in _MACHINE_WIDE else "liveall"
        if set(figures) == {"error"}:
            out.append(
                Sample(
                    _metric_name(namespace, "plugin_stats_failed"),
                    "gauge",
                    "1 when a plugin's collect_stats raised at the last scrape",
                    {"plugin": section},
                    1.0,
                    "liveall",
                )
            )
            continue
        _walk(out, _metric_name(namespace, section), figures, {}, mode, section)
    return out


def _child_prefix(prefix: str, key: str, label: str) -> str:
    """``overdrive_gpu`` + ``devices`` -> ``overdrive_gpu_device``; ``overdrive_breaker`` +
    ``breakers`` -> ``overdrive_breaker`` (the label already says which breaker)."""
    singular = _LABEL_FOR.get(key, key)
    if prefix.endswith("_" + singular) or (label == singular and prefix.endswith(singular)):
        return prefix
    return _metric_name(prefix, singular)


def _walk(
    out: list[Sample],
    prefix: str,
    figures: Mapping[str, Any],
    labels: dict[str, str],
    mode: str,
    section: str,
) -> None:
    for key, value in figures.items():
        key = str(key)
        if isinstance(value, Mapping) and key in _COUNTER_KEYS:
            # {"rejected": {"timeout": 3, ...}}: counters by reason.
            for reason, n in value.items():
                leaf = _leaf(prefix, key, n)
                if leaf is not None:
                    out.append(
                        Sample(
                            leaf[0],
                            "counter",
                            f"{section}: {key}",
                            {**labels, "reason": str(reason)},
                            leaf[1],
                            mode,
                        )
                    )
            continue
        if isinstance(value, Mapping):
            children = list(value.values())
            if children and all(isinstance(c, Mapping) for c in children):
                label = _LABEL_FOR.get(key, "name")
                child_prefix = _child_prefix(prefix, key, label)
                for child_name, child in value.items():
                    _walk(
                        out,
                        child_prefix,
                        child,
                        {**labels, label: str(child_name)},
                        mode,
                        section,
                    )
            else:
                _walk(out, _metric_name(prefix, key), value, labels, mode, section)
        elif isinstance(value, list):
            if value and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in value
            ):
                # A figure per device (or per slot): one label, "device" in the gpu section.
                label = "device" if section == "gpu" else "index"
                for i, item in enumerate(value):
                    leaf = _leaf(prefix, key, item)
                    if leaf is not None:
                        name, v, kind = leaf
                        out.append(
                            Sample(
                                name, kind, f"{section}: {key}", {**labels, label: str(i)}, v, mode
                            )
                        )
            elif value and all(isinstance(c, Mapping) for c in value):
                label = _LABEL_FOR.get(key, "index")
                child_prefix = _child_prefix(prefix, key, label)
                for i, child in enumerate(value):
                    ident = child.get("index", child.get("device", child.get("name", i)))
                    _walk(
                        out,
                        child_prefix,
                        child,
                        {**labels, label: str(ident)},
                        mode,
                        section,
                    )
        elif isinstance(value, str):
            if key == "state":
                out.append(
                    Sample(
                        _metric_name(prefix, "state"),
                        "gauge",
                        f"{section}: current state (1 for the state it is in)",
                        {**labels, "state": value},
                        1.0,
                        "liveall",
                    )
                )
        elif key in _IDENTITY and labels:
            continue  # the item's own id, already a label
        else:
            leaf = _leaf(prefix, key, value)
            if leaf is not None:
                name, v, kind = leaf
                out.append(Sample(name, kind, f"{section}: {key}", dict(labels), v, mode))


class PrometheusExporter:
    """Turns the host's figures into Prometheus metrics; see the module doc."""

    def __init__(
        self,
        host: Any,
        *,
        namespace: str = "overdrive",
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
        multiprocess: bool | None = None,
        registry: Any = None,
        include_default_registry: bool = True,
    ) -> None:
        self.host = host
        self.include_default_registry = include_default_registry
        self.namespace = namespace
        self.buckets = tuple(sorted(buckets))
        if multiprocess is None:
            multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.multiprocess = multiprocess
        self._stats: dict[str, Any] = {}
        self._mp_metrics: dict[tuple[str, str], Any] = {}
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._warned: set[str] = set()
        from prometheus_client import CollectorRegistry

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        if not multiprocess:
            self.registry.register(self)

    # -- gathering ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch every plugin's figures (`host.get_system_stats()`)."""
        self._stats = await self.host.get_system_stats()

    def samples(self) -> tuple[list[Sample], list[Hist]]:
        """The current figures as samples and histograms."""
        ns = self.namespace
        samples = flatten_stats(self._stats, ns)
        hists: list[Hist] = []
        host_stats = self._stats.get("host", {}).get("plugins", {})
        for plugin, info in host_stats.items():
            labels = {"plugin": plugin}
            samples.append(
                Sample(
                    f"{ns}_plugin_errors",
                    "counter",
                    "Hook calls that raised, per plugin",
                    labels,
                    float(info.get("errors", 0)),
                )
            )
            samples.append(
                Sample(
                    f"{ns}_plugin_quarantined",
                    "gauge",
                    "1 while the plugin is quarantined after repeated errors",
                    labels,
                    float(bool(info.get("quarantined"))),
                )
            )
            for hook, t in (info.get("hooks") or {}).items():
                hl = {"plugin": plugin, "hook": hook}
                samples.append(
                    Sample(
                        f"{ns}_hook_calls",
                        "counter",
                        "Hook calls per plugin and hook",
                        hl,
                        float(t.get("count", 0)),
                    )
                )
                samples.append(
                    Sample(
                        f"{ns}_hook_seconds",
                        "counter",
                        "Seconds spent in each plugin's hook",
                        hl,
                        float(t.get("total_ms", 0)) / 1000,
                    )
                )
        profiler = self.host.get_plugin("profiler")
        if profiler is not None:
            self._profiler_figures(profiler, samples, hists)
        return samples, hists

    def _profiler_figures(self, plugin: Any, samples: list[Sample], hists: list[Hist]) -> None:
        from overdrive.plugins.profiler.requests import PHASES

        ns = self.namespace
        m = plugin.metrics
        bounds = self.buckets
        for series in list(m.series.values()):
            route, method, status = series.key
            labels = {"route": route, "method": method, "status": status}
            h = series.histogram
            hists.append(
                Hist(
                    f"{ns}_http_request_duration_seconds",
                    "Request latency, from the middleware's first line to its last",
                    labels,
                    [*h.count_le(bounds), h.count],
                    h.sum,
                    h.count,
                )
            )
            for name, doc, value in (
                ("http_requests", "Requests answered", series.count),
                ("http_request_errors", "Requests that raised or answered 5xx", series.errors),
                ("http_request_timeouts", "Requests cut by a plugin's timeout", series.timeouts),
                ("http_response_size_bytes", "Response body bytes sent", series.bytes),
            ):
                samples.append(Sample(f"{ns}_{name}", "counter", doc, labels, float(value)))
            for phase, seconds in zip(PHASES, series.phases, strict=True):
                samples.append(
                    Sample(
                        f"{ns}_http_request_phase_seconds",
                        "counter",
                        "Seconds spent per request phase (queue_wait apart from running)",
                        {**labels, "phase": phase},
                        seconds,
                    )
                )
        samples.append(
            Sample(
                f"{ns}_http_requests_in_flight",
                "gauge",
                "Requests being served now",
                {},
                float(m.in_flight),
                "livesum",
            )
        )
        from time import perf_counter

        rps, error_rate = m.window.rates(perf_counter())
        samples.append(
            Sample(
                f"{ns}_http_throughput_requests_per_second",
                "gauge",
                f"Requests per second over the last {m.window.seconds} s",
                {},
                rps,
                "livesum",
            )
        )
        samples.append(
            Sample(
                f"{ns}_http_error_ratio",
                "gauge",
                f"Share of requests that failed over the last {m.window.seconds} s",
                {},
                error_rate,
                "liveall",
            )
        )
        for name, (h, errors) in plugin.profiler.histograms().items():
            labels = {"operation": name}
            hists.append(
                Hist(
                    f"{ns}_operation_duration_seconds",
                    "Duration of profiled operations (PerformanceProfiler, host.run)",
                    labels,
                    [*h.count_le(bounds), h.count],
                    h.sum,
                    h.count,
                )
            )
            samples.append(
                Sample(
                    f"{ns}_operation_errors",
                    "counter",
                    "Profiled operations that failed",
                    labels,
                    float(errors),
                )
            )

    # -- single process: a custom collector ----------------------------------------

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import Metric

        families: dict[str, Any] = {}
        samples, hists = self.samples()
        for s in samples:
            fam = families.get(s.name)
            if fam is None:
                fam = families[s.name] = Metric(s.name, s.doc, s.kind)
            suffix = "_total" if s.kind == "counter" else ""
            fam.add_sample(s.name + suffix, s.labels, s.value)
        for h in hists:
            fam = families.get(h.name)
            if fam is None:
                fam = families[h.name] = Metric(h.name, h.doc, "histogram")
            for bound, n in zip(self.buckets, h.cumulative, strict=False):
                fam.add_sample(h.name + "_bucket", {**h.labels, "le": repr(float(bound))}, n)
            fam.add_sample(h.name + "_bucket", {**h.labels, "le": "+Inf"}, h.count)
            fam.add_sample(h.name + "_count", h.labels, h.count)
            fam.add_sample(h.name + "_sum", h.labels, h.sum)
        yield from families.values()

    def describe(self) -> list[Any]:
        return []  # names depend on which plugins run; nothing to check up front

    # -- multiprocess: copy figures into file-backed metrics ---------------------------

    def _mp_metric(self, kind: str, name: str, doc: str, labelnames: tuple[str, ...], mode: str):
        key = (name, kind)
        metric = self._mp_metrics.get(key)
        if metric is None:
            import prometheus_client as pc

            # A private registry: the global one stays the application's own.
            from prometheus_client import CollectorRegistry

            reg = CollectorRegistry()
            if kind == "counter":
                metric = pc.Counter(name, doc, labelnames, registry=reg)
            elif kind == "histogram":
                metric = pc.Histogram(name, doc, labelnames, buckets=self.buckets, registry=reg)
            else:
                metric = pc.Gauge(
                    name,
                    doc,
                    labelnames,
                    registry=reg,
                    multiprocess_mode=mode,  # type: ignore[arg-type]
                )
            self._mp_metrics[key] = (metric, labelnames)
            return metric, labelnames
        return metric

    async def flush(self) -> None:
        """Refresh and copy this worker's figures into the multiprocess files."""
        await self.refresh()
        samples, hists = self.samples()
        for s in samples:
            names = tuple(sorted(s.labels))
            metric, labelnames = self._mp_metric(s.kind, s.name, s.doc, names, s.mode)
            if labelnames != names:
                if s.name not in self._warned:
                    self._warned.add(s.name)
                    logger.warning("metric %s: inconsistent labels, skipped", s.name)
                continue
            child = metric.labels(**s.labels) if names else metric
            if s.kind == "counter":
                key = (s.name, tuple(sorted(s.labels.items())))
                before = self._last.get(key, 0.0)
                delta = s.value - before if s.value >= before else s.value
                if delta:
                    child.inc(delta)
                self._last[key] = s.value
            else:
                child.set(s.value)
        for h in hists:
            names = tuple(sorted(h.labels))
            metric, labelnames = self._mp_metric("histogram", h.name, h.doc, names, "")
            child = metric.labels(**h.labels)
            key = (h.name, tuple(sorted(h.labels.items())))
            before_cum, before_sum = self._last.get(key, (None, 0.0))
            cum = h.cumulative
            if before_cum is None or cum[-1] < before_cum[-1]:
                before_cum, before_sum = [0] * len(cum), 0.0
            prev_now = prev_then = 0
            for i, n in enumerate(cum):
                per_now, per_then = n - prev_now, before_cum[i] - prev_then
                prev_now, prev_then = n, before_cum[i]
                if per_now > per_then:
                    child._buckets[i].inc(per_now - per_then)
            if h.sum > before_sum:
                child._sum.inc(h.sum - before_sum)
            self._last[key] = (list(cum), h.sum)

    # -- exposition --------------------------------------------------------------------

    async def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        if self.multiprocess:
            from prometheus_client import multiprocess

            await self.flush()
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return encoder(registry), content_type
        await self.refresh()
        if self.include_default_registry:
            return encoder(_Both(self.registry)), content_type
        return encoder(self.registry), content_type

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        """An ASGI app answering a scrape."""
        accept = None
        for name, value in scope.get("headers") or ():
            if name == b"accept":
                accept = value.decode("latin-1")
        body, content_type = await self.render(accept)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def mark_process_dead(self) -> None:
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


class _Both:
    """prometheus_client's global registry (the app's own metrics, process figures)
    followed by ours, as one registry for the encoders."""

    def __init__(self, ours: Any) -> None:
        self.ours = ours

    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY

        yield from REGISTRY.collect()
        yield from self.ours.collect()


def make_asgi_app(host: Any, **kwargs: Any) -> Any:
    """An ASGI app to mount at ``/metrics``; reuses the `prometheus` plugin's exporter."""
    plugin = host.get_plugin("prometheus")
    exporter = plugin.exporter if plugin is not None else PrometheusExporter(host, **kwargs)
    return exporter.asgi


class PrometheusPlugin(Plugin):
    """Serves the metrics at `path` and, in multiprocess mode, flushes them periodically."""

    name: ClassVar[str] = "prometheus"
    provides: ClassVar[dict[str, str]] = {"prometheus": "exporter"}

    @dataclass
    class Settings:
        path: str | None = "/metrics"  # None: mount make_asgi_app(host) yourself
        namespace: str = "overdrive"
        buckets: list[float] = field(default_factory=lambda: list(DEFAULT_BUCKETS))
        multiprocess: bool | None = None  # None: when PROMETHEUS_MULTIPROC_DIR is set
        flush_seconds: float = 5.0  # multiprocess: how often a worker copies its figures
        include_default_registry: bool = True  # also expose prometheus_client's global one

        def __post_init__(self) -> None:
            from overdrive import ConfigError

            if self.path is not None and not self.path.startswith("/"):
                raise ConfigError(f"prometheus.path: expected '/...', got {self.path!r}")
            if self.flush_seconds <= 0:
                raise ConfigError(
                    f"prometheus.flush_seconds: expected > 0, got {self.flush_seconds}"
                )
            if not self.buckets or any(b <= 0 for b in self.buckets):
                raise ConfigError(
                    f"prometheus.buckets: expected positive bounds, got {self.buckets}"
                )

    exporter: PrometheusExporter

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s = self.settings or self.Settings()
        self.settings = s
        self.exporter = PrometheusExporter(
            host,
            namespace=s.namespace,
            buckets=tuple(s.buckets),
            multiprocess=s.multiprocess,
            include_default_registry=s.include_default_registry,
        )
        self._path = s.path
        self._route = RouteName(s.path or "")
        self._task: asyncio.Task[None] | None = None

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        if self.exporter.multiprocess:
            self._task = asyncio.create_task(self._flusher())

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await self.exporter.flush()

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_seconds)
            try:
                await self.exporter.flush()
            except Exception:
                logger.exception("prometheus flush failed")

    @hookimpl(tryfirst=True)
    def before_request(self, ctx: Any) -> Any:
        if ctx.path == self._path:
            ctx.scope["route"] = self._route  # filed under its own path, not "<unmatched>"
            return self.exporter.asgi
        return None
