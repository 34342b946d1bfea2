"""`ConcurrencyLimiter`: a bounded in-flight count with a bounded wait queue,
priority partitions and a limit that may move (`ScalingConfig`, AIMD, gradient).

Why our own: anyio's (and asyncio's) Semaphore has no queue bound, no wait bound, no
priorities and a fixed size; the adaptive controllers (Netflix
concurrency-limits' ``AIMDLimit`` and ``Gradient2Limit``; Envoy's adaptive
concurrency filter is the same gradient idea with periodic minRTT probes)
exist only in Java and C++.

The controllers are fed one sample per completed request. Raw latency misleads
them when jobs differ in size by orders of magnitude (a video generation vs a
thumbnail), so the plugin feeds either latency divided by the route's `cost`
or the time the request spent queued downstream (``ctx.queue_wait``).
"""

from __future__ import annotations

import math
from collections import deque
from time import perf_counter
from typing import Any, NoReturn

import anyio

from overdrive.errors import ConfigError

from ..scaling import ScalingConfig, desired_size

__all__ = [
    "AIMDController",
    "ConcurrencyLimiter",
    "GradientController",
    "ScalingConfig",
    "ScalingController",
    "Shed",
]


class Shed(Exception):
    """The request was not admitted: the queue is full or the wait would be too long."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Waiter:
    """One queued request: `granted` once a slot is handed to it, then `event` is set.

    An anyio Event (not an asyncio Future) so the queue works under asyncio and
    trio alike; `granted` records the hand-over, which a cancellation arriving in
    the same tick cannot undo (the slot is then given back).
    """

    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class _Partition:
    __slots__ = ("admitted", "in_flight", "name", "share", "shed", "waiters")

    def __init__(self, name: str, share: float) -> None:
        self.name = name
        self.share = share
        self.in_flight = 0
        self.waiters: deque[_Waiter] = deque()
        self.admitted = 0
        self.shed = 0


class ConcurrencyLimiter:
    """At most `limit` holders; up to `max_queue` waiters, each for at most `max_wait` s.

    A request whose estimated wait (queue length x mean service time / limit)
    exceeds `max_wait` is shed at once rather than queued. With partitions
    (``{"interactive": 0.9, "batch": 0.1}``), a freed slot goes to the waiting
    partition furthest below its share, so batch cannot starve interactive.
    """

    def __init__(
        self,
        limit: int,
        *,
        max_queue: int = 100,
        max_wait: float = 1.0,
        partitions: dict[str, float] | None = None,
        controller: Any = None,
        name: str = "global",
    ) -> None:
        if limit < 1:
            raise ConfigError(f"concurrency.max_concurrent: expected >= 1, got {limit!r}")
        self.name = name
        self.limit = limit
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.controller = controller
        self.in_flight = 0
        self.queued = 0
        self.shed_count = 0
        self.admitted = 0
        self.service_ema = 0.0
        shares = dict(partitions or {}) or {"default": 1.0}
        self._parts = {n: _Partition(n, s) for n, s in shares.items()}
        self._default = next(iter(self._parts.values()))
        if controller is not None:
            controller.attach(self)

    def partition(self, name: str | None) -> _Partition:
        if name is None:
            return self._default
        return self._parts.get(name, self._default)

    def estimated_wait(self) -> float:
        return (self.queued + 1) * self.service_ema / self.limit

    def _retry_after(self) -> float:
        return max(1.0, self.estimated_wait())

    async def acquire(self, part: _Partition) -> float:
        """Take a slot; returns the seconds waited. Raises `Shed`."""
        if self.in_flight < self.limit and not self.queued:
            self.in_flight += 1
            part.in_flight += 1
            part.admitted += 1
            self.admitted += 1
            return 0.0
        if self.queued >= self.max_queue:
            self._shed(part, "queue full")
        if self.service_ema and self.estimated_wait() > self.max_wait:
            self._shed(part, "wait too long")
        waiter = _Waiter()
        part.waiters.append(waiter)
        self.queued += 1
        t0 = perf_counter()
        try:
            with anyio.fail_after(self.max_wait):
                await waiter.event.wait()
        except BaseException as exc:
            if waiter.granted:
                # granted in the same tick as the timeout or cancellation: give it back
                self.release(part)
            elif waiter in part.waiters:
                part.waiters.remove(waiter)
                self.queued -= 1
            if isinstance(exc, TimeoutError):
                self._shed(part, "waited too long")
            raise
        part.admitted += 1
        self.admitted += 1
        return perf_counter() - t0

    def _shed(self, part: _Partition, reason: str) -> NoReturn:
        self.shed_count += 1
        part.shed += 1
        raise Shed(reason, self._retry_after())

    def release(self, part: _Partition, service_time: float | None = None) -> None:
        """Give a slot back; `service_time` (seconds held) feeds the wait estimate."""
        self.in_flight -= 1
        part.in_flight -= 1
        if service_time is not None:
            ema = self.service_ema
            self.service_ema = service_time if not ema else ema + 0.1 * (service_time - ema)
        if self.queued:
            self._wake()

    def _wake(self) -> None:
        while self.in_flight < self.limit and self.queued:
            best = None
            best_ratio = math.inf
            for p in self._parts.values():
                if p.waiters:
                    ratio = p.in_flight / p.share if p.share > 0 else math.inf
                    if ratio < best_ratio or best is None:
                        best, best_ratio = p, ratio
            if best is None:
                self.queued = 0
                return
            waiter = best.waiters.popleft()
            self.queued -= 1
            waiter.granted = True
            waiter.event.set()
            self.in_flight += 1
            best.in_flight += 1

    def set_limit(self, limit: int) -> None:
        if limit != self.limit:
            self.limit = max(1, limit)
            if self.queued:
                self._wake()

    def sample(self, signal: float, dropped: bool = False) -> None:
        """Feed the controller one completed request's signal (seconds)."""
        if self.controller is not None:
            self.controller.update(signal, dropped)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "limit": self.limit,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "admitted": self.admitted,
            "shed": self.shed_count,
            "service_time_ema_ms": round(self.service_ema * 1000, 3),
        }
        if len(self._parts) > 1:
            out["partitions"] = {
                p.name: {
                    "share": p.share,
                    "in_flight": p.in_flight,
                    "queued": len(p.waiters),
                    "admitted": p.admitted,
                    "shed": p.shed,
                }
                for p in self._parts.values()
            }
        if self.controller is not None:
            out["controller"] = self.controller.stats()
        return out


