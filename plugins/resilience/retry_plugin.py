"""The `retry` plugin: retries for operations run through ``host.run(name, fn)``.

Never for HTTP requests (a request's body cannot be replayed, and the client
can retry with better knowledge). The host owns the loop: `on_operation_failure`
answers a delay from `RetryPolicy` (tenacity's strategies, stamina's defaults)
or None to give up; a `RetryBudget` shared by all operations caps retries at a
share of recent calls, as Envoy's ``retry_budget`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overdrive import Plugin, hookimpl
from overdrive.metrics import MetricFamily as F
from overdrive.settings import merge_settings

from .common import check_operations
from .retry import RetryBudget, RetryPolicy, resolve_exceptions

__all__ = ["RetryPlugin", "RetrySettings"]


@dataclass
class RetrySettings:
    attempts: int = 3
    timeout: float | None = 45.0
    wait_initial: float = 0.1
    wait_max: float = 5.0
    wait_exp_base: float = 2.0
    on: list[str] = field(default_factory=lambda: ["ConnectionError", "TimeoutError"])
    respect_retry_after: bool = True
    max_retry_after: float = 60.0
    budget_ratio: float = 0.2
    budget_min_per_second: float = 10.0
    budget_window: int = 10
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.policy(None)  # validates every field, naming the key
        RetryBudget(self.budget_ratio, self.budget_min_per_second, self.budget_window)
        check_operations(self, "retry")

    def policy(self, budget: RetryBudget | None, where: str = "retry") -> RetryPolicy:
        return RetryPolicy(
            attempts=self.attempts,
            timeout=self.timeout,
            wait_initial=self.wait_initial,
            wait_max=self.wait_max,
            wait_exp_base=self.wait_exp_base,
            on=resolve_exceptions(self.on, f"{where}.on"),
            respect_retry_after=self.respect_retry_after,
            max_retry_after=self.max_retry_after,
            budget=budget,
            where=where,
        )


class RetryPlugin(Plugin):
    name = "retry"
    metric_families = (
        F(
            "retry_retries",
            "counter",
            "Retries made, per operation",
            "*~budget.retries",
            labels=("operation",),
        ),
        F(
            "retry_exhausted_calls",
            "counter",
            "Calls that failed after their last try, per operation",
            "*~budget.gave_up",
            labels=("operation",),
        ),
        F("retry_budget_calls", "counter", "Calls the retry budget counted", "budget.calls"),
        F("retry_budget_retries", "counter", "Retries the retry budget allowed", "budget.retries"),
        F(
            "retry_budget_refused_retries",
            "counter",
            "Retries refused because the budget was spent",
            "budget.refused",
        ),
    )
    Settings = RetrySettings

    def __init__(self, settings: RetrySettings | None = None) -> None:
        super().__init__(settings)
        self.budget: RetryBudget | None = None
        self.policies: dict[str, RetryPolicy] = {}
        self._default: RetryPolicy | None = None

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: RetrySettings = self.settings
        self.budget = RetryBudget(s.budget_ratio, s.budget_min_per_second, s.budget_window)
        self._default = s.policy(self.budget)
        for op, table in s.operations.items():
            where = f"retry.operations.{op}"
            self.policies[op] = merge_settings(s, table, where).policy(self.budget, where)

    @hookimpl
    def before_operation(self, op: Any) -> None:
        if op.attempt == 1 and self.budget is not None:
            self.budget.record_call()

    @hookimpl
    def on_operation_failure(self, op: Any, error: BaseException) -> float | None:
        policy = self.policies.get(op.name, self._default)
        if policy is None:
            return None
        from time import perf_counter

        return policy.next_delay(error, op.attempt, perf_counter() - op.started)

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"default": self._default.stats() if self._default else {}}
        for op, policy in self.policies.items():
            out[op] = policy.stats()
        if self.budget is not None:
            out["budget"] = self.budget.stats()
        return out
