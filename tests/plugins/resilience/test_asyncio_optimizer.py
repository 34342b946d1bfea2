"""AsyncIOOptimizer: the seed's snippets, as written."""

from __future__ import annotations

import asyncio

import pytest

from overdrive import ConfigError
from overdrive.plugins import resilience
from overdrive.plugins.resilience import AsyncIOOptimizer


def test_public_names_are_sorted_and_pinned() -> None:
    assert resilience.__all__ == sorted(resilience.__all__)
    assert resilience.__all__ == [
        "AIMDController",
        "AsyncIOOptimizer",
        "BatchResults",
        "BreakerPlugin",
        "BreakerSettings",
        "CircuitBreaker",
        "CircuitBreakerConfig",
        "CircuitOpenError",
        "ConcurrencyLimiter",
        "ConcurrencyPlugin",
        "ConcurrencySettings",
        "GradientController",
        "RateLimitPlugin",
        "RateLimitSettings",
        "RateLimiter",
        "RetryBudget",
        "RetryPlugin",
        "RetryPolicy",
        "RetrySettings",
        "ScalingConfig",
        "ScalingController",
        "Shed",
        "TimeoutPlugin",
        "TimeoutSettings",
    ]


async def process_video(video_id: str) -> str:
    await asyncio.sleep(0.001 * (5 - int(video_id[-1])))  # later items finish first
    if video_id == "v3":
        raise ValueError("corrupt")
    return f"done-{video_id}"


async def test_batch_keeps_input_order_and_collects_errors() -> None:
    optimizer = AsyncIOOptimizer(max_concurrent=10)

    async def process_videos(video_ids: list[str]) -> list[str]:
        async def process_single(video_id: str) -> str:
            return await process_video(video_id)

        return await optimizer.batch_process_async(video_ids, process_single)

    results = await process_videos(["v1", "v2", "v3", "v4"])
    assert results[:2] == ["done-v1", "done-v2"]
    assert isinstance(results[2], ValueError)
    assert results[3] == "done-v4"
    assert [i for i, _ in results.errors] == [2]  # type: ignore[attr-defined]
    assert optimizer.get_stats()["failed"] == 1


async def test_batch_bounds_concurrency() -> None:
    optimizer = AsyncIOOptimizer(max_concurrent=3)
    running = peak = 0

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        running -= 1
        return i * i

    assert await optimizer.batch_process_async(range(20), work) == [i * i for i in range(20)]
    assert peak == 3


async def test_process_with_timeout() -> None:
    optimizer = AsyncIOOptimizer()

    async def expensive_operation() -> str:
        return "result"

    assert await optimizer.process_with_timeout(expensive_operation, timeout=30.0) == "result"

    cancelled = False

    async def too_slow() -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled = True
            raise

    with pytest.raises(TimeoutError):
        await optimizer.process_with_timeout(too_slow, timeout=0.01)
    assert cancelled
    assert optimizer.get_stats()["timeouts"] == 1


async def test_retry_with_backoff_as_in_the_seed() -> None:
    optimizer = AsyncIOOptimizer()
    calls = 0

    async def external_api_call() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("flaky")
        return "payload"

    result = await optimizer.retry_with_backoff(
        lambda: external_api_call(), max_retries=3, base_delay=0.001
    )
    assert result == "payload"
    assert calls == 3

    calls = -100
    with pytest.raises(ConnectionError):
        await optimizer.retry_with_backoff(external_api_call, max_retries=2, base_delay=0.001)
    assert calls == -97  # one call and two retries


def test_bad_max_concurrent() -> None:
    with pytest.raises(ConfigError, match="max_concurrent"):
        AsyncIOOptimizer(max_concurrent=0)