class _Controller:
    limiter: ConcurrencyLimiter

    def __init__(self, min_limit: int, max_limit: int) -> None:
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.estimate = float(min_limit)
        self.samples = 0

    def attach(self, limiter: ConcurrencyLimiter) -> None:
        self.limiter = limiter
        self.estimate = float(min(max(limiter.limit, self.min_limit), self.max_limit))
        limiter.limit = int(self.estimate)

    def _apply(self, estimate: float) -> None:
        self.estimate = min(float(self.max_limit), max(float(self.min_limit), estimate))
        self.limiter.set_limit(int(self.estimate))

    def stats(self) -> dict[str, Any]:
        return {"estimate": round(self.estimate, 2), "samples": self.samples}


class AIMDController(_Controller):
    """Netflix concurrency-limits ``AIMDLimit``: +1 while the limit is in use and the
    signal is under `target`; times `backoff` when it is over (or a request was dropped).
    The target is absolute (queue wait) or `tolerance` x the lowest signal seen."""

    def __init__(
        self,
        min_limit: int,
        max_limit: int,
        *,
        target: float | None = None,
        tolerance: float = 2.0,
        backoff: float = 0.9,
    ) -> None:
        super().__init__(min_limit, max_limit)
        self.target = target
        self.tolerance = tolerance
        self.backoff = backoff
        self.baseline = math.inf

    def update(self, signal: float, dropped: bool) -> None:
        self.samples += 1
        if self.target is None:
            if 0 < signal < self.baseline:
                self.baseline = signal
            elif self.samples % 100 == 0:
                self.baseline *= 1.05  # let the floor rise again when the load changes
            bad = signal > self.tolerance * self.baseline
        else:
            bad = signal > self.target
        if dropped or bad:
            self._apply(self.estimate * self.backoff)
        elif self.limiter.in_flight * 2 >= self.limiter.limit:
            self._apply(self.estimate + 1)


class GradientController(_Controller):
    """A gradient limit, as Netflix concurrency-limits' ``Gradient2Limit`` and Envoy's
    adaptive concurrency filter: ``limit x clamp(tolerance x baseline / sample, 0.5, 1)
    + headroom``, smoothed. As in Envoy, the baseline is the lowest signal seen (its
    minRTT), aged upwards slowly so that it can follow a slower model; with a queue
    wait signal the baseline is the fixed `target` instead. `sample` is a short moving
    average of the signal (Gradient2's short RTT)."""

    def __init__(
        self,
        min_limit: int,
        max_limit: int,
        *,
        target: float | None = None,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
        headroom: float = 0.5,
    ) -> None:
        super().__init__(min_limit, max_limit)
        self.target = target
        self.tolerance = tolerance
        self.smoothing = smoothing
        self.headroom = headroom
        self.baseline = math.inf
        self.short = 0.0

    def update(self, signal: float, dropped: bool) -> None:
        self.samples += 1
        short = self.short
        self.short = short = signal if not short else short + 0.3 * (signal - short)
        if self.target is None:
            if signal <= 0:
                return
            if signal < self.baseline:
                self.baseline = signal
            elif self.samples % 100 == 0:
                self.baseline *= 1.05  # age the floor so that it can follow a slower model
            gradient = max(0.5, min(1.0, self.tolerance * self.baseline / short))
        else:
            gradient = max(0.5, min(1.0, self.target / short)) if short > 0 else 1.0
        if dropped:
            gradient = 0.5
        limit = self.estimate
        if not dropped and gradient == 1.0 and self.limiter.in_flight < limit / 2:
            return  # app-limited: the signal says nothing about a higher limit
        new = limit * gradient + self.headroom
        self._apply(limit * (1 - self.smoothing) + new * self.smoothing)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "baseline_ms": round(self.baseline * 1000, 3)}


class ScalingController(_Controller):
    """`ScalingConfig` semantics on the limit (`overdrive.plugins.scaling.desired_size`)."""

    def __init__(self, config: ScalingConfig) -> None:
        super().__init__(config.min_workers, config.max_workers)
        self.config = config
        self._since = perf_counter()
        self._last = self._since
        self._area = 0.0
        self._last_up = -math.inf
        self._last_change = -math.inf
        self.last_reason = ""

    def update(self, signal: float, dropped: bool) -> None:
        self.samples += 1
        now = perf_counter()
        lim = self.limiter
        self._area += (lim.in_flight + lim.queued) * (now - self._last)
        self._last = now
        span = now - self._since
        c = self.config
        if span < c.check_interval:
            return
        load = self._area / span  # requests in flight or queued, on average
        self._area = 0.0
        self._since = now
        limit = lim.limit
        desired, reason = desired_size(
            c, limit, load, now, self._last_up, self._last_change, unit="slot"
        )
        self.last_reason = reason
        if desired != limit:
            if desired > limit:
                self._last_up = now
            self._last_change = now
            self._apply(float(desired))

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "min_workers": self.min_limit,
            "max_workers": self.max_limit,
            "last_decision": self.last_reason,
        }
