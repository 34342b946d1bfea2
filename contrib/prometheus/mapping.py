"""`Sample` and `Hist` (what the collector and the multiprocess flusher consume), and
the old generic mapping of stats keys to names.

Declared families (`overdrive.metrics`, `families.py`) are what the exporter
exposes. `flatten_stats` guesses names from a plugin's stats keys; it is used
only for plugins that declare no families, and only with ``undeclared = true``,
since a guessed name cannot be held to the conventions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_BUCKETS", "Hist", "Sample", "flatten_stats"]

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
        "submitted",
        "completed",
        "failed",
        "cancelled",
        "dropped",
        "processed",
        "retried",
        "scale_ups",
        "scale_downs",
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
_SECTION_LABEL = {"breaker": "breaker", "pools": "pool", "gpu": "device", "models": "model"}
_MAX_LIST = 64  # a list of numbers longer than this is a history, not a figure per device
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
    unit: str = ""  # OpenMetrics' # UNIT (the name already ends in it)


@dataclass
class Hist:
    name: str
    doc: str
    labels: dict[str, str]
    cumulative: list[int]  # per bound, then +Inf last
    sum: float
    count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    unit: str = "seconds"


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
        prefix = _metric_name(namespace, section)
        children = list(figures.values())
        if (
            children
            and all(isinstance(c, Mapping) for c in children)
            and not any(k in _LABEL_FOR for k in figures)  # {"devices": {...}}: a collection
        ):
            # {name: {figures}} (the breaker plugin: one table per breaker): one label.
            label = _SECTION_LABEL.get(section, "name")
            for name, child in figures.items():
                _walk(out, prefix, child, {label: str(name)}, mode, section)
            continue
        _walk(out, prefix, figures, {}, mode, section)
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
            if (
                value
                and len(value) <= _MAX_LIST
                and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in value)
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
