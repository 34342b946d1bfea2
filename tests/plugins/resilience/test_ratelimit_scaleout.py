"""The global limit stays exact while Redis is healthy: bursts wait for a connection.

Real Redis (keys under the test's namespace); cold worker processes for the
multi-process burst.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import limits

from overdrive.plugins.resilience import RateLimiter
from overdrive.plugins.resilience.breaker import CircuitBreaker, CircuitBreakerConfig

ROOT = Path(__file__).resolve().parents[3]


async def test_a_burst_in_one_process_is_counted_in_redis(redis_url: str, namespace: str) -> None:
    # 200 concurrent hits on a cold limiter: redis-py's 100-connection pool failed the
    # rest, which were counted locally (200 allowed of 100).
    limiter = RateLimiter("fixed-window", redis_url, key_prefix=namespace)
    items = limits.parse_many("100/minute")
    try:
        results = await asyncio.gather(*(limiter.hit(items, "b", "k") for _ in range(200)))
        assert sum(1 for r in results if r[0]) == 100
        assert limiter.errors == 0 and not limiter.fallback
    finally:
        await limiter.close()


async def test_cold_processes_bursting_at_once_share_one_exact_count(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.plugins.resilience.ratelimit_burst",
                redis_url,
                namespace,
                "80",
                str(go),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    await asyncio.sleep(1.5)  # every process imported and waiting
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    allowed = [tuple(int(x) for x in out.split()) for out, _ in outs]
    assert sum(a for a, _ in allowed) == 100, (allowed, [e[-500:] for _, e in outs])
    assert [e for _, e in allowed] == [0, 0, 0]


async def test_the_limiter_and_the_breakers_share_one_pool(redis_url: str, namespace: str) -> None:
    limiter = RateLimiter("fixed-window", redis_url, key_prefix=namespace)
    config = CircuitBreakerConfig(redis_url=redis_url, redis_key_prefix=f"{namespace}:cb:")
    breakers = [CircuitBreaker(f"b{i}", config) for i in range(3)]
    try:
        await limiter.hit([limits.parse("10/minute")], "shared", "k")  # connects on first use
        for b in breakers:
            await b._shared.read()
        clients = {id(b._shared._client) for b in breakers}
        assert clients == {id(limiter._pool)}
    finally:
        await limiter.close()
        for b in breakers:
            await b._shared.close()
