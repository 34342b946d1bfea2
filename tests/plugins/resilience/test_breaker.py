"""CircuitBreaker on its own: the seed's snippet, windows, half-open bounds, operator states."""

from __future__ import annotations

import asyncio

import pytest

from overdrive import ConfigError
from overdrive.plugins.resilience import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError
from overdrive.plugins.resilience import breaker as breaker_module


async def fail(exc: BaseException | None = None) -> None:
    raise exc or ConnectionError("down")


async def ok() -> str:
    return "ok"


async def trip(b: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(ConnectionError):
            await b.call(fail)


def test_public_names_pinned() -> None:
    assert breaker_module.__all__ == sorted(breaker_module.__all__)
    assert "CircuitBreaker" in breaker_module.__all__


async def test_seed_snippet_opens_after_failure_threshold() -> None:
    config = CircuitBreakerConfig(
        failure_threshold=5, recovery_timeout=60.0, expected_exception=ConnectionError
    )
    api_circuit_breaker = CircuitBreaker("external_api", config)
    assert await api_circuit_breaker.call(lambda: ok()) == "ok"
    await trip(api_circuit_breaker, 5)
    stats = api_circuit_breaker.get_stats()
    assert stats["state"] == "open"
    assert stats["failure_count"] == 5
    assert stats["trips"] == 1
    called = []
    with pytest.raises(CircuitOpenError) as info:
        await api_circuit_breaker.call(lambda: called.append(1))
    assert not called
    assert 0 < info.value.retry_after <= 60
    assert api_circuit_breaker.get_stats()["rejected_calls"] == 1


async def test_unexpected_exceptions_do_not_count_as_failures() -> None:
    b = CircuitBreaker("x", CircuitBreakerConfig(failure_threshold=2, expected_exception=OSError))
    for _ in range(5):
        with pytest.raises(ValueError):
            await b.call(fail, ValueError("bad input"))
    assert b.state == "closed"
    assert b.get_stats()["failure_count"] == 0


async def test_ignored_exceptions_and_cancellation_are_no_outcome() -> None:
    b = CircuitBreaker(
        "x", CircuitBreakerConfig(failure_threshold=1, ignore_exceptions=(KeyError,))
    )
    with pytest.raises(KeyError):
        await b.call(fail, KeyError("k"))
    task = asyncio.ensure_future(b.call(asyncio.sleep, 10))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.state == "closed"
    assert b.get_stats()["calls_in_window"] == 0


async def test_failure_rate_needs_minimum_calls() -> None:
    cfg = CircuitBreakerConfig(
        failure_rate_threshold=50, sliding_window_size=10, minimum_number_of_calls=4
    )
    b = CircuitBreaker("rate", cfg)
    await trip(b, 3)  # 100% failures but only 3 calls
    assert b.state == "closed"
    await b.call(ok)
    assert b.state == "closed"  # 3/4 = 75% but the success cannot trip it
    with pytest.raises(ConnectionError):
        await b.call(fail)
    assert b.state == "open"
    assert b.get_stats()["failure_rate"] == 80.0


async def test_count_window_forgets_old_failures() -> None:
    b = CircuitBreaker("w", CircuitBreakerConfig(failure_threshold=3, sliding_window_size=4))
    await trip(b, 2)
    for _ in range(4):
        await b.call(ok)
    await trip(b, 2)
    assert b.state == "closed"
    assert b.get_stats()["failure_count"] == 2


async def test_time_window_counts_recent_calls() -> None:
    cfg = CircuitBreakerConfig(
        failure_rate_threshold=50,
        sliding_window_type="time",
        sliding_window_size=30,
        minimum_number_of_calls=2,
    )
    b = CircuitBreaker("t", cfg)
    await b.call(ok)
    await trip(b, 1)
    assert b.state == "open"
    assert b.get_stats()["calls_in_window"] == 2


async def test_slow_calls_trip_the_breaker() -> None:
    cfg = CircuitBreakerConfig(
        slow_call_duration=0.001, slow_call_rate_threshold=50, minimum_number_of_calls=2
    )
    b = CircuitBreaker("slow", cfg)
    await b.call(asyncio.sleep, 0.01)
    await b.call(asyncio.sleep, 0.01)
    assert b.state == "open"
    assert b.get_stats()["slow_call_count"] == 2


async def test_half_open_closes_after_successful_trials() -> None:
    b = CircuitBreaker(
        "h", CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.02, half_open_max_calls=2)
    )
    await trip(b, 1)
    assert b.state == "open"
    await asyncio.sleep(0.03)
    assert b.state == "half_open"
    await b.call(ok)
    assert b.get_stats()["state"] == "half_open"
    await b.call(ok)
    assert b.state == "closed"


async def test_half_open_failure_reopens() -> None:
    b = CircuitBreaker("h", CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.02))
    await trip(b, 1)
    await asyncio.sleep(0.03)
    await trip(b, 1)
    assert b.state == "open"
    assert b.trips == 2


async def test_half_open_race_never_exceeds_permitted_calls() -> None:
    permitted = 3
    b = CircuitBreaker(
        "race",
        CircuitBreakerConfig(
            failure_threshold=1, recovery_timeout=0.01, half_open_max_calls=permitted
        ),
    )
    await trip(b, 1)
    await asyncio.sleep(0.02)
    gate = asyncio.Event()
    running = 0
    peak = 0
    entered = 0

    async def trial() -> str:
        nonlocal running, peak, entered
        entered += 1
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return "ok"

    tasks = [asyncio.ensure_future(b.call(trial)) for _ in range(300)]
    for _ in range(500):
        if sum(t.done() for t in tasks) + entered >= len(tasks):
            break
        await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert entered == permitted
    assert peak == permitted
    assert sum(r == "ok" for r in results) == permitted
    assert all(isinstance(r, CircuitOpenError) for r in results if r != "ok")
    assert b.state == "closed"


async def test_operator_states() -> None:
    b = CircuitBreaker("op", CircuitBreakerConfig(failure_threshold=1))
    b.force_open()
    with pytest.raises(CircuitOpenError):
        await b.call(ok)
    b.disable()
    await trip(b, 3)
    assert b.state == "disabled"
    b.metrics_only()
    await trip(b, 3)
    assert b.state == "metrics_only"
    assert b.get_stats()["failure_count"] == 1  # window size 1
    b.reset()
    assert b.state == "closed"
    assert await b.call(ok) == "ok"


async def test_listeners_and_decorator() -> None:
    seen: list[tuple[str, str]] = []
    b = CircuitBreaker("dec", CircuitBreakerConfig(failure_threshold=2))
    b.add_listener(lambda br, old, new: seen.append((old, new)))

    @b
    async def flaky(fail_it: bool) -> str:
        if fail_it:
            raise ConnectionError
        return "fine"

    assert await flaky(False) == "fine"
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await flaky(True)
    assert seen == [("closed", "open")]
    assert flaky.__name__ == "flaky"


async def test_sync_functions_are_called_too() -> None:
    b = CircuitBreaker("sync")
    assert await b.call(lambda x: x * 2, 21) == 42


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"recovery_timeout": -1}, "recovery_timeout"),
        ({"failure_rate_threshold": 150}, "failure_rate_threshold"),
        ({"sliding_window_size": 0}, "sliding_window_size"),
        ({"minimum_number_of_calls": 0}, "minimum_number_of_calls"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"slow_call_duration": 0}, "slow_call_duration"),
        ({"failure_threshold": 10, "sliding_window_size": 5}, "sliding_window_size"),
    ],
)
def test_nonsense_config_names_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        CircuitBreakerConfig(**kwargs)  # type: ignore[arg-type]
