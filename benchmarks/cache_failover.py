"""The shared cache when a worker or Redis goes away: the two figures of docs/scaling.md.

    ./run bench cache_failover [--runs 3] [--skip-before]

1. A single-flight leader killed mid-render. Four uvicorn processes
   (tests/support/cache_worker.py) share the machine's Redis; process A leads a
   miss on ``/slow`` and gets SIGKILL 0.5 s after 20 requests for the same URL
   reached each of B, C and D (renders take 1 s there). Printed: the seconds from
   the kill until the last of the 60 answered, and the origin calls after the
   kill. Beside it, in the same run, the same processes with the lock as it was
   before the lease (``lock_lease = 30``: a 30 s lock that lapses only by
   expiring, nothing renews it or takes over sooner).

2. Stale answers after an invalidation across a reconnect. Two workers (two cache
   plugins on two hosts, one process) on a private redis-server; B holds the
   entry in memory; then Redis restarts (empty), or is down for 3 s while B
   serves from memory (its reads back off), or only the pub/sub connections are
   cut (CLIENT KILL TYPE pubsub, Redis stays up). As soon as A reaches
   Redis again it invalidates the entry; B is then read every 20 ms for 3 s.
   Printed: stale answers out of those reads, and the seconds from Redis being
   back (or the cut) until B's listener subscribed again.

Needs Redis on 127.0.0.1:6379 (OVERDRIVE_TEST_REDIS_URL) and redis-server on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.faults import RedisServer, free_port  # noqa: E402

REDIS_URL = os.environ.get("OVERDRIVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# -- 1. a leader killed ------------------------------------------------------------------


class Worker:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "uvicorn", "tests.support.cache_worker:create_app"]
        command += ["--factory", "--port", str(self.port), "--log-level", "error"]
        self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("a worker did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def leader_killed(extra: dict[str, str], runs: int) -> list[tuple[float, int, int]]:
    """(seconds from the kill to the last answer, origin calls after it, answers) per run."""
    namespace = f"bench:{uuid.uuid4().hex[:10]}"
    base = {"REDIS_URL": REDIS_URL, "NAMESPACE": namespace, **extra}
    client = redis.Redis.from_url(REDIS_URL)
    counter = f"{namespace}:origin_calls"
    others = [Worker({**base, "SLOW_SECONDS": "1"}) for _ in range(3)]
    results = []
    try:
        for worker in others:
            worker.wait_ready()
        for run in range(runs):
            leader = Worker({**base, "SLOW_SECONDS": "600"})
            try:
                leader.wait_ready()
                path = f"/slow?run={run}"
                headers = {"host": "videos.example"}
                async with httpx.AsyncClient(timeout=120, headers=headers) as http:
                    before = int(client.get(counter) or 0)
                    leading = asyncio.ensure_future(http.get(leader.url + path))
                    while int(client.get(counter) or 0) <= before:
                        await asyncio.sleep(0.02)
                    waiting = [
                        asyncio.ensure_future(http.get(w.url + path))
                        for w in others
                        for _ in range(20)
                    ]
                    await asyncio.sleep(0.5)
                    os.kill(leader.process.pid, signal.SIGKILL)
                    killed = time.perf_counter()
                    calls_at_kill = int(client.get(counter) or 0)
                    answers = await asyncio.gather(*waiting, return_exceptions=True)
                    recovered = time.perf_counter() - killed
                    leading.cancel()
                    ok = sum(1 for a in answers if isinstance(a, httpx.Response) and a.is_success)
                    after = int(client.get(counter) or 0) - calls_at_kill
                    results.append((recovered, after, ok))
            finally:
                leader.stop()
    finally:
        for worker in others:
            worker.stop()
        for key in client.scan_iter(match=f"{namespace}:*"):
            client.delete(key)
        client.close()
    return results


# -- 2. invalidation across a reconnect ----------------------------------------------------


async def stale_after_reconnect(how: str, watch: float) -> tuple[int, int, float]:
    """(stale answers, reads, seconds until B listened again) for one episode."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from overdrive.contrib.testing import serve

    renders = 0

    async def render(request: Any) -> Any:
        nonlocal renders
        renders += 1
        headers = {"cache-control": "max-age=600", "x-cache-tags": "video:1"}
        return PlainTextResponse(f"render {renders}", headers=headers)

    app = Starlette(routes=[Route("/render", render)])
    server = RedisServer().start()
    cfg = {"plugins": ["cache"], "cache": {"redis_url": server.url}}
    try:
        async with serve(app, config=cfg) as a, serve(app, config=cfg) as b:
            await a.client.get("/render")
            await b.client.get("/render")  # from Redis, into B's memory
            old = (await b.client.get("/render")).text
            raw = redis.Redis(port=server.port)
            if how == "restart":
                server.kill()
                server.start()
            elif how == "down-3s":
                server.kill()
                end = time.perf_counter() + 3
                while time.perf_counter() < end:  # B serves from memory meanwhile
                    await b.client.get("/render")
                    await asyncio.sleep(0.02)
                server.start()
            else:
                raw.client_kill_filter(_type="pubsub")
            cut = time.perf_counter()  # Redis answers again (or the connections were cut)
            cache = a.host.cache
            while await cache.redis.call(cache.redis.client.ping) is not True:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            await cache.invalidate_tags(["video:1"])
            stale = reads = 0
            back = float("nan")
            end = time.perf_counter() + watch
            while time.perf_counter() < end:
                text = (await b.client.get("/render")).text
                reads += 1
                stale += text == old
                listener = b.host.cache.get_stats().get("invalidation_listener", {})
                if back != back and listener.get("listening") and b.host.cache.resyncs:
                    back = time.perf_counter() - cut
                await asyncio.sleep(0.02)
            raw.close()
            return stale, reads, back
    finally:
        server.close()


def show(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


async def main(runs: int, skip_before: bool, watch: float) -> None:
    print("1. single-flight leader killed (SIGKILL) mid-render; 60 waiters on 3 other processes")
    rows = [["lock", "run", "kill -> last answer", "origin calls after kill", "answered"]]
    configs = [("lease 2 s, renewed (now)", {}, runs)]
    if not skip_before:
        configs.append(("30 s lock, no renewal (before)", {"CACHE_LOCK_LEASE": "30"}, 1))
    for name, extra, n in configs:
        for i, (seconds, calls, ok) in enumerate(await leader_killed(extra, n), 1):
            rows.append([name, str(i), f"{seconds:.2f} s", str(calls), f"{ok}/60"])
    show(rows)
    print()
    print("2. invalidation right after a reconnect; B read every 20 ms for", watch, "s")
    rows = [["episode", "run", "stale answers", "B listening again after"]]
    for how in ("restart", "down-3s", "pubsub-cut"):
        for i in range(runs):
            stale, reads, back = await stale_after_reconnect(how, watch)
            rows.append([how, str(i + 1), f"{stale}/{reads}", f"{back:.2f} s"])
    show(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-before", action="store_true", help="not the 30 s lock (31 s)")
    parser.add_argument("--watch", type=float, default=3.0)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.skip_before, args.watch))
