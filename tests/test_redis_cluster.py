"""Every Redis-backed plugin on a real local 3-master Redis Cluster (`redis+cluster://`).

The `redis_cluster` session fixture starts the cluster (tests/support/cluster.py);
keys are under each test's namespace. Before, the rate limiter refused the URL
at startup, a node URL let 150 of 100 through, the GPU ledger's two keys sat in
different slots (503 on every request), tasks answered 500, and the cache's
prefix invalidation and clear() passed one node's SCAN cursor to another.
"""

from __future__ import annotations

import asyncio

import limits
from starlette.applications import Starlette

from overdrive.contrib.testing import make_host, serve
from overdrive.plugins.cache import AsyncCache
from overdrive.plugins.gpu import Admission, RedisLedger
from overdrive.plugins.redisconn import close_client, is_cluster, redis_client, scan_keys
from overdrive.plugins.resilience import RateLimiter
from overdrive.plugins.resilience.breaker import CircuitBreakerConfig
from overdrive.plugins.resilience.shared import SharedState
from overdrive.plugins.tasks import DurableTaskQueue

MB = 2**20


async def test_the_helper_gives_a_cluster_client_that_scans_every_master(
    redis_cluster: str, namespace: str
) -> None:
    client = redis_client(redis_cluster)
    try:
        assert is_cluster(client)
        for i in range(60):  # spread over the three masters' slots
            await client.set(f"{namespace}:k{i}", i)
        found = [k async for k in scan_keys(client, f"{namespace}:k*", count=7)]
        assert len(found) == 60
        assert len(client.get_primaries()) == 3
    finally:
        for i in range(60):
            await client.delete(f"{namespace}:k{i}")
        await close_client(client)


async def test_the_rate_limit_is_exact_on_the_cluster(redis_cluster: str, namespace: str) -> None:
    config = {"plugins": ["ratelimit"],
              "ratelimit": {"storage_url": redis_cluster, "key_prefix": namespace}}  # fmt: skip
    make_host(config=config)  # the URL is accepted at startup
    limiter = RateLimiter("fixed-window", redis_cluster, key_prefix=namespace)
    items = limits.parse_many("100/minute")
    try:
        results = await asyncio.gather(*(limiter.hit(items, "b", "k") for _ in range(200)))
        assert sum(1 for r in results if r[0]) == 100
        assert limiter.errors == 0
    finally:
        await limiter.close()


async def test_a_breaker_trip_is_seen_by_every_worker_on_the_cluster(
    redis_cluster: str, namespace: str
) -> None:
    config = CircuitBreakerConfig(redis_url=redis_cluster)
    workers = [SharedState(redis_cluster, f"{namespace}:cb:{i % 1}", config) for i in range(2)]
    others = [SharedState(redis_cluster, f"{namespace}:cb:x{i}", config) for i in range(5)]
    try:
        await workers[0].trip(30.0)
        assert (await workers[1].read() or ("?",))[0] == "open"
        for other in others:  # keys on every node answer
            assert (await other.read() or ("?",))[0] == "closed"
        assert workers[0].errors == workers[1].errors == 0
    finally:
        for s in (*workers, *others):
            await s.close()


async def test_the_gpu_ledger_works_on_the_cluster(redis_cluster: str, namespace: str) -> None:
    a_client, b_client = redis_client(redis_cluster), redis_client(redis_cluster)
    worker_a = Admission([8000 * MB], ledger=RedisLedger(a_client, namespace), poll_interval=0.01)
    worker_b = Admission(
        [8000 * MB], ledger=RedisLedger(b_client, namespace), poll_interval=0.01, max_wait=5
    )
    try:
        held = await worker_a.acquire(6000 * MB)
        waiting = asyncio.ensure_future(worker_b.acquire(4000 * MB))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # B sees A's lease through the cluster
        await worker_a.release(held)
        got = await waiting
        assert await worker_a.used() == [4000 * MB]
        await worker_b.release(got)
    finally:
        await worker_a.close()
        await worker_b.close()
        await close_client(a_client)
        await close_client(b_client)


