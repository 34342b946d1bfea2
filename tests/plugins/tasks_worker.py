"""A durable-queue worker process for tests/plugins/test_tasks.py (not a test module).

    python -m tests.plugins.tasks_worker REDIS_URL STREAM IDLE_TIMEOUT [MAX_ASYNC_TASKS]

The job `crash_job(ns)` counts its attempts in Redis; on its first attempt it
hangs (the test kills that worker), on a later one it records the request id
it ran under and finishes. `slow_job(ns, i, seconds)` counts how many times job
`i` started (``{ns}:runs`` hash), sleeps, and counts it finished (``{ns}:done``).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import structlog
from redis.asyncio import Redis

from overdrive.plugins.tasks import DurableTaskQueue


def build(redis_url: str, stream: str, idle_timeout: float) -> tuple[DurableTaskQueue, Any]:
    queue = DurableTaskQueue(
        redis_url, stream, consumer_group=f"{stream}:group", idle_timeout=idle_timeout
    )

    @queue.task(name="odtest.crash_job")
    async def crash_job(ns: str) -> str:
        async with Redis.from_url(redis_url) as r:
            attempt = await r.incr(f"{ns}:attempts")
            if attempt == 1:
                await asyncio.sleep(3600)  # the first worker is killed while here
            rid = structlog.contextvars.get_contextvars().get("request_id", "none")
            await r.set(f"{ns}:done", str(rid))
        return "done"

    @queue.task(name="odtest.slow_job")
    async def slow_job(ns: str, i: int, seconds: float) -> None:
        async with Redis.from_url(redis_url) as r:
            await r.hincrby(f"{ns}:runs", str(i), 1)
            await asyncio.sleep(seconds)
            await r.incr(f"{ns}:done")

    queue.slow_job = slow_job  # type: ignore[attr-defined]
    return queue, crash_job


async def main(redis_url: str, stream: str, idle_timeout: float, slots: int) -> None:
    queue, _ = build(redis_url, stream, idle_timeout)
    await queue.run_worker(max_async_tasks=slots)


if __name__ == "__main__":
    slots = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), slots))
