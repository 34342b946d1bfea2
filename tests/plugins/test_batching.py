"""@overdrive.batch: concurrent single calls gathered into list calls, on asyncio and trio."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import overdrive
import overdrive.plugins.batching as batching_mod
from overdrive.plugins.batching import BatchError, batch

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def gather(*calls: Any) -> list[Any]:
    """Run the awaitables concurrently, in order; each result, or the exception it raised."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int, call: Any) -> None:
        try:
            results[i] = await call
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            tg.start_soon(one, i, call)
    return results


def test_public_names() -> None:
    assert batching_mod.__all__ == ["BatchError", "Batcher", "batch"]
    assert overdrive.batch is batch


async def test_concurrent_calls_are_gathered_and_each_gets_its_own_result() -> None:
    calls: list[list[int]] = []

    @overdrive.batch(max_batch_size=8, max_wait_ms=50)
    async def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [i * 2 for i in items]

    results = await gather(*(double(i) for i in range(20)))
    assert results == [i * 2 for i in range(20)]
    # The callers that are ready join the first batch; 8 + 8, then the last 4.
    assert [len(c) for c in calls] == [8, 8, 4]
    assert sorted(i for c in calls for i in c) == list(range(20))


async def test_a_lone_call_waits_for_no_company() -> None:
    # max_wait_ms of a minute: a call that arrives to an idle model runs at once.
    @batch(max_batch_size=64, max_wait_ms=60_000)
    async def echo(items: list[str]) -> list[str]:
        return items

    with anyio.fail_after(10):
        assert await echo("x") == "x"
        assert await echo("y") == "y"
    assert next(iter(echo.batchers().values())).batches == 2


async def test_calls_that_arrive_while_a_batch_runs_form_the_next_batch() -> None:
    release = anyio.Event()
    running = anyio.Event()
    seen: list[list[int]] = []

    @batch(max_batch_size=64, max_wait_ms=60_000)
    async def slow(items: list[int]) -> list[int]:
        seen.append(list(items))
        running.set()
        if len(seen) == 1:
            await release.wait()
        return [i + 1 for i in items]

    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await slow(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 0)
        await running.wait()
        for i in range(1, 11):
            tg.start_soon(call, i)
        await anyio.wait_all_tasks_blocked()
        assert seen == [[0]]  # one batch at a time: the ten queue behind it
        release.set()
    assert seen == [[0], list(range(1, 11))]
    assert results == {i: i + 1 for i in range(11)}


async def test_max_concurrency_lets_batches_overlap() -> None:
    release = anyio.Event()
    in_flight = 0
    most = 0

    @batch(max_batch_size=2, max_wait_ms=0, max_concurrency=2)
    async def overlapped(items: list[int]) -> list[int]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return items

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(overlapped, i)
        await anyio.wait_all_tasks_blocked()
        assert most == 2
        release.set()
    assert most == 2


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
    out = await gather(a.predict(1), b.predict(1), a.predict(5), b.predict(5))
    assert out == [2, 3, 10, 15]
    assert a.batches == [2] and b.batches == [2]


async def test_an_error_goes_back_to_every_caller_of_that_batch() -> None:
    @batch(max_batch_size=4, max_wait_ms=1000)
    async def broken(items: list[int]) -> list[int]:
        raise ValueError(f"model failed on {len(items)} items")

    results = await gather(*(broken(i) for i in range(4)))
    assert all(isinstance(r, ValueError) for r in results)
    assert str(results[0]) == "model failed on 4 items"


async def test_a_per_item_exception_goes_to_that_caller_only() -> None:
    @batch(max_batch_size=3, max_wait_ms=1000)
    async def parse(items: list[str]) -> list[Any]:
        return [ValueError(f"bad: {s}") if not s.isdigit() else int(s) for s in items]

    results = await gather(parse("1"), parse("x"), parse("3"))
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad: x"


async def test_none_is_a_result_like_any_other() -> None:
    @batch(max_batch_size=2, max_wait_ms=1000)
    async def nothing(items: list[int]) -> list[None]:
        return [None for _ in items]

    assert await gather(nothing(1), nothing(2)) == [None, None]


async def test_wrong_length_is_a_clear_error() -> None:
    @batch(max_batch_size=2, max_wait_ms=1000)
    async def short(items: list[int]) -> list[int]:
        return items[:1]

    results = await gather(short(1), short(2))
    assert all(isinstance(r, BatchError) for r in results)
    assert "1 results for 2 items" in str(results[0])


async def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    started = anyio.Event()
    release = anyio.Event()
    seen: list[list[int]] = []

    @batch(max_batch_size=3, max_wait_ms=1000)
    async def slow(items: list[int]) -> list[int]:
        seen.append(list(items))
        started.set()
        await release.wait()
        return [i + 100 for i in items]

    results: dict[int, int] = {}

    async def call(i: int, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            results[i] = await slow(i)

    # The leader (0) is cancelled while its batch runs: the others still get theirs.
    leader = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 0, leader)
        tg.start_soon(call, 1)
        tg.start_soon(call, 2)
        await started.wait()
        leader.cancel()
        release.set()
    assert seen == [[0, 1, 2]]
    assert results == {1: 101, 2: 102}

    # Cancelled while queued behind a running batch: it is dropped from the next one.
    started, release, results = anyio.Event(), anyio.Event(), {}
    seen.clear()
    queued = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 6)
        await started.wait()
        tg.start_soon(call, 7, queued)
        tg.start_soon(call, 8)
        await anyio.wait_all_tasks_blocked()
        queued.cancel()
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert seen == [[6], [8]]
    assert results == {6: 106, 8: 108}


async def test_a_cancelled_caller_whose_turn_it_was_hands_the_turn_on() -> None:
    first_done = anyio.Event()
    seen: list[list[int]] = []
    gate = anyio.Event()

    @batch(max_batch_size=8, max_wait_ms=1000)
    async def model(items: list[int]) -> list[int]:
        seen.append(list(items))
        if len(seen) == 1:
            await gate.wait()
        return items

    results: dict[int, int] = {}
    scopes = {i: anyio.CancelScope() for i in range(3)}

    async def call(i: int) -> None:
        with scopes[i]:
            results[i] = await model(i)
            if i == 0:
                first_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 0)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(call, 1)
        tg.start_soon(call, 2)
        await anyio.wait_all_tasks_blocked()
        # The batch ends and hands the slot to caller 1, which is cancelled before it
        # wakes: caller 2 must still be served.
        gate.set()
        scopes[1].cancel()
    assert results[0] == 0 and results[2] == 2 and 1 not in results
    assert seen[-1] == [2]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        batch(max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        batch(max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_wait_ms"):
        batch(max_wait_ms=float("inf"))
    with pytest.raises(ValueError, match="max_concurrency"):
        batch(max_concurrency=0)
    with pytest.raises(TypeError, match="async"):

        @batch
        def not_async(items: list[int]) -> list[int]:
            return items
