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

Every exposed family is declared (`overdrive.metrics.MetricFamily`: each
plugin's ``metric_families``, and the host's, the machine's and the
profiler's in `families.py`), and the declarations are held to Prometheus'
naming conventions by a test; promtool checks the reference service's scrape.
``undeclared = true`` also exposes plugins that declare nothing, under names
guessed from their stats keys (`flatten_stats`).
"""

from __future__ import annotations

from .exporter import PrometheusExporter, make_asgi_app
from .mapping import DEFAULT_BUCKETS, flatten_stats
from .plugin import PrometheusPlugin

__all__ = [
    "DEFAULT_BUCKETS",
    "PrometheusExporter",
    "PrometheusPlugin",
    "flatten_stats",
    "make_asgi_app",
]
