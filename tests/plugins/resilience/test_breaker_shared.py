"""Breaker state shared through a real Redis; and what happens when Redis is gone."""

from __future__ import annotations

import asyncio

import pytest

from overdrive.plugins.resilience import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError


def shared_config(url: str, namespace: str, **kw: object) -> CircuitBreakerConfig:
    return CircuitBreakerConfig(
        redis_url=url,
        redis_key_prefix=f"{namespace}:",
        redis_sync_interval=0.001,
        **kw,  # type: ignore[arg-type]
    )


async def boom() -> None:
    raise ConnectionError("down")


async def close(*breakers: CircuitBreaker) -> None:
    for b in breakers:
        if b._shared is not None:
            await b._shared.close()


async def test_one_worker_trips_it_for_all(redis_url: str, namespace: str) -> None:
    a = CircuitBreaker("api", shared_config(redis_url, namespace, failure_threshold=2))
    b = CircuitBreaker("api", shared_config(redis_url, namespace, failure_threshold=2))
    try:
        assert await b.call(asyncio.sleep, 0, "ok") == "ok"
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await a.call(boom)
        assert a.state == "open"
        await asyncio.sleep(0.005)  # past b's sync interval
        with pytest.raises(CircuitOpenError):
            await b.call(asyncio.sleep, 0)
        assert b.state == "open"
        assert b.get_stats()["backend"] == "redis"
    finally:
        await close(a, b)


async def test_half_open_trials_bounded_across_workers(redis_url: str, namespace: str) -> None:
    permitted = 2
    workers = [
        CircuitBreaker(
            "gpu",
            shared_config(
                redis_url,
                namespace,
                failure_threshold=1,
                recovery_timeout=0.05,
                half_open_max_calls=permitted,
            ),
        )
        for _ in range(4)
    ]
    try:
        with pytest.raises(ConnectionError):
            await workers[0].call(boom)
        await asyncio.sleep(0.08)
        gate = asyncio.Event()
        entered = 0

        async def trial() -> str:
            nonlocal entered
            entered += 1
            await gate.wait()
            return "ok"

        tasks = [asyncio.ensure_future(w.call(trial)) for w in workers for _ in range(25)]
        for _ in range(500):  # until every call is either in a trial or refused
            if sum(t.done() for t in tasks) + entered >= len(tasks):
                break
            await asyncio.sleep(0.01)
        assert entered == permitted
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(r == "ok" for r in results) == permitted
        assert all(isinstance(r, CircuitOpenError) for r in results if r != "ok")
    finally:
        await close(*workers)


async def test_operator_state_reaches_other_workers(redis_url: str, namespace: str) -> None:
    a = CircuitBreaker("op", shared_config(redis_url, namespace))
    b = CircuitBreaker("op", shared_config(redis_url, namespace))
    try:
        await b.call(asyncio.sleep, 0)
        a.force_open()
        await asyncio.sleep(0.02)
        with pytest.raises(CircuitOpenError):
            await b.call(asyncio.sleep, 0)
        a.reset()
        await asyncio.sleep(0.02)
        assert await b.call(asyncio.sleep, 0, "back") == "back"
    finally:
        await close(a, b)


async def test_redis_down_falls_back_to_local_state(private_redis, namespace: str) -> None:  # type: ignore[no-untyped-def]
    cfg = shared_config(private_redis.url, namespace, failure_threshold=2, recovery_timeout=60)
    b = CircuitBreaker("api", cfg)
    try:
        assert await b.call(asyncio.sleep, 0, "up") == "up"
        private_redis.kill()
        await asyncio.sleep(0.005)
        assert await b.call(asyncio.sleep, 0, "still") == "still"  # no error from Redis
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await b.call(boom)
        with pytest.raises(CircuitOpenError):
            await b.call(asyncio.sleep, 0)
        stats = b.get_stats()
        assert stats["backend"] == "local-fallback"
        assert stats["redis_errors"] >= 1
        assert stats["state"] == "open"
    finally:
        await close(b)


async def test_redis_unreachable_from_the_start(namespace: str) -> None:
    from tests.support.faults import free_port

    cfg = shared_config(f"redis://127.0.0.1:{free_port()}/0", namespace, failure_threshold=1)
    b = CircuitBreaker("nowhere", cfg)
    try:
        assert await b.call(asyncio.sleep, 0, 1) == 1
        assert b.get_stats()["backend"] == "local-fallback"
    finally:
        await close(b)


async def test_hung_redis_falls_back_too(private_redis, namespace: str) -> None:  # type: ignore[no-untyped-def]
    b = CircuitBreaker("hung", shared_config(private_redis.url, namespace))
    try:
        assert await b.call(asyncio.sleep, 0, 1) == 1
        private_redis.stop()  # SIGSTOP: the socket stays open, nothing answers
        await asyncio.sleep(0.005)
        assert await b.call(asyncio.sleep, 0, 2) == 2  # after the 250 ms socket timeout
        assert b.get_stats()["backend"] == "local-fallback"
    finally:
        private_redis.cont()
        await close(b)
