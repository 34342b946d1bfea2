"""LazyLoader / LazyDict: one load for concurrent callers, failures not kept, reset."""

from __future__ import annotations

import asyncio
import threading

import pytest

from overdrive.plugins.models import LazyDict, LazyLoader, LoadError


async def test_concurrent_callers_share_one_load() -> None:
    calls = 0
    gate = asyncio.Event()

    async def load() -> dict[str, int]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return {"weights": 42}

    lazy = LazyLoader(load)
    waiters = [asyncio.create_task(lazy.get()) for _ in range(20)]
    await asyncio.sleep(0)
    assert lazy.loading and not lazy.loaded
    gate.set()
    results = await asyncio.gather(*waiters)
    assert calls == 1
    assert all(r is results[0] for r in results)
    assert await lazy.get() is results[0]
    assert calls == 1
    assert lazy.load_time is not None and lazy.load_time >= 0
    assert lazy.value == {"weights": 42}


async def test_sync_loader_runs_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def load() -> str:
        seen.append(threading.get_ident())
        return "model"

    lazy = LazyLoader(load)
    assert await lazy.get() == "model"
    assert seen and seen[0] != loop_thread


async def test_failed_load_is_not_cached_and_all_waiters_get_the_error() -> None:
    attempts = 0
    gate = asyncio.Event()

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        await gate.wait()
        if attempts == 1:
            raise ConnectionError("weights server down")
        return "ok"

    lazy = LazyLoader(flaky)
    waiters = [asyncio.create_task(lazy.get()) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert not lazy.loaded and lazy.failures == 1
    assert "weights server down" in (lazy.last_error or "")
    assert await lazy.get() == "ok"
    assert attempts == 2


async def test_hanging_loader_times_out_and_leaves_nothing() -> None:
    async def hang() -> str:
        await asyncio.Event().wait()
        return "never"

    lazy = LazyLoader(hang, name="big", timeout=0.05)
    results = await asyncio.gather(lazy.get(), lazy.get(), return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results)
    assert "big" in str(results[0])
    assert not lazy.loaded and not lazy.loading


async def test_wrong_type_is_an_error_not_a_value() -> None:
    lazy = LazyLoader(lambda: "not a dict", expect=dict, in_thread=False)
    with pytest.raises(LoadError, match="returned str, expected dict"):
        await lazy.get()
    assert not lazy.loaded


async def test_a_cancelled_caller_does_not_cancel_the_load() -> None:
    gate = asyncio.Event()

    async def load() -> int:
        await gate.wait()
        return 7

    lazy = LazyLoader(load)
    first = asyncio.create_task(lazy.get())
    second = asyncio.create_task(lazy.get())
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == 7
    assert first.cancelled()
    assert lazy.loaded


async def test_reset_forgets_the_value_and_a_load_in_flight() -> None:
    n = 0
    gate = asyncio.Event()

    async def load() -> int:
        nonlocal n
        n += 1
        mine = n
        if mine == 1:
            await gate.wait()
        return mine

    lazy = LazyLoader(load)
    old = asyncio.create_task(lazy.get())
    await asyncio.sleep(0)
    lazy.reset()
    assert await lazy.get() == 2
    gate.set()
    assert await old == 1  # its caller gets what it waited for ...
    assert lazy.value == 2  # ... but the value kept is the newer one
    lazy.reset()
    assert not lazy.loaded
    assert await lazy.get() == 3


async def test_lazy_dict_seed_usage() -> None:
    async def load_model_1() -> str:
        return "m1"

    def load_model_2() -> str:
        return "m2"

    lazy_dict = LazyDict()
    lazy_dict.register_loader("model_1", load_model_1)
    lazy_dict.register_loader("model_2", load_model_2)
    assert lazy_dict.loaded() == []
    assert await lazy_dict.get("model_1") == "m1"
    assert lazy_dict.loaded() == ["model_1"]
    assert await lazy_dict.get("model_2") == "m2"
    assert lazy_dict.load_time("model_1") is not None
    lazy_dict.reset("model_1")
    assert lazy_dict.loaded() == ["model_2"]
    assert "model_1" in lazy_dict and len(lazy_dict) == 2
    with pytest.raises(KeyError, match="no loader registered for 'model_3'"):
        await lazy_dict.get("model_3")
    stats = lazy_dict.stats()
    assert stats["model_2"]["loads"] == 1


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(TypeError, match="callable"):
        LazyLoader("not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        LazyLoader(lambda: 1, timeout=0)
    with pytest.raises(ValueError, match="non-empty"):
        LazyDict().register_loader("", lambda: 1)
