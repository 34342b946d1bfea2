"""`PrometheusExporter`: the host's figures as metric families, one or many processes.

Single process: a custom collector (`collect`) reads the figures at scrape
time. Multiprocess: `flush` copies them into prometheus_client's file-backed
metrics (counters by their increase, histograms bucket by bucket, gauges with
a `multiprocess_mode`), and a scrape reads every worker's files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from overdrive.middleware.responses import PlainResponse

from .exposition import ScrapeCache, encode_text
from .families import PROFILER_FAMILIES, declared_samples, host_samples
from .mapping import _SKIP_SECTIONS as _SKIP
from .mapping import DEFAULT_BUCKETS, Hist, Sample, flatten_stats

__all__ = ["PrometheusExporter", "make_asgi_app"]

_READ_DIRECTLY = frozenset({"profiler"})
_NOT_ALLOWED = PlainResponse(405, b"Method Not Allowed\n", [(b"allow", b"GET, HEAD")])

logger = logging.getLogger("overdrive.prometheus")


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
        undeclared: bool = False,
        cache_seconds: float = 1.0,
        render_in_thread: bool = True,
    ) -> None:
        self.host = host
        # One rendered scrape per content type is served for `cache_seconds` (0: none).
        self.cache = ScrapeCache(cache_seconds)
        self.render_in_thread = render_in_thread
        # Figures of plugins that declare no families, under names guessed from their
        # stats keys (the mapping of overdrive <= 0.x): off unless asked for.
        self.undeclared = undeclared
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
        """Fetch every plugin's figures (`host.get_system_stats()`), but the profiler's
        table of percentiles: its series are read directly."""
        self._stats = await self.host.get_system_stats(exclude=_READ_DIRECTLY)

    def samples(self) -> tuple[list[Sample], list[Hist]]:
        """The current figures as samples and histograms, through the declared families."""
        ns = self.namespace
        samples = declared_samples(self.host, self._stats, ns)
        samples += host_samples(self._stats, ns)
        if self.undeclared:
            declared = {"host", "system", "profiler"} | {
                name
                for name, info in list(self.host.plugins.items())
                if getattr(info.obj, "metric_families", ())
            }
            samples += flatten_stats(self._stats, ns, skip=_SKIP | declared)
        hists: list[Hist] = []
        profiler = self.host.get_plugin("profiler")
        if profiler is not None:
            self._profiler_figures(profiler, samples, hists)
        return samples, hists

    def _profiler_figures(self, plugin: Any, samples: list[Sample], hists: list[Hist]) -> None:
        from overdrive.plugins.profiler.requests import PHASES

        ns = self.namespace
        m = plugin.metrics
        bounds = self.buckets
        (
            duration,
            requests,
            errors,
            timeouts,
            size,
            phase_seconds,
            in_flight,
            op_duration,
            op_errors,
        ) = PROFILER_FAMILIES

        def sample(family: Any, labels: dict[str, str], value: float) -> Sample:
            return Sample(
                f"{ns}_{family.name}",
                family.type,
                family.help,
                labels,
                value,
                family.multiprocess_mode,
                family.unit,
            )

        for series in list(m.series.values()):
            route, method, status = series.key
            labels = {"route": route, "method": method, "status": status}
            h = series.histogram
            hists.append(
                Hist(
                    f"{ns}_{duration.name}",
                    duration.help,
                    labels,
                    [*h.count_le(bounds), h.count],
                    h.sum,
                    h.count,
                )
            )
            samples.append(sample(requests, labels, float(series.count)))
            samples.append(sample(errors, labels, float(series.errors)))
            samples.append(sample(timeouts, labels, float(series.timeouts)))
            samples.append(sample(size, labels, float(series.bytes)))
            for phase, seconds in zip(PHASES, series.phases, strict=True):
                samples.append(sample(phase_seconds, {**labels, "phase": phase}, seconds))
        samples.append(sample(in_flight, {}, float(m.in_flight)))
        for name, (h, failed) in plugin.profiler.histograms().items():
            labels = {"operation": name}
            hists.append(
                Hist(
                    f"{ns}_{op_duration.name}",
                    op_duration.help,
                    labels,
                    [*h.count_le(bounds), h.count],
                    h.sum,
                    h.count,
                )
            )
            samples.append(sample(op_errors, labels, float(failed)))

    # -- single process: a custom collector ----------------------------------------

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import Metric

        families: dict[str, Any] = {}
        samples, hists = self.samples()
        for s in samples:
            fam = families.get(s.name)
            if fam is None:
                fam = families[s.name] = Metric(s.name, s.doc, s.kind, s.unit)
            suffix = "_total" if s.kind == "counter" else ""
            fam.add_sample(s.name + suffix, s.labels, s.value)
        for h in hists:
            fam = families.get(h.name)
            if fam is None:
                fam = families[h.name] = Metric(h.name, h.doc, "histogram", h.unit)
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
        """(body, content type) of a scrape: from the cache when one is fresh.

        A cache miss gathers the plugins' figures on the event loop (their
        `collect_stats` may be async), then builds and encodes the samples in a
        worker thread, so the loop keeps serving requests meanwhile; concurrent
        scrapes share that one render.
        """
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        openmetrics = content_type.startswith("application/openmetrics-text")
        return await self.cache.get(
            "openmetrics" if openmetrics else "text",
            lambda: self._render(encoder, content_type, openmetrics),
        )

    async def _render(
        self, encoder: Any, content_type: str, openmetrics: bool
    ) -> tuple[bytes, str]:
        from prometheus_client import CollectorRegistry

        if self.multiprocess:
            from prometheus_client import multiprocess

            await self.flush()
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return await self._off_loop(encoder, registry), content_type
        await self.refresh()
        if openmetrics:  # prometheus_client's encoder: exemplars, # UNIT, # EOF
            both = _Both(self.registry) if self.include_default_registry else self.registry
            return await self._off_loop(encoder, both), content_type
        return await self._off_loop(self._text), content_type

    def _text(self) -> bytes:
        """The text format: prometheus_client's global registry, then ours, written directly."""
        head = b""
        if self.include_default_registry:
            from prometheus_client import REGISTRY, generate_latest

            head = generate_latest(REGISTRY)
        samples, hists = self.samples()
        return head + encode_text(samples, hists, self.buckets).encode("utf-8")

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        if not self.render_in_thread:
            return fn(*args)
        import anyio

        return await anyio.to_thread.run_sync(fn, *args)

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        """An ASGI app answering a scrape (GET or HEAD; anything else 405)."""
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _NOT_ALLOWED(scope, receive, send)
            return
        accept = None
        for name, value in scope.get("headers") or ():
            if name == b"accept":
                accept = value.decode("latin-1")
        body, content_type = await self.render(accept)
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

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
