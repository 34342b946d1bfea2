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

from .families import PROFILER_FAMILIES, declared_samples, host_samples
from .mapping import _SKIP_SECTIONS as _SKIP
from .mapping import DEFAULT_BUCKETS, Hist, Sample, flatten_stats

__all__ = ["PrometheusExporter", "make_asgi_app"]

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
    ) -> None:
        self.host = host
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
        """Fetch every plugin's figures (`host.get_system_stats()`)."""
        self._stats = await self.host.get_system_stats()

    def samples(self) -> tuple[list[Sample], list[Hist]]:
        """The current figures as samples and histograms, through the declared families."""
        ns = self.namespace
        samples = declared_samples(self.host, self._stats, ns)
        samples += host_samples(self._stats, ns)
        if self.undeclared:
            declared = {"host", "system", "profiler"} | {
                name
                for name, info in self.host.plugins.items()
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
        response = PlainResponse(200, body, content_type=content_type.encode("latin-1"))
        await response(scope, receive, send)

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
