"""The `timeout` plugin: a deadline per route for requests, per name for operations.

For a request it sets ``ctx.timeout``: the middleware then cancels the app's
task when the deadline passes and answers 504 (or `on_failure`'s fallback);
`after_request` still runs. For ``host.run(name, ...)`` it sets ``op.timeout``:
the host bounds each attempt and a late attempt raises `TimeoutError` (which the
`retry` plugin may retry and the `breaker` plugin counts as a failure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overdrive import Plugin, hookimpl
from overdrive.errors import ConfigError

__all__ = ["TimeoutPlugin", "TimeoutSettings"]


@dataclass
class TimeoutSettings:
    seconds: float | None = None
    operation_seconds: float | None = None
    operations: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seconds is not None and not self.seconds > 0:
            raise ConfigError(f"timeout.seconds: expected > 0, got {self.seconds!r}")
        if self.operation_seconds is not None and not self.operation_seconds > 0:
            raise ConfigError(
                f"timeout.operation_seconds: expected > 0, got {self.operation_seconds!r}"
            )
        for name, value in self.operations.items():
            if not value > 0:
                raise ConfigError(f"timeout.operations.{name}: expected > 0, got {value!r}")


class TimeoutPlugin(Plugin):
    name = "timeout"
    Settings = TimeoutSettings

    def __init__(self, settings: TimeoutSettings | None = None) -> None:
        super().__init__(settings)
        self.operation_timeouts = 0

    @hookimpl
    def before_request(self, ctx: Any) -> None:
        seconds = ctx.settings(self.name).seconds
        if seconds is not None and (ctx.timeout is None or seconds < ctx.timeout):
            ctx.timeout = seconds

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
