"""Profiling: the seed's `PerformanceProfiler` and the `profiler` plugin.

- `PerformanceProfiler` (profiler.py): named timings, usable on its own.
- `LogHistogram` (histogram.py): the fixed-size latency histogram behind both.
- `ProfilerPlugin` (plugin.py): per-route request figures, ``host.profiler``.
"""

from __future__ import annotations

from .histogram import LogHistogram
from .plugin import ProfilerPlugin
from .profiler import PerformanceProfiler, Profile
from .requests import RequestMetrics, route_template

__all__ = [
    "LogHistogram",
    "PerformanceProfiler",
    "Profile",
    "ProfilerPlugin",
    "RequestMetrics",
    "route_template",
]
