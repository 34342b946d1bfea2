"""The exporter's own metric families, and every plugin's declared ones as samples.

Plugins declare their families (`overdrive.metrics.MetricFamily`, the
``metric_families`` class attribute); the host's and the machine's figures and
the profiler's per-route histograms are declared here. `declared_samples`
turns ``get_system_stats()`` into samples through those declarations only: a
figure nobody declared is not exposed (the stats endpoint still shows it),
so no name is ever guessed from a stats key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from overdrive.metrics import MetricFamily as F

from .mapping import Sample

__all__ = ["HOST_FAMILIES", "PROFILER_FAMILIES", "SYSTEM_FAMILIES", "all_families"]

_MB = 2**20
_ROUTE = ("route", "method", "status")

# The host's section ("host"): per-plugin faults and sampled hook timings (filled here).
HOST_FAMILIES = (
    F("plugin_errors", "counter", "Hook calls that raised, per plugin", labels=("plugin",)),
    F("plugin_quarantined", "gauge", "1 while the plugin is quarantined", labels=("plugin",)),
    F("plugin_quarantines", "counter", "Times the plugin was quarantined", labels=("plugin",)),
    F(
        "plugin_stats_failed",
        "gauge",
        "1 when the plugin's collect_stats raised at this scrape",
        labels=("plugin",),
    ),
    F(
        "hook_calls",
        "counter",
        "Sampled hook calls per plugin and hook (every hook_timing_sample-th request)",
        labels=("plugin", "hook"),
    ),
    F(
        "hook_seconds",
        "counter",
        "Seconds spent in the sampled hook calls",
        unit="seconds",
        labels=("plugin", "hook"),
    ),
)

# The machine's figures ("system", psutil). CPU and memory percentages are left out:
# prometheus_client's process collector and node_exporter give the raw figures.
SYSTEM_FAMILIES = (
    F(
        "system_memory_available_bytes",
        "gauge",
        "Memory available on the machine",
        "memory_available_mb",
        unit="bytes",
        scale=_MB,
        multiprocess_mode="livemostrecent",
    ),
    F(
        "system_process_resident_memory_bytes",
        "gauge",
        "Resident memory of this worker",
        "process_rss_mb",
        unit="bytes",
        scale=_MB,
    ),
    F(
        "system_disk_read_bytes",
        "counter",
        "Bytes the machine read from disk",
        "disk_read_mb",
        unit="bytes",
        scale=_MB,
    ),
    F(
        "system_disk_written_bytes",
        "counter",
        "Bytes the machine wrote to disk",
        "disk_write_mb",
        unit="bytes",
        scale=_MB,
    ),
)

# The profiler's per-route series (filled by the exporter from its histograms).
PROFILER_FAMILIES = (
    F(
        "http_request_duration_seconds",
        "histogram",
        "Request latency, from the middleware's first line to its last",
        unit="seconds",
        labels=_ROUTE,
    ),
    F("http_requests", "counter", "Requests answered", labels=_ROUTE),
    F("http_request_errors", "counter", "Requests that raised or answered 5xx", labels=_ROUTE),
    F("http_request_timeouts", "counter", "Requests cut by a plugin's timeout", labels=_ROUTE),
    F(
        "http_response_size_bytes",
        "counter",
        "Response body bytes sent",
        unit="bytes",
        labels=_ROUTE,
    ),
    F(
        "http_request_phase_seconds",
        "counter",
        "Seconds spent per request phase (queue_wait apart from running)",
        unit="seconds",
        labels=(*_ROUTE, "phase"),
    ),
    F(
        "http_requests_in_flight",
        "gauge",
        "Requests being served now",
        multiprocess_mode="livesum",
    ),
    F(
        "operation_duration_seconds",
        "histogram",
        "Duration of profiled operations (PerformanceProfiler, host.run)",
        unit="seconds",
        labels=("operation",),
    ),
    F("operation_errors", "counter", "Profiled operations that failed", labels=("operation",)),
)


def all_families(host: Any = None) -> Iterator[tuple[str, F]]:
    """(owner, family) for the exporter's own families and every plugin's declared ones.

    With `host`: its enabled plugins; without: every built-in plugin (for the docs).
    """
    for family in HOST_FAMILIES:
        yield "host", family
    for family in SYSTEM_FAMILIES:
        yield "system", family
    for family in PROFILER_FAMILIES:
        yield "profiler", family
    if host is not None:
        plugins = [(name, info.obj) for name, info in host.plugins.items()]
    else:
        from overdrive.contrib.reference import builtin_plugins

        plugins = list(builtin_plugins().items())
    for name, plugin in plugins:
        for family in getattr(plugin, "metric_families", ()) or ():
            yield name, family


def declared_samples(host: Any, stats: Mapping[str, Any], namespace: str) -> list[Sample]:
    """Every declared family's samples in `stats` (``get_system_stats()``)."""
    out: list[Sample] = []
    sections: list[tuple[Any, tuple[F, ...]]] = [(stats.get("system"), SYSTEM_FAMILIES)]
    failed = []
    for name, info in list(host.plugins.items()):
        families = getattr(info.obj, "metric_families", ()) or ()
        figures = stats.get(name)
        if isinstance(figures, Mapping) and set(figures) == {"error"}:
            failed.append(name)
            continue
        if families and figures is not None:
            sections.append((figures, families))
    for figures, families in sections:
        for family in families:
            full = f"{namespace}_{family.name}"
            for sample in family.samples(figures):
                out.append(
                    Sample(
                        full,
                        family.type,
                        family.help,
                        dict(zip(family.labels, sample.labels, strict=True)),
                        sample.value,
                        family.multiprocess_mode,
                        family.unit,
                    )
                )
    for name in failed:
        out.append(
            Sample(
                f"{namespace}_plugin_stats_failed",
                "gauge",
                HOST_FAMILIES[3].help,
                {"plugin": name},
                1.0,
            )
        )
    return out


