"""A cross-worker single-flight leader killed mid-render (issue 16, item 6), real processes.

Four uvicorn processes share a Redis. Process A leads a miss on ``/slow`` and is
killed with SIGKILL while its render runs; 20 requests for the same URL wait on
each of B, C and D. Before the lease, every waiter sat out the 30 s lock and
then all 60 called the app. Now A's lock lapses within its lease and exactly one
waiter takes over: one more origin call, and 60 answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.faults import free_port

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "uvicorn", "tests.support.cache_worker:create_app"]
        command += ["--factory", "--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})

    def wait_ready(self, deadline: float) -> None:
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, "a worker exited"
            assert time.monotonic() < deadline, "a worker did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def workers(redis_url: str, namespace: str) -> Iterator[list[Worker]]:
    """A (whose render never ends before it is killed), then B, C, D (1 s renders)."""
    base = {"REDIS_URL": redis_url, "NAMESPACE": namespace}
    made = [Worker({**base, "SLOW_SECONDS": "600"})]
    made += [Worker({**base, "SLOW_SECONDS": "1"}) for _ in range(3)]
    try:
        deadline = time.monotonic() + 90
        for worker in made:
            worker.wait_ready(deadline)
        yield made
    finally:
        for worker in made:
            worker.stop()


def origin_calls(redis_url: str, namespace: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return int(client.get(f"{namespace}:origin_calls") or 0)


async def test_a_killed_leader_is_replaced_by_one_waiter(
    workers: list[Worker], redis_url: str, namespace: str
) -> None:
    a, *others = workers
    # One Host for all, as behind a load balancer (the host is part of the cache key).
    async with httpx.AsyncClient(timeout=120, headers={"host": "videos.example"}) as client:
        leading = asyncio.ensure_future(client.get(a.url + "/slow"))
        while origin_calls(redis_url, namespace) < 1:  # A's app runs: A holds the lock
            await asyncio.sleep(0.05)
        waiting: list[Any] = [
            asyncio.ensure_future(client.get(w.url + "/slow")) for w in others for _ in range(20)
        ]
        await asyncio.sleep(0.5)  # the 60 are waiting on A's lock
        os.kill(a.process.pid, signal.SIGKILL)
        answers = await asyncio.gather(*waiting)
        with pytest.raises(httpx.HTTPError):
            await leading  # A's own client lost its connection
    assert [r.status_code for r in answers] == [200] * 60
    assert origin_calls(redis_url, namespace) == 2  # A's, then one waiter's: no stampede
    assert len({r.text for r in answers}) == 1  # every waiter got that one render
