"""The `concurrency` plugin: in-flight limits (global and per route), a bounded wait
queue, load shedding with 503 + Retry-After, priority partitions, and a limit that
is fixed, follows `ScalingConfig`, or adapts (AIMD or gradient, after Netflix
concurrency-limits).

A GPU service past its capacity does not fail fast on its own: requests pile up
inside it until everyone times out. Shedding what cannot be served within
`max_wait` keeps the latency of admitted requests bounded and the goodput near
capacity (benchmarks/overload.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal

from overdrive import Plugin, hookimpl
from overdrive.errors import ConfigError
from overdrive.metrics import MetricFamily as F

from .common import REJECTED, reject, route_name
from .limiter import (
    AIMDController,
    ConcurrencyLimiter,
    GradientController,
    ScalingConfig,
    ScalingController,
    Shed,
)

__all__ = ["ConcurrencyPlugin", "ConcurrencySettings"]


@dataclass
class ConcurrencySettings:
    max_concurrent: int = 64
    max_queue: int = 100
    max_wait: float = 2.0
    mode: Literal["fixed", "scaling", "aimd", "gradient"] = "fixed"
    signal: Literal["latency", "queue_wait"] = "latency"
    queue_wait_target: float = 0.05
    min_limit: int = 1
    max_limit: int | None = None
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    partitions: dict[str, float] = field(default_factory=dict)
    partition: str | None = None
    partition_header: str | None = None
    route_limit: int | None = None
    cost: float = 1.0
    retry_after: float | None = None
    # (route) Bytes of request body read before a slot is taken (all of a smaller
    # body): a client trickling its body holds a connection, not a slot. 0: admit first.
    admit_after_body: int = 1 << 20

    @property
    def body_before_admission(self) -> int:
        return self.admit_after_body  # compiled onto the route's policy (body_first)

    def __post_init__(self) -> None:
        w = "concurrency"
        if self.admit_after_body < 0:
            raise ConfigError(
                f"{w}.admit_after_body: expected >= 0 bytes, got {self.admit_after_body!r}"
            )
        if self.max_concurrent < 0:
            raise ConfigError(
                f"{w}.max_concurrent: expected >= 0 (0: no global limit), "
                f"got {self.max_concurrent!r}"
            )
        if self.max_queue < 0:
            raise ConfigError(f"{w}.max_queue: expected >= 0, got {self.max_queue!r}")
        if not self.max_wait > 0:
            raise ConfigError(f"{w}.max_wait: expected > 0, got {self.max_wait!r}")
        if not self.queue_wait_target > 0:
            raise ConfigError(
                f"{w}.queue_wait_target: expected > 0, got {self.queue_wait_target!r}"
            )
        if self.min_limit < 1:
            raise ConfigError(f"{w}.min_limit: expected >= 1, got {self.min_limit!r}")
        if self.max_limit is not None and self.max_limit < self.min_limit:
            raise ConfigError(
                f"{w}.max_limit: expected >= min_limit ({self.min_limit}), got {self.max_limit!r}"
            )
        if self.route_limit is not None and self.route_limit < 1:
            raise ConfigError(f"{w}.route_limit: expected >= 1, got {self.route_limit!r}")
        if not self.cost > 0:
            raise ConfigError(f"{w}.cost: expected > 0, got {self.cost!r}")
        if self.retry_after is not None and self.retry_after < 0:
            raise ConfigError(f"{w}.retry_after: expected >= 0, got {self.retry_after!r}")
        for name, share in self.partitions.items():
            if not 0 < share <= 1:
                raise ConfigError(f"{w}.partitions.{name}: expected in (0, 1], got {share!r}")
        if sum(self.partitions.values()) > 1.0 + 1e-9:
            raise ConfigError(
                f"{w}.partitions: expected shares adding up to at most 1, got {self.partitions!r}"
            )
        if self.partition is not None and self.partition not in self.partitions:
            raise ConfigError(
                f"{w}.partition: expected one of {sorted(self.partitions)}, got {self.partition!r}"
            )
        if self.mode != "fixed" and self.max_concurrent == 0:
            raise ConfigError(f"{w}.max_concurrent: mode {self.mode!r} needs a limit >= 1, got 0")

    def limiter(self, limit: int, name: str) -> ConcurrencyLimiter:
        controller: Any = None
        max_limit = self.max_limit or max(limit * 4, self.min_limit)
        target = self.queue_wait_target if self.signal == "queue_wait" else None
        if self.mode == "scaling":
            controller = ScalingController(self.scaling)
        elif self.mode == "aimd":
            controller = AIMDController(self.min_limit, max_limit, target=target)
        elif self.mode == "gradient":
            controller = GradientController(self.min_limit, max_limit, target=target)
        return ConcurrencyLimiter(
            limit,
            max_queue=self.max_queue,
            max_wait=self.max_wait,
            partitions=self.partitions,
            controller=controller,
            name=name,
        )


class ConcurrencyPlugin(Plugin):
    name = "concurrency"
    metric_families = (
        F("concurrency_limit", "gauge", "Requests allowed in the app at once", "global.limit"),
        F(
            "concurrency_requests_in_flight",
            "gauge",
            "Requests in the app now",
            "global.in_flight",
            multiprocess_mode="livesum",
        ),
        F(
            "concurrency_queued_requests",
            "gauge",
            "Requests waiting for a slot now",
            "global.queued",
            multiprocess_mode="livesum",
        ),
        F("concurrency_admitted_requests", "counter", "Requests given a slot", "global.admitted"),
        F(
            "concurrency_shed_requests",
            "counter",
            "Requests refused (503): queue full or waited too long",
            "global.shed",
        ),
        F(
            "concurrency_route_limit",
            "gauge",
            "Requests of a route rule allowed in the app at once",
            "routes.*.limit",
            labels=("route",),
        ),
        F(
            "concurrency_route_requests_in_flight",
            "gauge",
            "Requests of a route rule in the app now",
            "routes.*.in_flight",
            labels=("route",),
            multiprocess_mode="livesum",
        ),
        F(
            "concurrency_route_queued_requests",
            "gauge",
            "Requests of a route rule waiting now",
            "routes.*.queued",
            labels=("route",),
            multiprocess_mode="livesum",
        ),
        F(
            "concurrency_route_admitted_requests",
            "counter",
            "Requests of a route rule given a slot",
            "routes.*.admitted",
            labels=("route",),
        ),
        F(
            "concurrency_route_shed_requests",
            "counter",
            "Requests of a route rule refused (503)",
            "routes.*.shed",
            labels=("route",),
        ),
    )
    Settings = ConcurrencySettings

    def __init__(self, settings: ConcurrencySettings | None = None) -> None:
        super().__init__(settings)
        self.limiter: ConcurrencyLimiter | None = None
        self.route_limiters: dict[str, ConcurrencyLimiter] = {}
        self._by_policy: dict[Any, ConcurrencyLimiter | None] = {}
        self._header: str | None = None

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: ConcurrencySettings = self.settings
        if s.max_concurrent:
            self.limiter = s.limiter(s.max_concurrent, "global")
        self._header = s.partition_header.lower() if s.partition_header else None

    def _route_limiter(self, ctx: Any, s: ConcurrencySettings) -> ConcurrencyLimiter | None:
        limiter = None
        if s.route_limit:
            name = route_name(ctx.policy, self.name) or "route"
            limiter = self.route_limiters.get(name)
            if limiter is None:
                limiter = s.limiter(s.route_limit, name)
                self.route_limiters[name] = limiter
        if len(self._by_policy) > 4096:
            self._by_policy.clear()
        self._by_policy[ctx.policy] = limiter
        return limiter

    @hookimpl
    async def before_request(self, ctx: Any) -> Any:
        s: ConcurrencySettings = ctx.settings(self.name)
        try:
            route = self._by_policy[ctx.policy]
        except KeyError:
            route = self._route_limiter(ctx, s)
        part_name = s.partition
        if self._header is not None:
            part_name = ctx.headers.get(self._header, part_name)
        glob = self.limiter
        waited = 0.0
        route_part = glob_part = None
        try:
            if route is not None:
                part = route.partition(part_name)
                waited += await route.acquire(part)
                route_part = part
            if glob is not None:
                part = glob.partition(part_name)
                waited += await glob.acquire(part)
                glob_part = part
        except BaseException as exc:
            if route is not None and route_part is not None:
                route.release(route_part)
            if not isinstance(exc, Shed):
                raise
            ctx.state[REJECTED] = self.name
            retry_after = s.retry_after if s.retry_after is not None else exc.retry_after
            return reject(503, "Service Unavailable: overloaded", retry_after)
        if waited:
            ctx.queue_wait += waited
        ctx.state[self.name] = (route, route_part, glob_part, waited, perf_counter(), s)
        return None

    @hookimpl
    def after_request(self, ctx: Any) -> None:
        state = ctx._state
        entry = state.get(self.name) if state else None
        if entry is None:
            return
        route, route_part, glob_part, waited, t0, s = entry
        held = perf_counter() - t0
        dropped = isinstance(ctx.error, TimeoutError)
        # latency per unit of cost, or the time queued downstream (GPU admission)
        signal = held / s.cost if s.signal == "latency" else max(0.0, ctx.queue_wait - waited)
        if route is not None:
            route.release(route_part, held)
            route.sample(signal, dropped)
        glob = self.limiter
        if glob is not None and glob_part is not None:
            glob.release(glob_part, held)
            glob.sample(signal, dropped)

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.limiter is not None:
            out["global"] = self.limiter.stats()
        if self.route_limiters:
            out["routes"] = {name: lim.stats() for name, lim in self.route_limiters.items()}
        return out
