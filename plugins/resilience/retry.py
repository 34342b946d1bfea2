"""Retries for operations: `RetryPolicy` (backoff with full jitter) and `RetryBudget`.

The policy is tenacity's: `wait_random_exponential` (full jitter, as in AWS's
"Exponential Backoff and Jitter"), `stop_after_attempt | stop_after_delay` and
`retry_if_exception_type`, with stamina's safer defaults (a total time bound,
a capped wait, and retrying only the exceptions named). We do not run
tenacity's (or stamina's) loop: the host owns the operation loop
(`on_operation_failure` returns a delay), and the success path must cost
nothing, so tenacity is consulted only once a call has failed.

`RetryBudget` is what Envoy's ``retry_budget`` does and no Python library
offers: retries may be at most a share of recent calls (plus a small floor), so
that when everything fails, retries cannot multiply the load on what is down.
"""

from __future__ import annotations

import asyncio
import builtins
import importlib
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime
from time import monotonic, time
from typing import Any

import tenacity

from overdrive.errors import ConfigError

__all__ = ["RetryBudget", "RetryPolicy", "resolve_exceptions", "retry_after_of"]


def resolve_exceptions(names: Iterable[str | type[BaseException]], key: str) -> tuple[type, ...]:
    """Exception classes from names: builtins (``"ConnectionError"``) or dotted paths."""
    out: list[type] = []
    for name in names:
        if isinstance(name, type):
            cls: Any = name
        elif "." not in name and ":" not in name:
            cls = getattr(builtins, name, None)
        else:
            module, _, attr = name.replace(":", ".").rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), attr, None)
            except ImportError:
                cls = None
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise ConfigError(f"{key}: expected exception class names, got {name!r}")
        if issubclass(cls, asyncio.CancelledError) or not issubclass(cls, Exception):
            raise ConfigError(f"{key}: {name!r} is never retried (cancellation is not a failure)")
        out.append(cls)
    return tuple(out)


def retry_after_of(error: BaseException) -> float | None:
    """A delay the failure asked for: ``error.retry_after`` or a ``Retry-After`` header
    on ``error.headers`` / ``error.response.headers`` (seconds or an HTTP date)."""
    value: Any = getattr(error, "retry_after", None)
    if value is None:
        for holder in (error, getattr(error, "response", None)):
            headers = getattr(holder, "headers", None)
            if headers is not None:
                try:
                    value = headers.get("retry-after") or headers.get("Retry-After")
                except Exception:
                    value = None
                if value is not None:
                    break
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return max(0.0, float(value))
    text = str(value).strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - time())
    except (TypeError, ValueError, IndexError):
        return None


