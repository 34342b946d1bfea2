"""The text exposition of our own families, written directly, and the scrape cache.

prometheus_client's encoders build a `Metric` object per family and a
`Sample` tuple per line, then sort and escape every label of every line; at
10,000 series that is most of a scrape's cost. Our families are known in
advance, so `encode_text` writes the Prometheus text format (0.0.4) straight
from the exporter's samples: a series' label string is escaped once and
shared by its bucket, count and sum lines, bucket bounds are formatted once.
The output is what promtool checks (tests/contrib/test_metric_families.py),
and it parses with prometheus_client's own parser. OpenMetrics (asked for
with ``Accept: application/openmetrics-text``) still goes through
prometheus_client's encoder, which also writes exemplars.

`ScrapeCache` keeps one rendered body per content type for `seconds`, and
makes concurrent scrapes share one render (single flight), so N scrapers in
the same second cost one render.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .mapping import Hist, Sample

__all__ = ["ScrapeCache", "encode_text"]


def _num(value: float) -> str:
    """A sample value as the text format reads it (``repr`` round-trips a float)."""
    if value != value:
        return "NaN"
    if value in (_INF, -_INF):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


_INF = float("inf")


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def encode_text(
    samples: Iterable[Sample], hists: Iterable[Hist], buckets: tuple[float, ...]
) -> str:
    """Samples and histograms in the Prometheus text format, families in first-seen order."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for s in samples:
        name = s.name + "_total" if s.kind == "counter" else s.name
        family = families.get(name)
        if family is None:
            family = families[name] = (s.doc, s.kind, [])
        family[2].append(f"{name}{_labels(s.labels)} {_num(s.value)}\n")
    bounds = [repr(float(b)) for b in buckets]
    for h in hists:
        family = families.get(h.name)
        if family is None:
            family = families[h.name] = (h.doc, "histogram", [])
        lines = family[2]
        inner = _labels(h.labels)[1:-1]
        sep = "," if inner else ""
        bucket = f"{h.name}_bucket{{{inner}{sep}le="
        for bound, n in zip(bounds, h.cumulative, strict=False):
            lines.append(f'{bucket}"{bound}"}} {n}\n')  # counts are ints: no float formatting
        lines.append(f'{bucket}"+Inf"}} {h.count}\n')
        tail = f"{{{inner}}}" if inner else ""
        lines.append(f"{h.name}_count{tail} {h.count}\n")
        lines.append(f"{h.name}_sum{tail} {_num(h.sum)}\n")
    out: list[str] = []
    for name, (doc, kind, lines) in families.items():
        out.append(f"# HELP {name} {_help(doc)}\n# TYPE {name} {kind}\n")
        out.extend(lines)
    return "".join(out)


class ScrapeCache:
    """One body per content type for `seconds`; concurrent misses share one render."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._bodies: dict[str, tuple[float, bytes, str]] = {}
        self._locks: dict[str, Any] = {}
        self.renders = 0  # how many times a body was rendered (a figure for tests and docs)

    def clear(self) -> None:
        """Forget the rendered bodies: the next scrape renders."""
        self._bodies.clear()

    async def get(
        self, key: str, render: Callable[[], Awaitable[tuple[bytes, str]]]
    ) -> tuple[bytes, str]:
        import anyio

        entry = self._bodies.get(key)
        if entry is not None and time.monotonic() - entry[0] < self.seconds:
            return entry[1], entry[2]
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = anyio.Lock()
        async with lock:
            entry = self._bodies.get(key)  # rendered while this scrape waited
            if entry is not None and time.monotonic() - entry[0] < self.seconds:
                return entry[1], entry[2]
            body, content_type = await render()
            self.renders += 1
            if self.seconds > 0:
                self._bodies[key] = (time.monotonic(), body, content_type)
            return body, content_type
