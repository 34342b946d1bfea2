"""The durable job queue across worker processes: each job runs once, and lost streams heal.

Real worker processes (tests/plugins/tasks_worker.py) on the shared Redis, or on
a private redis-server for the tests that flush or restart it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from tests.plugins.tasks_worker import build

ROOT = Path(__file__).resolve().parents[2]


def spawn(redis_url: str, stream: str, idle_timeout: float, slots: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.plugins.tasks_worker", redis_url, stream,
         str(idle_timeout), str(slots)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


async def wait_done(r: Any, ns: str, count: int, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if int(await r.get(f"{ns}:done") or 0) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} jobs never finished (done: {await r.get(f'{ns}:done')})")


def stop(procs: list[subprocess.Popen[bytes]]) -> list[str]:
    """Kill the workers; their stderr, for the tracebacks they printed."""
    errors = []
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        errors.append(err.decode(errors="replace"))
    return errors


async def test_no_job_runs_twice_when_workers_are_busy_longer_than_idle_timeout(
    redis_url: str, namespace: str
) -> None:
    # Two workers of 2 slots, 10 jobs of 1.2 s, idle_timeout 1 s: every job runs longer
    # than idle_timeout and most wait behind others. taskiq-redis' broker read them all
    # into the first worker, and the second reclaimed those waiting, and the running ones.
    stream = f"{namespace}:stream"
    queue, _ = build(redis_url, stream, idle_timeout=1.0)
    jobs = 10
    async with Redis.from_url(redis_url) as r:
        procs = []
        try:
            await queue.start()
            for i in range(jobs):
                await queue.add_task(queue.slow_job, namespace, i, 1.2)  # type: ignore[attr-defined]
            procs = [spawn(redis_url, stream, 1.0, 2) for _ in range(2)]
            await wait_done(r, namespace, jobs)
            await asyncio.sleep(1.5)  # a reclaim would show up within idle_timeout + a poll
            runs = {int(k): int(v) for k, v in (await r.hgetall(f"{namespace}:runs")).items()}
            assert runs == dict.fromkeys(range(jobs), 1)
            assert int(await r.get(f"{namespace}:done") or 0) == jobs
        finally:
            stop(procs)
            await queue.stop()
            await queue.delete()
            await r.delete(f"{namespace}:runs", f"{namespace}:done")


async def test_workers_recover_when_the_stream_and_group_are_lost(private_redis: Any) -> None:
    # FLUSHALL (and an empty restart, below) removes the stream and its consumer group:
    # taskiq-redis' broker then failed every poll with NOGROUP and never ran a job again.
    url, ns = private_redis.url, "odtest:lost"
    stream = f"{ns}:stream"
    queue, _ = build(url, stream, idle_timeout=5.0)
    procs = []
    try:
        async with Redis.from_url(url) as r:
            await queue.start()
            procs = [spawn(url, stream, 5.0, 2)]
            await queue.add_task(queue.slow_job, ns, 0, 0.0)  # type: ignore[attr-defined]
            await wait_done(r, ns, 1)
            await r.flushall()
            await asyncio.sleep(0.5)  # the worker polls the vanished group
            await queue.add_task(queue.slow_job, ns, 1, 0.0)  # type: ignore[attr-defined]
            await wait_done(r, ns, 1)  # counters were flushed too: 1 again
            await queue.delete()  # DurableTaskQueue.delete(): the same for the group
            await asyncio.sleep(0.5)
            await queue.add_task(queue.slow_job, ns, 2, 0.0)  # type: ignore[attr-defined]
            await wait_done(r, ns, 2)
            assert await r.hgetall(f"{ns}:runs") == {b"1": b"1", b"2": b"1"}
        async with Redis.from_url(url) as r2:
            private_redis.kill()  # restarted empty (no persistence)
            private_redis.start()
            await asyncio.sleep(0.5)
            await queue.add_task(queue.slow_job, ns, 3, 0.0)  # type: ignore[attr-defined]
            await wait_done(r2, ns, 1)
            assert await r2.hgetall(f"{ns}:runs") == {b"3": b"1"}
    finally:
        errors = stop(procs)
        await queue.stop()
    assert "Traceback" not in errors[0], errors[0][-2000:]  # one warning line, no storm
