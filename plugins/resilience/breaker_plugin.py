"""The `breaker` plugin: per-route circuit breakers for requests, and one breaker per
operation name for ``host.run(name, fn)``.

A route gets a breaker when a `[[routes]]` rule has a ``breaker`` table (rules
with the same `name` share one), or, with ``all_routes = true``, requests that
match no such rule share the breaker ``"default"``. A 5xx answer, an app
exception or a timeout (504) counts as a failure; 4xx answers are successes.
While a breaker is open, `before_request` answers 503 with ``Retry-After`` at
once, without calling the app. Only the app's own answers count (a cache hit
or another plugin's answer is neither a success nor a trial).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, ClassVar, Literal

from overdrive import Plugin, hookimpl
from overdrive.errors import ConfigError
from overdrive.metrics import MetricFamily as F
from overdrive.settings import merge_settings

from .breaker import CLOSED, CircuitBreaker, CircuitBreakerConfig, CircuitOpenError
from .common import REJECTED, check_operations, reject, route_name

__all__ = ["BreakerPlugin", "BreakerSettings"]

_CONFIG_FIELDS = (
    "failure_threshold",
    "recovery_timeout",
    "failure_rate_threshold",
    "sliding_window_type",
    "sliding_window_size",
    "minimum_number_of_calls",
    "slow_call_duration",
    "slow_call_rate_threshold",
    "half_open_max_calls",
    "initial_state",
    "redis_sync_interval",
    "redis_retry_interval",
    "half_open_stale_after",
)


@dataclass
class BreakerSettings:
    failure_threshold: int = 5
    recovery_timeout: float = 30.0
    failure_rate_threshold: float | None = None
    sliding_window_type: Literal["count", "time"] = "count"
    sliding_window_size: int | None = None
    minimum_number_of_calls: int = 10
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float = 100.0
    half_open_max_calls: int = 1
    initial_state: Literal["closed", "disabled", "metrics_only", "forced_open"] = "closed"
    shared: bool = False
    redis_url: str | None = None
    key_prefix: str = "overdrive:breaker:"
    redis_sync_interval: float = 0.25
    redis_retry_interval: float = 5.0
    half_open_stale_after: float = 300.0
    enabled: bool = True
    name: str | None = None
    all_routes: bool = False
    guard_operations: bool = True
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config()  # every threshold checked now, with the key in the message
        check_operations(self, "breaker")

    def config(self) -> CircuitBreakerConfig:
        kwargs = {name: getattr(self, name) for name in _CONFIG_FIELDS}
        if self.shared:
            kwargs["redis_url"] = self.redis_url
            kwargs["redis_key_prefix"] = self.key_prefix
        return CircuitBreakerConfig(**kwargs)


class BreakerPlugin(Plugin):
    """Circuit breakers for routes and operations; `host.circuit_breakers` lists them."""

    name = "breaker"
    metric_families = (
        F(
            "breaker_state",
            "gauge",
            "1 for the state each breaker is in",
            "*.state",
            labels=("breaker", "state"),
            states=("closed", "open", "half_open"),
        ),
        F(
            "breaker_calls",
            "counter",
            "Calls through the breaker",
            "*.total_calls",
            labels=("breaker",),
        ),
        F(
            "breaker_failures",
            "counter",
            "Calls through the breaker that failed",
            "*.total_failures",
            labels=("breaker",),
        ),
        F(
            "breaker_rejected_calls",
            "counter",
            "Calls refused while the breaker was open",
            "*.rejected_calls",
            labels=("breaker",),
        ),
        F("breaker_trips", "counter", "Times the breaker opened", "*.trips", labels=("breaker",)),
        F(
            "breaker_window_calls",
            "gauge",
            "Calls in the breaker's current window",
            "*.calls_in_window",
            labels=("breaker",),
        ),
        F(
            "breaker_window_failures",
            "gauge",
            "Failures in the breaker's current window",
            "*.failure_count",
            labels=("breaker",),
        ),
        F(
            "breaker_window_slow_calls",
            "gauge",
            "Slow calls in the breaker's current window",
            "*.slow_call_count",
            labels=("breaker",),
        ),
        F(
            "breaker_half_open_trial_calls",
            "gauge",
            "Trial calls in flight while half-open",
            "*.half_open_in_flight",
            labels=("breaker",),
        ),
        F(
            "breaker_last_state_change_timestamp_seconds",
            "gauge",
            "When the breaker last changed state (Unix time)",
            "*.last_state_change",
            unit="seconds",
            labels=("breaker",),
        ),
        F(
            "breaker_retry_after_seconds",
            "gauge",
            "Seconds until an open breaker lets a trial call through",
            "*.retry_after",
            unit="seconds",
            labels=("breaker",),
        ),
    )
    Settings = BreakerSettings
    provides: ClassVar[dict[str, str]] = {"circuit_breakers": "breakers"}

    def __init__(self, settings: BreakerSettings | None = None) -> None:
        super().__init__(settings)
        self.breakers: dict[str, CircuitBreaker] = {}
        self._by_policy: dict[Any, CircuitBreaker | None] = {}
        self._op_settings: dict[str, BreakerSettings] = {}
        self._redis_url: str | None = None

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: BreakerSettings = self.settings
        self._redis_url = s.redis_url or getattr(host, "redis_url", None)
        if s.shared and not self._redis_url:
            raise ConfigError(
                "breaker.shared: true needs breaker.redis_url or the host's redis_url"
            )
        for op, table in s.operations.items():
            self._op_settings[op] = merge_settings(s, table, f"breaker.operations.{op}")

    def _make(self, name: str, s: BreakerSettings) -> CircuitBreaker:
        breaker = self.breakers.get(name)
        if breaker is None:
            if s.shared and not s.redis_url:
                s = dataclasses.replace(s, redis_url=self._redis_url)
            breaker = CircuitBreaker(name, s.config())
            self.breakers[name] = breaker
        return breaker

    def _for_policy(self, policy: Any, s: BreakerSettings) -> CircuitBreaker | None:
        breaker: CircuitBreaker | None = None
        if s.enabled:
            name = s.name or route_name(policy, self.name)
            if name is None and self.settings.all_routes:
                name = "default"
            if name is not None:
                breaker = self._make(f"route:{name}", s)
        if len(self._by_policy) > 4096:
            self._by_policy.clear()
        self._by_policy[policy] = breaker
        return breaker

    # -- requests --------------------------------------------------------------------

    @hookimpl
    async def before_request(self, ctx: Any) -> Any:
        policy = ctx.policy
        try:
            breaker = self._by_policy[policy]
        except KeyError:
            breaker = self._for_policy(policy, ctx.settings(self.name))
        if breaker is None:
            return None
        if breaker._state == CLOSED and breaker._shared is None:
            trial = False
        else:
            try:
                trial = await breaker.acquire()
            except CircuitOpenError as exc:
                ctx.state[REJECTED] = self.name
                return reject(503, "Service Unavailable: circuit open", exc.retry_after)
        ctx.state[self.name] = (breaker, trial)
        return None

    @hookimpl
    async def after_request(self, ctx: Any) -> None:
        state = ctx._state
        if not state:
            return
        entry = state.get(self.name)
        if entry is None:
            return
        breaker, trial = entry
        if state.get(REJECTED) not in (None, self.name) or not ctx.t_app:
            # Another plugin answered (a rate limit, a cache hit, a collapsed follower):
            # not the app's outcome, so never a trial's verdict. Only the app's answers
            # may close a half-open breaker.
            breaker.release(trial)
            return
        status = ctx.status
        if status is None and ctx.error is None:
            breaker.release(trial)  # the client left before an answer
            return
        # an app exception or timeout is a failure even when a fallback (stale copy) answered
        failed = ctx.error is not None or (status is not None and status >= 500)
        await breaker.record(not failed, ctx.t_end - (ctx.t_app or ctx.t_start), trial)

    # -- operations ----------------------------------------------------------------------

    def _op_breaker(self, name: str) -> CircuitBreaker:
        breaker = self.breakers.get(f"op:{name}")
        if breaker is None:
            breaker = self._make(f"op:{name}", self._op_settings.get(name, self.settings))
        return breaker

    @hookimpl
    async def before_operation(self, op: Any) -> BaseException | None:
        if not self.settings.guard_operations:
            return None
        breaker = self._op_breaker(op.name)
        try:
            trial = await breaker.acquire()
        except CircuitOpenError as exc:
            return exc
        op.state[self.name] = (breaker, trial, perf_counter())
        return None

    @hookimpl(tryfirst=True)
    async def on_operation_failure(self, op: Any, error: BaseException) -> None:
        entry = op.state.pop(self.name, None)
        if entry is None:
            return None
        breaker, trial, t0 = entry
        verdict = breaker.classify(error)
        if verdict is None:
            breaker.release(trial)
        else:
            await breaker.record(not verdict, perf_counter() - t0, trial)
        return None

    @hookimpl
    async def after_operation(self, op: Any) -> None:
        entry = op.state.pop(self.name, None)
        if entry is None:
            return
        breaker, trial, t0 = entry
        if op.error is None:
            await breaker.record(True, perf_counter() - t0, trial)
        else:
            breaker.release(trial)  # cancelled, or refused by a plugin after us

    # -- system --------------------------------------------------------------------------

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        return {name: b.get_stats() for name, b in self.breakers.items()}

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        for breaker in self.breakers.values():
            if breaker._shared is not None:
                await breaker._shared.close()