def host_samples(stats: Mapping[str, Any], namespace: str) -> list[Sample]:
    """Per-plugin faults and hook timings from the ``host`` section."""
    out: list[Sample] = []
    errors, quarantined, quarantines, _, calls, seconds = HOST_FAMILIES
    for plugin, info in (stats.get("host", {}).get("plugins", {}) or {}).items():
        labels = {"plugin": plugin}
        for family, value in (
            (errors, info.get("errors", 0)),
            (quarantined, bool(info.get("quarantined"))),
            (quarantines, info.get("quarantines", 0)),
        ):
            out.append(_sample(namespace, family, labels, float(value)))
        for hook, t in (info.get("hooks") or {}).items():
            hl = {"plugin": plugin, "hook": hook}
            out.append(_sample(namespace, calls, hl, float(t.get("count", 0))))
            out.append(_sample(namespace, seconds, hl, float(t.get("total_ms", 0)) / 1000))
    return out


def _sample(namespace: str, family: F, labels: dict[str, str], value: float) -> Sample:
    return Sample(
        f"{namespace}_{family.name}",
        family.type,
        family.help,
        labels,
        value,
        family.multiprocess_mode,
        family.unit,
    )


def render_table(namespace: str = "overdrive") -> str:
    """The metric families table of docs/observability.md (Markdown), from the declarations.

    Regenerate it with ``python -c "from overdrive.contrib.prometheus.families import
    render_table; print(render_table(), end='')"`` (a test holds the page to it).
    """
    rows = [
        "| metric | type | unit | labels | from | help |",
        "|---|---|---|---|---|---|",
    ]
    for owner, f in all_families():
        name = f"{namespace}_{f.name}" + ("_total" if f.type == "counter" else "")
        labels = ", ".join(f.labels)
        rows.append(f"| `{name}` | {f.type} | {f.unit or ''} | {labels} | {owner} | {f.help} |")
    return "\n".join(rows) + "\n"
