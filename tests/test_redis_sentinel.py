"""Redis-backed plugins through a real local Redis Sentinel (`redis+sentinel://`).

The `redis_sentinel` session fixture starts a master, a replica and one Sentinel
(tests/support/sentinel.py). The failover test runs last in this module: it
moves the master to the replica, and the clients must follow it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import limits

from overdrive.contrib.testing import make_host, serve
from overdrive.plugins.redisconn import close_client, redis_client
from overdrive.plugins.resilience import RateLimiter
from overdrive.plugins.resilience.breaker import CircuitBreakerConfig
from overdrive.plugins.resilience.shared import SharedState


async def test_the_rate_limit_is_exact_through_sentinel(
    redis_sentinel: Any, namespace: str
) -> None:
    url = redis_sentinel.url
    config = {"plugins": ["ratelimit"], "ratelimit": {"storage_url": url, "key_prefix": namespace}}
    make_host(config=config)  # the URL is accepted at startup
    limiter = RateLimiter("fixed-window", url, key_prefix=namespace)
    items = limits.parse_many("100/minute")
    try:
        # a burst larger than the pool: a pool wait must never count as a Redis failure
        results = await asyncio.gather(*(limiter.hit(items, "b", "k") for _ in range(300)))
        assert sum(1 for r in results if r[0]) == 100
        assert limiter.errors == 0
    finally:
        await limiter.close()


async def test_a_breaker_trip_is_seen_by_another_worker_through_sentinel(
    redis_sentinel: Any, namespace: str
) -> None:
    config = CircuitBreakerConfig(redis_url=redis_sentinel.url)
    workers = [SharedState(redis_sentinel.url, f"{namespace}:cb", config) for _ in range(2)]
    try:
        await workers[0].trip(30.0)
        assert (await workers[1].read() or ("?",))[0] == "open"
        assert workers[0].errors == workers[1].errors == 0
    finally:
        for worker in workers:
            await worker.close()


async def test_a_burst_beyond_the_pool_waits_instead_of_failing(
    redis_sentinel: Any, namespace: str
) -> None:
    client = redis_client(redis_sentinel.url, max_connections=4, pool_timeout=10.0)
    try:
        await asyncio.gather(*(client.incr(f"{namespace}:n") for _ in range(200)))
        assert int(await client.get(f"{namespace}:n")) == 200
    finally:
        await client.delete(f"{namespace}:n")
        await close_client(client)


async def test_the_cache_shares_entries_through_sentinel(
    redis_sentinel: Any, namespace: str
) -> None:
    from tests.plugins.test_cache_shared import App, settings

    app = App(delay=0)
    config = settings(redis_url=redis_sentinel.url, namespace=namespace)
    async with serve(app.starlette(), config=config) as h:
        assert (await h.client.get("/render")).headers["x-cache"] == "MISS"
        h.host.cache.memory.clear()  # only Redis (the Sentinel's master) has it now
        r = await h.client.get("/render")
        assert r.headers["x-cache"] == "HIT" and app.calls == 1
        assert h.host.cache.get_stats()["redis"]["errors"] == 0
        await h.host.cache.clear()


async def test_the_client_follows_a_failover(redis_sentinel: Any, namespace: str) -> None:
    client = redis_client(redis_sentinel.url, retries=3)
    try:
        await client.set(f"{namespace}:k", "before")
        old = redis_sentinel.master_port()
        await asyncio.to_thread(redis_sentinel.fail_over)
        assert redis_sentinel.master_port() != old
        for _ in range(50):  # the old master's connections are dropped; the next try follows
            try:
                await client.set(f"{namespace}:k", "after")
                break
            except Exception:
                await asyncio.sleep(0.1)
        assert await client.get(f"{namespace}:k") == b"after"
        # the write reached the new master itself, not some connection left to the old one
        assert redis_sentinel.get(redis_sentinel.replica, f"{namespace}:k") == "after"
    finally:
        await client.delete(f"{namespace}:k")
        await close_client(client)
