"""What trips a circuit breaker (`CircuitBreakerConfig`) and the sliding windows it counts in.

Split from breaker.py so that the state machine reads on its own. The windows
are resilience4j's: the last N calls in a ring, or the last N seconds in one
bucket per second, each with running totals so that recording is O(1).
"""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic
from typing import Literal

from overdrive.errors import ConfigError

__all__ = ["CircuitBreakerConfig"]

OPERATOR_STATES = ("closed", "disabled", "metrics_only", "forced_open")


@dataclass
class CircuitBreakerConfig:
    """What trips a breaker and how it recovers. All durations in seconds.

    With `failure_rate_threshold` None (the seed's shape) the breaker trips when
    `failure_threshold` failures are in the window; the window then defaults to
    `failure_threshold` calls, so five failures in a row trip it. With a rate
    (percent, as resilience4j), it trips when at least `minimum_number_of_calls`
    are in the window and that share of them failed.
    """

    failure_threshold: int = 5
    recovery_timeout: float = 60.0
    expected_exception: type[BaseException] | tuple[type[BaseException], ...] = Exception
    failure_rate_threshold: float | None = None
    sliding_window_type: Literal["count", "time"] = "count"
    sliding_window_size: int | None = None
    minimum_number_of_calls: int = 10
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float = 100.0
    half_open_max_calls: int = 1
    ignore_exceptions: tuple[type[BaseException], ...] = ()
    initial_state: Literal["closed", "disabled", "metrics_only", "forced_open"] = "closed"
    redis_url: str | None = None
    redis_key_prefix: str = "overdrive:breaker:"
    redis_sync_interval: float = 0.25
    redis_retry_interval: float = 5.0
    half_open_stale_after: float = 300.0

    def __post_init__(self) -> None:
        where = "breaker"
        if self.failure_threshold < 1:
            raise ConfigError(
                f"{where}.failure_threshold: expected >= 1, got {self.failure_threshold!r}"
            )
        if not self.recovery_timeout > 0:
            raise ConfigError(
                f"{where}.recovery_timeout: expected > 0, got {self.recovery_timeout!r}"
            )
        if self.failure_rate_threshold is not None and not 0 < self.failure_rate_threshold <= 100:
            raise ConfigError(
                f"{where}.failure_rate_threshold: expected a percent in (0, 100], "
                f"got {self.failure_rate_threshold!r}"
            )
        if self.sliding_window_size is None:
            if self.sliding_window_type == "time":
                self.sliding_window_size = 60
            elif self.failure_rate_threshold is None:
                self.sliding_window_size = self.failure_threshold
            else:
                self.sliding_window_size = 100
        if self.sliding_window_size < 1:
            raise ConfigError(
                f"{where}.sliding_window_size: expected >= 1, got {self.sliding_window_size!r}"
            )
        if self.sliding_window_type not in ("count", "time"):
            raise ConfigError(
                f"{where}.sliding_window_type: expected 'count' or 'time', "
                f"got {self.sliding_window_type!r}"
            )
        if (
            self.sliding_window_type == "count"
            and self.failure_rate_threshold is None
            and self.sliding_window_size < self.failure_threshold
        ):
            raise ConfigError(
                f"{where}.sliding_window_size: expected >= failure_threshold "
                f"({self.failure_threshold}), got {self.sliding_window_size!r}"
            )
        if self.minimum_number_of_calls < 1:
            raise ConfigError(
                f"{where}.minimum_number_of_calls: expected >= 1, "
                f"got {self.minimum_number_of_calls!r}"
            )
        if self.slow_call_duration is not None and not self.slow_call_duration > 0:
            raise ConfigError(
                f"{where}.slow_call_duration: expected > 0, got {self.slow_call_duration!r}"
            )
        if not 0 < self.slow_call_rate_threshold <= 100:
            raise ConfigError(
                f"{where}.slow_call_rate_threshold: expected a percent in (0, 100], "
                f"got {self.slow_call_rate_threshold!r}"
            )
        if self.half_open_max_calls < 1:
            raise ConfigError(
                f"{where}.half_open_max_calls: expected >= 1, got {self.half_open_max_calls!r}"
            )
        if self.initial_state not in OPERATOR_STATES:
            raise ConfigError(
                f"{where}.initial_state: expected one of {OPERATOR_STATES}, "
                f"got {self.initial_state!r}"
            )
        if not self.half_open_stale_after > 0:
            raise ConfigError(
                f"{where}.half_open_stale_after: expected > 0, got {self.half_open_stale_after!r}"
            )
        if not self.redis_sync_interval > 0:
            raise ConfigError(
                f"{where}.redis_sync_interval: expected > 0, got {self.redis_sync_interval!r}"
            )


class _CountWindow:
    """The last `size` outcomes in a ring, with running totals."""

    __slots__ = ("buf", "calls", "failures", "i", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = [0] * size
        self.i = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, code: int) -> None:
        i = self.i
        if self.calls < self.size:
            self.calls += 1
        else:
            old = self.buf[i]
            if old:
                self.failures -= old & 1
                self.slow -= old >> 1
        self.buf[i] = code
        self.i = i + 1 if i + 1 < self.size else 0
        if code:
            self.failures += code & 1
            self.slow += code >> 1


class _TimeWindow:
    """Outcomes of the last `size` seconds, in one bucket per second (as resilience4j)."""

    __slots__ = ("b_calls", "b_fail", "b_slow", "calls", "current", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.b_calls = [0] * size
        self.b_fail = [0] * size
        self.b_slow = [0] * size
        self.current = int(monotonic())
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def _advance(self, now: int) -> None:
        steps = min(now - self.current, self.size)
        for k in range(1, steps + 1):
            j = (self.current + k) % self.size
            self.calls -= self.b_calls[j]
            self.failures -= self.b_fail[j]
            self.slow -= self.b_slow[j]
            self.b_calls[j] = self.b_fail[j] = self.b_slow[j] = 0
        self.current = now

    def add(self, code: int) -> None:
        now = int(monotonic())
        if now != self.current:
            self._advance(now)
        j = now % self.size
        self.b_calls[j] += 1
        self.calls += 1
        if code:
            f, s = code & 1, code >> 1
            self.b_fail[j] += f
            self.b_slow[j] += s
            self.failures += f
            self.slow += s

    def refresh(self) -> None:
        now = int(monotonic())
        if now != self.current:
            self._advance(now)
