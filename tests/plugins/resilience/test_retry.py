"""Retries: the policy (tenacity strategies), the budget, the `retry` plugin on host.run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from overdrive import ConfigError, Overdrive
from overdrive.contrib.testing import check_plugin, make_host
from overdrive.errors import OperationRefused
from overdrive.plugins.resilience import RetryBudget, RetryPlugin, RetryPolicy
from overdrive.plugins.resilience.retry import retry_after_of


class Flaky:
    def __init__(self, failures: int, exc: type[BaseException] = ConnectionError) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc("not yet")
        return "done"


def fast(**kw: Any) -> RetryPolicy:
    return RetryPolicy(wait_initial=0, wait_max=0, **kw)


def test_check_plugin() -> None:
    check_plugin(RetryPlugin)


async def test_retries_until_success() -> None:
    fn = Flaky(2)
    assert await fast(attempts=3).call(fn) == "done"
    assert fn.calls == 3


async def test_gives_up_after_attempts_and_raises_the_last_error() -> None:
    fn = Flaky(10)
    with pytest.raises(ConnectionError):
        await fast(attempts=4).call(fn)
    assert fn.calls == 4


async def test_only_named_exceptions_are_retried() -> None:
    fn = Flaky(1, ValueError)
    with pytest.raises(ValueError):
        await fast(attempts=5, on=(ConnectionError,)).call(fn)
    assert fn.calls == 1


async def test_cancellation_is_never_retried() -> None:
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(10)

    task = asyncio.ensure_future(fast(attempts=5, on=(Exception,)).call(slow))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
    assert fast().next_delay(asyncio.CancelledError(), 1, 0.0) is None


def test_full_jitter_stays_within_the_exponential_bound() -> None:
    policy = RetryPolicy(attempts=10, wait_initial=0.1, wait_max=1.0, timeout=None)
    for attempt in range(1, 8):
        bound = min(1.0, 0.1 * 2 ** (attempt - 1))
        delays = [policy.next_delay(ConnectionError(), attempt, 0.0) for _ in range(50)]
        assert all(d is not None and 0 <= d <= bound for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_total_time_bound() -> None:
    policy = RetryPolicy(attempts=100, timeout=1.0, wait_initial=0.1, wait_max=0.1)
    assert policy.next_delay(ConnectionError(), 2, 0.5) is not None
    assert policy.next_delay(ConnectionError(), 2, 1.5) is None


def test_retry_after_is_honoured() -> None:
    class Throttled(ConnectionError):
        @property
        def headers(self) -> dict[str, str]:
            return {"Retry-After": "7"}

    policy = RetryPolicy(attempts=3, timeout=None, wait_initial=0.01, wait_max=0.01)
    assert policy.next_delay(Throttled(), 1, 0.0) == 7.0
    assert retry_after_of(OperationRefused("x", retry_after=3)) == 3.0
    assert retry_after_of(ValueError()) is None
    assert retry_after_of(type("E", (Exception,), {"headers": {"retry-after": "soon"}})()) is None


def test_budget_caps_retries_as_a_share_of_calls() -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=0.1, window=10)  # floor: 1 retry
    for _ in range(100):
        budget.record_call()
    allowed = sum(budget.try_retry() for _ in range(50))
    assert allowed == 10
    assert budget.refused == 40


async def test_plugin_retries_operations_within_budget() -> None:
    host = make_host(
        RetryPlugin(),
        config={"retry": {"attempts": 3, "wait_initial": 0, "wait_max": 0}},
    )
    fn = Flaky(2)
    assert await host.run("api", fn) == "done"
    assert fn.calls == 3
    stats = (await host.get_system_stats())["retry"]
    assert stats["budget"]["retries"] == 2


async def test_plugin_per_operation_policy_and_names() -> None:
    host = make_host(
        RetryPlugin(),
        config={
            "retry": {
                "wait_initial": 0,
                "wait_max": 0,
                "operations": {"db": {"attempts": 5, "on": ["builtins.LookupError"]}},
            }
        },
    )
    fn = Flaky(3, KeyError)
    assert await host.run("db", fn) == "done"
    fn = Flaky(3, KeyError)
    with pytest.raises(KeyError):
        await host.run("api", fn)
    assert fn.calls == 1


async def test_budget_stops_a_retry_storm() -> None:
    host = make_host(
        RetryPlugin(),
        config={
            "retry": {
                "attempts": 10,
                "wait_initial": 0,
                "wait_max": 0,
                "budget_ratio": 0.1,
                "budget_min_per_second": 0.1,
            }
        },
    )
    total = 0

    async def down() -> None:
        nonlocal total
        total += 1
        raise ConnectionError

    for _ in range(20):
        with pytest.raises(ConnectionError):
            await host.run("api", down)
    assert total <= 20 + 2  # 20 calls, retries capped at 10% of them


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"attempts": 0}, "retry.attempts"),
        ({"timeout": -1}, "retry.timeout"),
        ({"wait_initial": 2, "wait_max": 1}, "retry.wait_max"),
        ({"on": ["NoSuchError"]}, "retry.on"),
        ({"on": ["CancelledError"]}, "retry.on"),
        ({"budget_ratio": -0.5}, "retry.budget_ratio"),
        ({"operations": {"db": {"attempts": -1}}}, "retry.operations.db"),
    ],
)
def test_nonsense_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Overdrive({"plugins": ["retry"], "retry": table}, env={})
