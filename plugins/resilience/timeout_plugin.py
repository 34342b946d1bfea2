"""The `timeout` plugin: a deadline per route for requests, per name for operations.

For a request, `seconds` is compiled onto the route's policy: the middleware
runs the request hooks, the app and cache_store under that deadline (counted
from the request's start) and answers 504 (or `on_failure`'s fallback) when it
passes; `body_seconds` bounds the arrival of the body (408). `gpu_release` and
`after_request` still run. (``ctx.timeout``, which a plugin may set to bound
the app alone, is left to other plugins.) For ``host.run(name, ...)`` it sets
``op.timeout``: the host bounds each attempt and a late attempt raises `TimeoutError` (which the
`retry` plugin may retry and the `breaker` plugin counts as a failure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overdrive import Plugin, hookimpl
from overdrive.errors import ConfigError
from overdrive.metrics import MetricFamily as F

__all__ = ["TimeoutPlugin", "TimeoutSettings"]


@dataclass
class TimeoutSettings:
    #: (route) Seconds from a request's start to its answer: every request hook
    #: (before_request, cache_lookup, gpu_allocate), the app and cache_store.
    seconds: float | None = None
    #: (route) Seconds from a request's start until its body must have arrived; past
    #: it the client gets 408 (None: only `seconds` bounds it).
    body_seconds: float | None = None
    operation_seconds: float | None = None
    operations: dict[str, float] = field(default_factory=dict)

    @property
    def request_deadline(self) -> float | None:
        return self.seconds  # compiled onto the route's policy (RoutePolicy.deadline)

    @property
    def body_deadline(self) -> float | None:
        return self.body_seconds

    def __post_init__(self) -> None:
        if self.seconds is not None and not self.seconds > 0:
            raise ConfigError(f"timeout.seconds: expected > 0, got {self.seconds!r}")
        if self.body_seconds is not None and not self.body_seconds > 0:
            raise ConfigError(f"timeout.body_seconds: expected > 0, got {self.body_seconds!r}")
        if self.operation_seconds is not None and not self.operation_seconds > 0:
            raise ConfigError(
                f"timeout.operation_seconds: expected > 0, got {self.operation_seconds!r}"
            )
        for name, value in self.operations.items():
            if not value > 0:
                raise ConfigError(f"timeout.operations.{name}: expected > 0, got {value!r}")


class TimeoutPlugin(Plugin):
    name = "timeout"
    metric_families = (
        F(
            "timeout_expired_operations",
            "counter",
            "Operations (host.run) cut by their timeout",
            "operation_timeouts",
        ),
    )
    Settings = TimeoutSettings

    def __init__(self, settings: TimeoutSettings | None = None) -> None:
        super().__init__(settings)
        self.operation_timeouts = 0

    @hookimpl
    def before_operation(self, op: Any) -> None:
        s: TimeoutSettings = self.settings
        seconds = s.operations.get(op.name, s.operation_seconds)
        if seconds is not None and (op.timeout is None or seconds < op.timeout):
            op.timeout = seconds

    @hookimpl
    def after_operation(self, op: Any) -> None:
        if isinstance(op.error, TimeoutError):
            self.operation_timeouts += 1

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        return {"operation_timeouts": self.operation_timeouts}
