"""The shared GPU ledger under bursts and Redis losing its data.

Real Redis: the shared one (keys under the test's namespace) for the burst, a
private redis-server for the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.applications import Starlette

from overdrive.contrib.testing import serve
from overdrive.plugins.gpu import Admission, AdmissionRejected, RedisLedger
from overdrive.plugins.redisconn import close_client, redis_client

MB = 2**20


async def test_a_burst_of_releases_loses_none(redis_url: str, namespace: str) -> None:
    # 250 concurrent releases in one process: with redis-py's 100-connection pool, 132-134
    # failed with MaxConnectionsError and their memory stayed reserved until lease_ttl.
    config = {"plugins": ["gpu"],
              "gpu": {"backend": "simulated", "simulated_devices": 1,
                      "simulated_memory_mb": 8192, "redis_url": redis_url,
                      "redis_prefix": namespace}}  # fmt: skip
    async with serve(Starlette(), config=config) as h:
        plugin = h.host.get_plugin("gpu")
        admission = plugin.admission
        plugin.measure_budgets()
        grants = [await admission.acquire(1 * MB) for _ in range(250)]
        assert (await admission.used())[0] == 250 * MB
        results = await asyncio.gather(
            *(admission.release(g) for g in grants), return_exceptions=True
        )
        assert [r for r in results if r is not True] == []
        assert await admission.used() == [0]
        assert plugin._ledger.unreleased == set()


async def test_no_over_commit_after_redis_restarts_empty(private_redis: Any) -> None:
    # Three 7,000 MB leases held by worker A; Redis restarted empty; worker B claims
    # 7,000 MB of a 23,552 MB budget. The old ledger admitted it (28,000 MB held):
    # the lost leases must be written back before any new claim is admitted.
    budget = [23552 * MB]
    a_client = redis_client(private_redis.url, retries=2)
    b_client = redis_client(private_redis.url, retries=2)
    a_ledger = RedisLedger(a_client, "odtest:gpu", lease_ttl=3.0)
    b_ledger = RedisLedger(b_client, "odtest:gpu", lease_ttl=3.0)
    worker_a = Admission(budget, ledger=a_ledger, poll_interval=0.02)
    worker_b = Admission(budget, ledger=b_ledger, poll_interval=0.02, max_wait=2.5)

    async def heartbeat() -> None:  # the plugin's loop, at its interval
        while True:
            await asyncio.sleep(a_ledger.heartbeat_interval)
            with contextlib.suppress(Exception):
                await a_ledger.heartbeat()

    beat = asyncio.get_running_loop().create_task(heartbeat())
    try:
        held = [await worker_a.acquire(7000 * MB) for _ in range(3)]
        warm = await worker_b.acquire(1 * MB)  # B has used the ledger before
        await worker_b.release(warm)
        private_redis.kill()
        private_redis.start()  # empty: no persistence
        try:
            extra = await worker_b.acquire(7000 * MB)
        except AdmissionRejected:
            extra = None  # waited max_wait: the budget was full all along
        assert extra is None
        assert await worker_b.used() == [21000 * MB]  # A's three leases, written back
        assert a_ledger.reasserted == 3
        for grant in held:
            await worker_a.release(grant)
        assert await worker_b.used() == [0]
        got = await worker_b.acquire(7000 * MB)  # room again: admitted
        await worker_b.release(got)
    finally:
        beat.cancel()
        await worker_a.close()
        await worker_b.close()
        await close_client(a_client)
        await close_client(b_client)