async def test_gpu_requests_are_admitted_through_the_cluster(
    redis_cluster: str, namespace: str
) -> None:
    config = {"plugins": ["gpu"],
              "gpu": {"backend": "simulated", "simulated_devices": 1, "simulated_memory_mb": 8192,
                      "redis_url": redis_cluster, "redis_prefix": namespace}}  # fmt: skip
    async with serve(Starlette(), config=config) as h:
        admission = h.host.get_plugin("gpu").admission
        h.host.get_plugin("gpu").measure_budgets()
        grant = await admission.acquire(1000 * MB)
        assert await admission.used() == [1000 * MB]
        await admission.release(grant)


async def test_durable_jobs_run_once_on_the_cluster(redis_cluster: str, namespace: str) -> None:
    queue = DurableTaskQueue(redis_cluster, f"{namespace}:jobs", idle_timeout=1.0)
    runs: dict[int, int] = {}
    finished = asyncio.Event()

    @queue.task(name=f"{namespace}.job")
    async def job(i: int) -> None:
        runs[i] = runs.get(i, 0) + 1
        await asyncio.sleep(0.3)
        if len(runs) == 6:
            finished.set()

    await queue.start()
    worker = asyncio.ensure_future(queue.run_worker(max_async_tasks=2))
    try:
        for i in range(6):
            await queue.add_task(job, i)
        async with asyncio.timeout(30):
            await finished.wait()
        await asyncio.sleep(1.5)  # past idle_timeout: nothing is reclaimed and rerun
        assert runs == dict.fromkeys(range(6), 1)
        stats = await queue.get_stats()
        assert stats.get("error") is None and stats["pending"] == 0
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        await queue.delete()
        await queue.stop()


async def test_cache_prefix_invalidation_and_clear_reach_every_node(
    redis_cluster: str, namespace: str
) -> None:
    from overdrive.plugins.cache import CacheConfig

    config = CacheConfig(namespace=namespace)
    writer, reader = (
        AsyncCache(config, redis_url=redis_cluster),
        AsyncCache(CacheConfig(namespace=namespace), redis_url=redis_cluster),
    )
    probe = redis_client(redis_cluster)
    try:
        for i in range(40):
            await writer.set(f"videos:{i}", f"v{i}")
            await writer.set(f"other:{i}", f"o{i}")
        assert await reader.get("videos:7") == "v7"
        await writer.invalidate_prefix("videos:")
        assert [k async for k in scan_keys(probe, f"{namespace}:v:videos:*")] == []
        assert len([k async for k in scan_keys(probe, f"{namespace}:v:other:*")]) == 40
        await asyncio.sleep(0.3)  # the invalidation message reaches the reader
        assert await reader.get("videos:7") is None
        await writer.clear()
        assert [k async for k in scan_keys(probe, f"{namespace}:*")] == []
        assert writer.redis is not None and writer.redis.errors == 0
    finally:
        await writer.close()
        await reader.close()
        await close_client(probe)


async def test_the_http_cache_plugin_shares_entries_on_the_cluster(
    redis_cluster: str, namespace: str
) -> None:
    # the plugin's settings once refused redis+cluster:// (only AsyncCache took it)
    from overdrive.contrib.testing import serve
    from tests.plugins.test_cache_shared import App, settings

    app = App(delay=0)
    async with serve(
        app.starlette(), config=settings(redis_url=redis_cluster, namespace=namespace)
    ) as h:
        assert (await h.client.get("/render")).headers["x-cache"] == "MISS"
        h.host.cache.memory.clear()  # only the cluster has it now
        r = await h.client.get("/render")
        assert r.headers["x-cache"] == "HIT" and app.calls == 1
        assert h.host.cache.get_stats()["redis"]["errors"] == 0
        await h.host.cache.clear()
