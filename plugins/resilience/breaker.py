"""`CircuitBreaker` and `CircuitBreakerConfig`: the seed's breaker, resilience4j-style.

Why our own: the Python breakers measured (pybreaker, purgatory, aiobreaker) have
no sliding window by time, no slow-call threshold and no operator states, and
cost 2 to 40 us per successful call; this one costs under 1 us (see
benchmarks/resilience.py). A successful call in the closed state touches one
ring-buffer slot and nothing else.

States: ``closed`` (calls pass and are recorded), ``open`` (calls are rejected
with `CircuitOpenError` until `recovery_timeout` has passed), ``half_open`` (at
most `half_open_max_calls` trial calls at once; they decide between closed and
open), and the operator states ``disabled`` (pass, record nothing),
``metrics_only`` (pass, record, never trip) and ``forced_open`` (reject all).
Shared state in Redis lives in `shared.py`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from functools import wraps
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any

import structlog

from overdrive.errors import OperationRefused
from overdrive.redact import plain_traceback

from .breaker_config import OPERATOR_STATES, CircuitBreakerConfig, _CountWindow, _TimeWindow

if TYPE_CHECKING:
    from .shared import SharedState

__all__ = ["CircuitBreaker", "CircuitBreakerConfig", "CircuitOpenError"]

logger = structlog.get_logger("overdrive.breaker")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
DISABLED = "disabled"
METRICS_ONLY = "metrics_only"
FORCED_OPEN = "forced_open"

# Outcome codes in the windows: bit 0 = failure, bit 1 = slow.
_OK, _FAIL, _SLOW = 0, 1, 2

Listener = Callable[["CircuitBreaker", str, str], Any]


class CircuitOpenError(OperationRefused):
    """The breaker refused the call (open, forced open, or half-open with no trial left)."""

    def __init__(self, name: str, state: str, retry_after: float | None) -> None:
        super().__init__(f"circuit breaker {name!r} is {state}", retry_after=retry_after)
        self.name = name
        self.state = state


class CircuitBreaker:
    """``await breaker.call(fn, *args)``; or ``@breaker`` on an async function.

    Local by default; with ``config.redis_url`` (or `shared=`), the state
    machine is shared by every worker through Redis (see `shared.py`).
    """

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig | None = None,
        *,
        shared: SharedState | None = None,
    ) -> None:
        self.name = name
        self.config = config = config or CircuitBreakerConfig()
        self._expected = config.expected_exception
        self._ignored = tuple(config.ignore_exceptions)
        self._slow_after = config.slow_call_duration
        self._window: _CountWindow | _TimeWindow = self._new_window()
        self._state: str = config.initial_state
        self._open_until = 0.0
        self._trials = 0  # half-open trial calls in flight
        self._trial_ok = 0
        self._trial_fail = 0
        self._listeners: list[Listener] = []
        self.trips = 0
        self.rejected_calls = 0
        self.total_calls = 0
        self.total_failures = 0
        self.last_state_change = time.time()
        if shared is None and config.redis_url:
            from .shared import SharedState

            shared = SharedState(config.redis_url, config.redis_key_prefix + name, config)
        self._shared = shared
        self._next_sync = 0.0 if shared is not None else math.inf
        self._syncing: asyncio.Future[None] | None = None

    def _new_window(self) -> _CountWindow | _TimeWindow:
        size = self.config.sliding_window_size or 1
        if self.config.sliding_window_type == "time":
            return _TimeWindow(size)
        return _CountWindow(size)

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The current state; an open breaker whose timeout passed reads ``half_open``."""
        if self._state == OPEN and monotonic() >= self._open_until:
            return HALF_OPEN
        return self._state

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(breaker, old_state, new_state)`` on every state change.

        A coroutine function is scheduled as a task; a listener that raises is ignored.
        """
        self._listeners.append(listener)

    def _transition(self, new: str, *, open_for: float | None = None) -> None:
        old = self._state
        if new == OPEN:
            self._open_until = monotonic() + (
                open_for if open_for is not None else self.config.recovery_timeout
            )
            if old != OPEN:
                self.trips += 1
        if new in (HALF_OPEN, OPEN, CLOSED):
            self._trials = self._trial_ok = self._trial_fail = 0
        if new == CLOSED and old != CLOSED:
            self._window = self._new_window()
        if old == new:
            return
        self._state = new
        self.last_state_change = time.time()
        for listener in self._listeners:
            try:
                result = listener(self, old, new)
                if asyncio.iscoroutine(result):
                    asyncio.get_running_loop().create_task(result)
            except Exception as exc:
                logger.error(
                    "breaker listener raised", breaker=self.name, traceback=plain_traceback(exc)
                )

    def force_open(self) -> None:
        """Operator: reject every call until `reset()`."""
        self._set_operator(FORCED_OPEN)

    def disable(self) -> None:
        """Operator: let every call through and record nothing."""
        self._set_operator(DISABLED)

    def metrics_only(self) -> None:
        """Operator: let every call through, record, never trip."""
        self._set_operator(METRICS_ONLY)

    def reset(self) -> None:
        """Back to closed with an empty window."""
        self._set_operator(CLOSED)
        self._window = self._new_window()

    def _set_operator(self, state: str) -> None:
        self._transition(state)
        if self._shared is not None:
            self._shared.schedule_force(state)

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a trial call through (0 when it would now)."""
        if self._state == FORCED_OPEN:
            return self.config.recovery_timeout
        return max(0.0, self._open_until - monotonic())

    # -- admission and recording (used by `call` and by the plugins) ----------------

    async def acquire(self) -> bool:
        """Admit one call or raise `CircuitOpenError`; True when it is a half-open trial.

        Every admitted call must end in `record` (or `release` when it ended
        without an outcome, for example cancelled).
        """
        if self._shared is not None and perf_counter() >= self._next_sync:
            await self._sync()
        state = self._state
        if state in (CLOSED, METRICS_ONLY, DISABLED):
            return False
        if state == FORCED_OPEN:
            self.rejected_calls += 1
            raise CircuitOpenError(self.name, FORCED_OPEN, self.config.recovery_timeout)
        if state == OPEN and monotonic() < self._open_until:
            self.rejected_calls += 1
            raise CircuitOpenError(self.name, OPEN, self.retry_after())
        if self._shared is not None and self._shared.healthy:
            return await self._shared_trial()
        return self._local_trial()

    def _local_trial(self) -> bool:
        """Half-open here: a strict bound on trial calls in flight (no await in it)."""
        if self._state == OPEN:
            self._transition(HALF_OPEN)
        if self._trials + self._trial_ok >= self.config.half_open_max_calls:
            self.rejected_calls += 1
            raise CircuitOpenError(self.name, HALF_OPEN, 1.0)
        self._trials += 1
        return True

    async def _shared_trial(self) -> bool:
        assert self._shared is not None
        verdict, open_for = await self._shared.try_trial(
            self.config.half_open_max_calls, self.config.half_open_stale_after
        )
        if verdict is None:  # Redis failed just now: decide locally
            return self._local_trial()
        if verdict == "granted":
            if self._state != HALF_OPEN:
                self._transition(HALF_OPEN)
            self._trials += 1
            return True
        if verdict == "open":
            if self._state != OPEN:
                self._transition(OPEN, open_for=open_for)
            else:
                self._open_until = monotonic() + open_for
            self.rejected_calls += 1
            raise CircuitOpenError(self.name, OPEN, open_for)
        if verdict == "denied":
            self.rejected_calls += 1
            raise CircuitOpenError(self.name, HALF_OPEN, 1.0)
        # another worker closed it, or an operator set a state
        self._transition(verdict)
        if verdict == FORCED_OPEN:
            self.rejected_calls += 1
            raise CircuitOpenError(self.name, FORCED_OPEN, self.config.recovery_timeout)
        return False

    def release(self, trial: bool) -> None:
        """An admitted call ended without an outcome (cancelled, ignored exception)."""
        if trial and self._trials > 0:
            self._trials -= 1
            if self._shared is not None:
                self._shared.schedule_release()

    async def record(self, ok: bool, duration: float, trial: bool) -> None:
        """Record the outcome of an admitted call."""
        self.total_calls += 1
        if not ok:
            self.total_failures += 1
        if trial:
            await self._record_trial(ok)
            return
        state = self._state
        if state == DISABLED:
            return
        slow = self._slow_after is not None and duration >= self._slow_after
        code = (_OK if ok else _FAIL) | (_SLOW if slow else 0)
        self._window.add(code)
        if code and state == CLOSED and self._should_trip():
            self._transition(OPEN)
            if self._shared is not None:
                await self._shared.trip(self.config.recovery_timeout)

    async def _record_trial(self, ok: bool) -> None:
        self._trials = max(0, self._trials - 1)
        if self._state != HALF_OPEN:
            return
        if ok:
            self._trial_ok += 1
        else:
            self._trial_fail += 1
        shared = self._shared
        if shared is not None and shared.healthy:
            verdict = await shared.trial_result(
                ok, self.config.recovery_timeout, self.config.half_open_max_calls
            )
            if verdict == OPEN:
                self._transition(OPEN)
            elif verdict == CLOSED:
                self._transition(CLOSED)
            if verdict is not None:
                return
        if not ok:
            self._transition(OPEN)
        elif self._trial_ok >= self.config.half_open_max_calls:
            self._transition(CLOSED)

    def _should_trip(self) -> bool:
        w = self._window
        cfg = self.config
        if isinstance(w, _TimeWindow):
            w.refresh()
        rate = cfg.failure_rate_threshold
        if rate is None:
            if w.failures >= cfg.failure_threshold:
                return True
        elif w.calls >= cfg.minimum_number_of_calls and w.failures * 100 >= rate * w.calls:
            return True
        return (
            self._slow_after is not None
            and w.calls >= cfg.minimum_number_of_calls
            and w.slow * 100 >= cfg.slow_call_rate_threshold * w.calls
        )

    def classify(self, error: BaseException) -> bool | None:
        """True: a failure; False: a success (an exception not expected); None: ignored."""
        if self._ignored and isinstance(error, self._ignored):
            return None
        if not isinstance(error, Exception):
            return None  # cancellation, KeyboardInterrupt: no outcome
        return isinstance(error, self._expected)

    async def _sync(self) -> None:
        """Read the shared state; callers arriving meanwhile wait for the same read."""
        pending = self._syncing
        if pending is not None:
            await asyncio.shield(pending)
            return
        shared = self._shared
        assert shared is not None
        done = self._syncing = asyncio.get_running_loop().create_future()
        self._next_sync = 0.0  # the fast path stays closed to others until the read is back
        try:
            remote = await shared.read()
            if remote is not None:
                self._apply_remote(*remote)
        finally:
            self._next_sync = perf_counter() + self.config.redis_sync_interval
            self._syncing = None
            done.set_result(None)

    def _apply_remote(self, state: str, open_for: float) -> None:
        if state == OPEN and self._state != OPEN:
            self._transition(OPEN, open_for=open_for)
        elif state == OPEN:
            self._open_until = monotonic() + open_for
        elif state == HALF_OPEN and self._state not in (HALF_OPEN, OPEN):
            self._transition(OPEN, open_for=0.0)
        elif state != self._state and state in OPERATOR_STATES:
            self._transition(state)

    # -- calling -----------------------------------------------------------------------

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` (sync or async) through the breaker."""
        if self._state == CLOSED and (self._shared is None or perf_counter() < self._next_sync):
            trial = False  # the fast path: no await before the call
        else:
            trial = await self.acquire()
        t0 = perf_counter()
        try:
            result = fn(*args, **kwargs)
            if hasattr(result, "__await__"):
                result = await result
        except BaseException as exc:
            verdict = self.classify(exc)
            if verdict is None:
                self.release(trial)
            else:
                await self.record(not verdict, perf_counter() - t0, trial)
            raise
        if trial or self._slow_after is not None or self._state != CLOSED:
            await self.record(True, perf_counter() - t0, trial)
        else:
            self.total_calls += 1
            self._window.add(_OK)
        return result

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Use the breaker as a decorator of an async (or sync) function."""

        @wraps(fn)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            return await self.call(fn, *args, **kwargs)

        return guarded

    decorate = __call__

    # -- stats -------------------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        w = self._window
        if isinstance(w, _TimeWindow):
            w.refresh()
        calls = w.calls
        stats: dict[str, Any] = {
            "name": self.name,
            "state": self.state,
            "failure_count": w.failures,
            "success_count": calls - w.failures,
            "slow_call_count": w.slow,
            "calls_in_window": calls,
            "failure_rate": round(100.0 * w.failures / calls, 2) if calls else 0.0,
            "slow_call_rate": round(100.0 * w.slow / calls, 2) if calls else 0.0,
            "trips": self.trips,
            "rejected_calls": self.rejected_calls,
            "total_calls": self.total_calls,
            "total_failures": self.total_failures,
            "half_open_in_flight": self._trials,
            "last_state_change": self.last_state_change,
            "retry_after": round(self.retry_after(), 3) if self._state == OPEN else 0.0,
            "backend": "local",
        }
        if self._shared is not None:
            stats.update(self._shared.stats())
        return stats
