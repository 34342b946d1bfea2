"""The seed's `PerformanceProfiler`: named timings with percentiles and memory deltas.

    profiler.start_profiling("video_processing")
    try:
        ...
    finally:
        profiler.stop_profiling("video_processing")
    report = profiler.get_profile_report("video_processing")
    print(f"Average time: {report['avg_time']:.3f}s")

Plus ``with profiler.profile("name"):`` and ``@profiler.profile("name")`` (sync or
async functions). Durations go into a `LogHistogram` (fixed memory per name).
The memory delta is the process's resident set size (RSS, from psutil) after
minus before, in MB; RSS is what the OS and the OOM killer see, and unlike
tracemalloc it costs nothing while nobody profiles. Turn it off with
``PerformanceProfiler(track_memory=False)`` (reading RSS costs about 10 us).

Concurrent profiles of the same name (two requests both in "video_processing")
are told apart by the asyncio task (or thread) that started them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

import psutil

from .histogram import LogHistogram

__all__ = ["PerformanceProfiler", "Profile"]

F = TypeVar("F", bound=Callable[..., Any])
_MB = float(2**20)


def _owner() -> int:
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return id(task) if task is not None else threading.get_ident()


class _Stats:
    __slots__ = ("errors", "histogram", "memory_delta", "memory_samples")

    def __init__(self) -> None:
        self.histogram = LogHistogram()
        self.errors = 0
        self.memory_delta = 0.0  # bytes, summed
        self.memory_samples = 0


class PerformanceProfiler:
    """Named timings: count, average, p50/p95/p99, max, errors, average RSS delta."""

    def __init__(self, *, track_memory: bool = True, max_names: int = 10_000) -> None:
        self.track_memory = track_memory
        self.max_names = max_names
        self._stats: dict[str, _Stats] = {}
        self._open: dict[tuple[str, int], tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._process = psutil.Process() if track_memory else None

    def _rss(self) -> int:
        if self._process is None:
            return 0
        try:
            return int(self._process.memory_info().rss)
        except psutil.Error:
            return 0

    def _entry(self, name: str) -> _Stats:
        stats = self._stats.get(name)
        if stats is None:
            with self._lock:
                stats = self._stats.get(name)
                if stats is None:
                    if len(self._stats) >= self.max_names:
                        name = "<other>"
                        stats = self._stats.get(name)
                    if stats is None:
                        stats = self._stats[name] = _Stats()
        return stats

    # -- the seed's API ------------------------------------------------------------

    def start_profiling(self, name: str) -> None:
        """Start timing `name` in the current task (or thread)."""
        self._open[(name, _owner())] = (perf_counter(), self._rss())

    def stop_profiling(self, name: str, *, error: bool | BaseException | None = None) -> float:
        """Stop timing `name`; return the duration in seconds (0.0 when it was not started).

        Pass `error` (an exception or True) to count the run as failed.
        """
        started = self._open.pop((name, _owner()), None)
        if started is None:
            return 0.0
        t0, rss0 = started
        duration = perf_counter() - t0
        memory = self._rss() - rss0 if self.track_memory else None
        self.record(name, duration, error=bool(error), memory_delta=memory)
        return duration

    def record(
        self,
        name: str,
        duration: float,
        *,
        error: bool = False,
        memory_delta: int | None = None,
    ) -> None:
        """Add one finished run of `name` (seconds; memory delta in bytes, if measured)."""
        stats = self._entry(name)
        stats.histogram.record(duration)
        if error:
            stats.errors += 1
        if memory_delta is not None:
            stats.memory_delta += memory_delta
            stats.memory_samples += 1

    def get_profile_report(self, name: str) -> dict[str, Any]:
        """count, avg_time, p50, p95, p99, min, max, total_time (seconds), errors,
        error_rate, avg_memory_delta (MB of RSS). Zeros for a name never profiled.
        """
        stats = self._stats.get(name)
        if stats is None:
            stats = _Stats()
        h = stats.histogram
        p50, p95, p99 = h.percentiles((50, 95, 99))
        return {
            "name": name,
            "count": h.count,
            "avg_time": h.mean,
            "p50": p50,
            "p95": p95,
            "p99": p99,
            "min": h.min,
            "max": h.max,
            "total_time": h.sum,
            "errors": stats.errors,
            "error_rate": stats.errors / h.count if h.count else 0.0,
            "avg_memory_delta": (
                stats.memory_delta / stats.memory_samples / _MB if stats.memory_samples else 0.0
            ),
            "memory_measure": "rss" if self.track_memory else "off",
        }

    def get_all_reports(self) -> dict[str, dict[str, Any]]:
        return {name: self.get_profile_report(name) for name in list(self._stats)}

    def histograms(self) -> dict[str, tuple[LogHistogram, int]]:
        """Name -> (latency histogram, errors): what the Prometheus exporter reads."""
        return {name: (s.histogram, s.errors) for name, s in list(self._stats.items())}

    def names(self) -> list[str]:
        return sorted(self._stats)

    def reset(self, name: str | None = None) -> None:
        if name is None:
            self._stats.clear()
        else:
            self._stats.pop(name, None)

    # -- context manager and decorator ---------------------------------------------

    def profile(self, name: str) -> Profile:
        """``with profiler.profile("x"):`` or ``@profiler.profile("x")`` (sync or async)."""
        return Profile(self, name)


class Profile:
    """One profiled block; also a decorator. An exception inside counts as an error."""

    __slots__ = ("_rss0", "_t0", "name", "profiler")

    def __init__(self, profiler: PerformanceProfiler, name: str) -> None:
        self.profiler = profiler
        self.name = name
        self._t0 = 0.0
        self._rss0 = 0

    def __enter__(self) -> Profile:
        self._rss0 = self.profiler._rss()
        self._t0 = perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        duration = perf_counter() - self._t0
        p = self.profiler
        memory = p._rss() - self._rss0 if p.track_memory else None
        p.record(self.name, duration, error=exc_type is not None, memory_delta=memory)

    async def __aenter__(self) -> Profile:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, fn: F) -> F:
        profiler, name = self.profiler, self.name
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with Profile(profiler, name):
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with Profile(profiler, name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