class RetryBudget:
    """Retries allowed as a share of calls over the last `window` seconds (Envoy's
    ``retry_budget``: ``budget_percent`` plus ``min_retry_concurrency``, here a floor
    of retries per second). One bucket per second; O(1) per call."""

    __slots__ = ("_calls", "_current", "_retries", "min_per_second", "ratio", "refused", "window")

    def __init__(self, ratio: float = 0.2, min_per_second: float = 10.0, window: int = 10) -> None:
        if ratio < 0:
            raise ConfigError(f"retry.budget_ratio: expected >= 0, got {ratio!r}")
        if min_per_second < 0:
            raise ConfigError(f"retry.budget_min_per_second: expected >= 0, got {min_per_second!r}")
        if window < 1:
            raise ConfigError(f"retry.budget_window: expected >= 1, got {window!r}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._calls = [0] * window
        self._retries = [0] * window
        self._current = int(monotonic())
        self.refused = 0

    def _bucket(self) -> int:
        now = int(monotonic())
        if now != self._current:
            for k in range(1, min(now - self._current, self.window) + 1):
                j = (self._current + k) % self.window
                self._calls[j] = self._retries[j] = 0
            self._current = now
        return now % self.window

    def record_call(self) -> None:
        """A first attempt was made."""
        self._calls[self._bucket()] += 1

    def try_retry(self) -> bool:
        """May one more retry be made now? Counts it when yes."""
        j = self._bucket()
        allowed = max(self.min_per_second * self.window, self.ratio * sum(self._calls))
        if sum(self._retries) + 1 > allowed:
            self.refused += 1
            return False
        self._retries[j] += 1
        return True

    def stats(self) -> dict[str, Any]:
        self._bucket()
        return {
            "calls": sum(self._calls),
            "retries": sum(self._retries),
            "refused": self.refused,
            "ratio": self.ratio,
        }


class RetryPolicy:
    """When to retry a failed call, and after how long.

    `attempts` counts the first call; `timeout` bounds the total time (seconds,
    None for no bound); waits grow from `wait_initial` by `wait_exp_base` up to
    `wait_max`, each drawn uniformly in [0, bound] (full jitter). Only instances
    of `on` are retried. A ``Retry-After`` carried by the failure replaces the
    drawn wait when `respect_retry_after` (capped at `max_retry_after`).
    """

    def __init__(
        self,
        *,
        attempts: int = 3,
        timeout: float | None = 45.0,
        wait_initial: float = 0.1,
        wait_max: float = 5.0,
        wait_exp_base: float = 2.0,
        on: tuple[type[BaseException], ...] | type[BaseException] = (ConnectionError, TimeoutError),
        respect_retry_after: bool = True,
        max_retry_after: float = 60.0,
        budget: RetryBudget | None = None,
        where: str = "retry",
    ) -> None:
        if attempts < 1:
            raise ConfigError(f"{where}.attempts: expected >= 1, got {attempts!r}")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"{where}.timeout: expected > 0 or None, got {timeout!r}")
        if wait_initial < 0:
            raise ConfigError(f"{where}.wait_initial: expected >= 0, got {wait_initial!r}")
        if wait_max < wait_initial:
            raise ConfigError(
                f"{where}.wait_max: expected >= wait_initial ({wait_initial}), got {wait_max!r}"
            )
        if not wait_exp_base >= 1:
            raise ConfigError(f"{where}.wait_exp_base: expected >= 1, got {wait_exp_base!r}")
        if max_retry_after < 0:
            raise ConfigError(f"{where}.max_retry_after: expected >= 0, got {max_retry_after!r}")
        self.attempts = attempts
        self.timeout = timeout
        self.on = on if isinstance(on, tuple) else (on,)
        self.respect_retry_after = respect_retry_after
        self.max_retry_after = max_retry_after
        self.budget = budget
        stop: Any = tenacity.stop_after_attempt(attempts)
        if timeout is not None:
            stop = stop | tenacity.stop_after_delay(timeout)
        self._stop = stop
        self._wait = tenacity.wait_random_exponential(
            multiplier=wait_initial, max=wait_max, exp_base=wait_exp_base
        )
        self._retry = tenacity.retry_if_exception_type(self.on)
        self.retries = 0
        self.gave_up = 0

    def next_delay(self, error: BaseException, attempt: int, elapsed: float) -> float | None:
        """The wait before attempt ``attempt + 1``, or None to give up.

        `attempt` is the number of the attempt that failed (1 for the first
        call); `elapsed` the seconds since the first attempt started.
        """
        if not isinstance(error, Exception):
            return None  # never after cancellation
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        state.outcome = tenacity.Future.construct(attempt, error, True)
        state.outcome_timestamp = state.start_time + elapsed
        if not self._retry(state) or self._stop(state):
            self.gave_up += 1
            return None
        delay = self._wait(state)
        if self.respect_retry_after:
            asked = retry_after_of(error)
            if asked is not None:
                delay = min(asked, self.max_retry_after)
        if self.timeout is not None and elapsed + delay > self.timeout:
            self.gave_up += 1
            return None
        if self.budget is not None and not self.budget.try_retry():
            self.gave_up += 1
            return None
        self.retries += 1
        return delay

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` with retries. The success path costs one try block."""
        if self.budget is not None:
            self.budget.record_call()
        attempt = 1
        started = monotonic()
        while True:
            try:
                result = fn(*args, **kwargs)
                if hasattr(result, "__await__"):
                    result = await result
                return result
            except Exception as exc:
                delay = self.next_delay(exc, attempt, monotonic() - started)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorate an async function with this policy."""
        from functools import wraps

        @wraps(fn)
        async def retried(*args: Any, **kwargs: Any) -> Any:
            return await self.call(fn, *args, **kwargs)

        return retried

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"retries": self.retries, "gave_up": self.gave_up}
        if self.budget is not None:
            out["budget"] = self.budget.stats()
        return out
