"""@overdrive.batch: concurrent single calls gathered into list calls."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import overdrive
import overdrive.plugins.batching as batching_mod
from overdrive.plugins.batching import BatchError, batch


def test_public_names() -> None:
    assert batching_mod.__all__ == ["BatchError", "Batcher", "batch"]
    assert overdrive.batch is batch


async def test_concurrent_calls_are_gathered_and_each_gets_its_own_result() -> None:
    calls: list[list[int]] = []

    @overdrive.batch(max_batch_size=8, max_wait_ms=50)
    async def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [i * 2 for i in items]

    results = await asyncio.gather(*(double(i) for i in range(20)))
    assert results == [i * 2 for i in range(20)]
    # 8 + 8 run when full; the last 4 run when the wait ends.
    assert [len(c) for c in calls] == [8, 8, 4]
    assert sorted(i for c in calls for i in c) == list(range(20))


async def test_a_lone_call_runs_after_max_wait() -> None:
    @batch(max_batch_size=64, max_wait_ms=1)
    async def echo(items: list[str]) -> list[str]:
        return items

    assert await asyncio.wait_for(echo("x"), 10) == "x"


async def test_bare_decorator_and_methods_with_a_queue_per_instance() -> None:
    class Model:
        def __init__(self, k: int) -> None:
            self.k = k
            self.batches: list[int] = []

        @batch
        async def predict(self, items: list[int]) -> list[int]:
            self.batches.append(len(items))
            return [i * self.k for i in items]

    a, b = Model(2), Model(3)
    out = await asyncio.gather(a.predict(1), b.predict(1), a.predict(5), b.predict(5))
    assert out == [2, 3, 10, 15]
    assert a.batches == [2] and b.batches == [2]


async def test_an_error_goes_back_to_every_caller_of_that_batch() -> None:
    @batch(max_batch_size=4, max_wait_ms=1000)
    async def broken(items: list[int]) -> list[int]:
        raise ValueError(f"model failed on {len(items)} items")

    results = await asyncio.gather(*(broken(i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert str(results[0]) == "model failed on 4 items"


async def test_a_per_item_exception_goes_to_that_caller_only() -> None:
    @batch(max_batch_size=3, max_wait_ms=1000)
    async def parse(items: list[str]) -> list[Any]:
        return [ValueError(f"bad: {s}") if not s.isdigit() else int(s) for s in items]

    results = await asyncio.gather(parse("1"), parse("x"), parse("3"), return_exceptions=True)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad: x"


async def test_wrong_length_is_a_clear_error() -> None:
    @batch(max_batch_size=2, max_wait_ms=1000)
    async def short(items: list[int]) -> list[int]:
        return items[:1]

    results = await asyncio.gather(short(1), short(2), return_exceptions=True)
    assert all(isinstance(r, BatchError) for r in results)
    assert "1 results for 2 items" in str(results[0])


async def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    seen: list[list[int]] = []

    @batch(max_batch_size=3, max_wait_ms=1000)
    async def slow(items: list[int]) -> list[int]:
        seen.append(list(items))
        started.set()
        await release.wait()
        return [i + 100 for i in items]

    # Cancelled while the batch runs: the others still get their results.
    tasks = [asyncio.create_task(slow(i)) for i in range(3)]
    await asyncio.wait_for(started.wait(), 10)
    tasks[1].cancel()
    release.set()
    assert await tasks[0] == 100 and await tasks[2] == 102
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]

    # Cancelled before the batch starts: it is dropped from the batch.
    release.clear()
    started.clear()
    early = [asyncio.create_task(slow(i)) for i in (7, 8)]
    await asyncio.sleep(0)
    early[0].cancel()
    await asyncio.sleep(0)
    last = asyncio.create_task(slow(9))  # fills the batch of 3 (the cancelled one is skipped)
    await asyncio.wait_for(started.wait(), 10)
    release.set()
    assert await early[1] == 108 and await last == 109
    assert seen[-1] == [8, 9]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        batch(max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        batch(max_wait_ms=-1)
    with pytest.raises(TypeError, match="async"):

        @batch
        def not_async(items: list[int]) -> list[int]:
            return items
