"""Metric families a plugin declares: name, type, unit, help, labels, and where the value is.

A plugin lists its families in a ``metric_families`` class attribute; the Prometheus
exporter (``overdrive.contrib.prometheus``) reads each family's value out of
the plugin's `collect_stats` figures with `MetricFamily.samples`, and the
metric table in docs/observability.md is generated from the same declarations.
Nothing here imports prometheus_client: core stays free of exporters.

`check_family` holds the naming conventions (Prometheus' "Metric and label
naming" page and promtool's lint): base units as a name suffix, no ``_total``
in a counter's declared name (the exposition adds it), no precomputed rates or
ratios, timestamps as ``_timestamp_seconds``, no stutter, label names that are
not reserved. A family that breaks one fails the test suite, not a scrape.

The ``source`` path walks the plugin's figures, dot by dot:

- ``hits``: the key ``hits``;
- ``*``: every key of a mapping (or index of a list), its name bound to the
  next label in ``labels``; ``*~budget`` every key but ``budget``;
- ``(HIT|MISS|STALE)``: those keys, where present, bound to the next label
  (lowercased: label values are data, not shouting); ``(hits=hit|misses=miss)``
  names each key's label value;
- labels left over once the path's wildcards are bound are read from the
  mapping that holds the value (the pools' ``kind``).

A value is a number (times ``scale``), a boolean (0/1), or, with ``states``,
a string: one sample per state, 1 for the current one (a state set, exposed
as a gauge with a ``state`` label). ``None`` and anything else is skipped.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MetricFamily", "Sample", "check_family"]

TYPES = frozenset({"counter", "gauge", "histogram"})
UNITS = frozenset({"", "seconds", "bytes", "ratio", "connections", "requests", "entries"})
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
_ALTERNATION = re.compile(r"^\(([^()]+)\)$")
_RESERVED_LABELS = frozenset({"le", "quantile", "job", "instance"})
# A name with these parts is a rate or a ratio computed in the process: PromQL does that.
_DERIVED = ("_rate", "_per_second", "_rps", "_percent", "_avg", "_average", "_ema")
_UNIT_WORDS = {"_ms": "seconds", "_mb": "bytes", "_kb": "bytes", "_s": "seconds"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of a family: its label values (in the family's label order)."""

    labels: tuple[str, ...]
    value: float


@dataclass(frozen=True)
class MetricFamily:
    """One metric family: exposed as ``{namespace}_{name}`` (``_total`` added to counters)."""

    name: str
    type: str
    help: str
    source: str | None = None  # path in the plugin's figures; None: the exporter fills it
    unit: str = ""
    labels: tuple[str, ...] = ()
    scale: float = 1.0  # value multiplier into base units (2**20 for MiB, 1e-3 for ms)
    states: tuple[str, ...] = ()  # a state set: the source is a string, one of these
    multiprocess_mode: str = "liveall"  # gauges with several workers (prometheus_client)

    def samples(self, figures: Any) -> Iterator[Sample]:
        """The family's samples in a plugin's `collect_stats` figures (see the module doc)."""
        if self.source is None or not isinstance(figures, Mapping):
            return
        steps = tuple(self.source.split("."))
        n_bound = sum(1 for s in steps if s.partition("~")[0] == "*" or _ALTERNATION.match(s))
        labels = self.labels[:-1] if self.states else self.labels
        yield from self._walk(figures, steps, (), labels, n_bound)

    def _walk(
        self,
        node: Any,
        steps: tuple[str, ...],
        bound: tuple[str, ...],
        labels: tuple[str, ...],
        n_bound: int,
        parent: Any = None,
    ) -> Iterator[Sample]:
        if not steps:
            yield from self._leaf(node, bound, labels, n_bound, parent)
            return
        step, rest = steps[0], steps[1:]
        alternation = _ALTERNATION.match(step)
        every, _, excluded = step.partition("~")
        if every == "*" or alternation:
            if isinstance(node, Mapping):
                items: list[tuple[str, Any]] = [(str(k), v) for k, v in node.items()]
            elif isinstance(node, (list, tuple)):
                items = [(str(i), v) for i, v in enumerate(node)]
            else:
                return
            if excluded:  # "*~budget": every key but these
                items = [(k, v) for k, v in items if k not in excluded.split("~")]
            if alternation:
                # "(HIT|MISS)" or "(hits=hit|misses=miss)": the keys, and their label values.
                wanted = dict(
                    (a.partition("=")[0], a.partition("=")[2] or a.lower())
                    for a in alternation.group(1).split("|")
                )
                items = [(wanted[k], v) for k, v in items if k in wanted]
            for key, child in items:
                yield from self._walk(child, rest, (*bound, key), labels, n_bound, node)
        elif isinstance(node, Mapping) and step in node:
            yield from self._walk(node[step], rest, bound, labels, n_bound, node)

    def _leaf(
        self,
        value: Any,
        bound: tuple[str, ...],
        labels: tuple[str, ...],
        n_bound: int,
        parent: Any,
    ) -> Iterator[Sample]:
        extra = labels[n_bound:]
        if extra:
            if not isinstance(parent, Mapping):
                return
            bound = (*bound, *(str(parent.get(name, "")) for name in extra))
        if self.states:
            if isinstance(value, str):
                for state in self.states:
                    yield Sample((*bound, state), 1.0 if value == state else 0.0)
            return
        if isinstance(value, bool):
            yield Sample(bound, float(value))
        elif isinstance(value, (int, float)) and value == value:  # not NaN
            yield Sample(bound, float(value) * self.scale)


def check_family(family: MetricFamily) -> list[str]:
    """What in `family` breaks the naming conventions (empty when nothing does)."""
    problems = []
    name, unit = family.name, family.unit
    if not _NAME.match(name):
        problems.append(f"{name}: not snake_case")
    if family.type not in TYPES:
        problems.append(f"{name}: type {family.type!r} is not one of {sorted(TYPES)}")
    if unit not in UNITS:
        problems.append(f"{name}: unit {unit!r} is not one of {sorted(UNITS)}")
    if unit and not name.endswith("_" + unit):
        problems.append(f"{name}: a family in {unit} must end in _{unit}")
    if name.endswith("_total"):
        problems.append(f"{name}: declare a counter without _total (the exposition adds it)")
    if family.type != "counter" and name.endswith("_count"):
        problems.append(f"{name}: _count is a histogram's suffix")
    for part in _DERIVED:
        if part in name + "_":
            problems.append(f"{name}: {part} is computed in PromQL, not exposed")
    for word, base in _UNIT_WORDS.items():
        if (name + "_").count(word + "_"):
            problems.append(f"{name}: {word} is not a base unit (use _{base})")
    if "timestamp" in name and not name.endswith("_timestamp_seconds"):
        problems.append(f"{name}: timestamps end in _timestamp_seconds")
    parts = name.split("_")
    if any(a == b for a, b in itertools.pairwise(parts)):
        problems.append(f"{name}: stutters")
    for label in family.labels:
        if not _LABEL.match(label) or label in _RESERVED_LABELS:
            problems.append(f"{name}: label {label!r} is reserved or not snake_case")
    if family.states and family.labels[-1:] != ("state",):
        problems.append(f"{name}: a state set's last label is 'state'")
    if not family.help.strip():
        problems.append(f"{name}: no help")
    return problems
