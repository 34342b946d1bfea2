"""Scale-out checks on a real Redis and a real local 3-master Redis Cluster (./run bench scaleout).

Prints, for a private redis-server and for a local cluster (both started here):

- the global rate limit under a cold burst: 4 fresh worker processes whose
  first traffic is 60 concurrent hits each, at once, against "100/minute"
  (promise: exactly 100 allowed), over several runs;
- durable jobs run twice per 1,000: 3 worker processes of 4 slots, 1,000 jobs
  of 20 ms, `idle_timeout` 0.5 s; without a crash, and with one worker
  SIGKILLed mid-run (its running jobs are the only ones that may run twice;
  none may be lost). The peer is taskiq-redis' `RedisStreamBroker` (what the
  tasks plugin used before) on the same jobs, without a crash;
- GPU peak vs budget across a Redis restart (single Redis only): worker A holds
  three 7,000 MB leases of a 23,552 MB budget, Redis restarts empty, workers B
  and C keep claiming 7,000 MB for 4 s; the peak of what is really held.

Usage: python benchmarks/scaleout.py [--runs N] [--jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 2**20
JOB_S = 0.1  # each job's run time
IDLE_S = 2.0  # idle_timeout: a job idle this long is taken for a dead worker's


# -- worker processes ----------------------------------------------------------------


async def burst_worker(url: str, prefix: str, hits: int, go: str) -> None:
    import limits

    from overdrive.plugins.resilience import RateLimiter

    limiter = RateLimiter("fixed-window", url, key_prefix=prefix)
    items = limits.parse_many("100/minute")
    while not os.path.exists(go):
        await asyncio.sleep(0.005)
    results = await asyncio.gather(*(limiter.hit(items, "b", "client") for _ in range(hits)))
    print(sum(1 for r in results if r[0]), flush=True)
    await limiter.close()


def job_queue(url: str, stream: str, broker: str) -> Any:
    from overdrive.plugins.redisconn import redis_client
    from overdrive.plugins.tasks import DurableTaskQueue

    queue = DurableTaskQueue(url, stream, consumer_group="bench", idle_timeout=IDLE_S)
    if broker == "taskiq-redis":  # the peer: the library's own stream broker
        from taskiq_redis import RedisStreamBroker

        queue.broker = RedisStreamBroker(
            url, queue_name=stream, consumer_group_name="bench", consumer_id="0",
            idle_timeout=int(IDLE_S * 1000), xread_block=200,
        )  # fmt: skip
    counter = redis_client(url)

    @queue.task(name="bench.job")
    async def job(ns: str, i: int) -> None:
        await counter.hincrby(f"{ns}:runs", str(i), 1)
        await asyncio.sleep(JOB_S)

    queue.job = job  # type: ignore[attr-defined]
    return queue


async def jobs_worker(url: str, stream: str, broker: str) -> None:
    queue = job_queue(url, stream, broker)
    await queue.run_worker(max_async_tasks=4)


# -- the checks ------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def cold_burst(url: str, runs: int) -> list[int]:
    totals = []
    for _ in range(runs):
        prefix = f"bench:rl:{uuid.uuid4().hex[:8]}"
        go = Path(tempfile.mkdtemp()) / "go"
        procs = [spawn("--burst", url, prefix, "60", str(go)) for _ in range(4)]
        time.sleep(1.5)  # every process imported and waiting
        go.touch()
        totals.append(sum(int(p.communicate(timeout=60)[0].split()[0]) for p in procs))
    return totals


async def jobs_twice(url: str, jobs: int, *, crash: bool, broker: str = "ours") -> tuple[int, int]:
    """(jobs run more than once, jobs never run) out of `jobs`."""
    from overdrive.plugins.redisconn import close_client, redis_client

    ns = f"bench:jobs:{uuid.uuid4().hex[:8]}"
    stream = f"{ns}:stream"
    queue = job_queue(url, stream, broker)
    r = redis_client(url)
    await queue.start()
    for i in range(jobs):
        await queue.add_task(queue.job, ns, i)
    procs = [spawn("--jobs-worker", url, stream, broker) for _ in range(3)]
    try:
        if crash:
            while await r.hlen(f"{ns}:runs") < jobs // 3:
                await asyncio.sleep(0.01)
            procs[0].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 120
        while await r.hlen(f"{ns}:runs") < jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(IDLE_S + 1.0)  # past idle_timeout: late reclaims show up
        runs = {int(k): int(v) for k, v in (await r.hgetall(f"{ns}:runs")).items()}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        await queue.delete()
        await queue.stop()
        await r.delete(f"{ns}:runs")
        await close_client(r)
    return sum(1 for n in runs.values() if n > 1), jobs - len(runs)


async def gpu_restart(server: Any) -> tuple[int, int]:
    """(peak MB really held, budget MB) while Redis restarts empty under claims."""
    from overdrive.plugins.gpu import Admission, AdmissionRejected, RedisLedger
    from overdrive.plugins.redisconn import close_client, redis_client

    budget = 23552 * MB
    clients = [redis_client(server.url, retries=2) for _ in range(3)]
    ledgers = [RedisLedger(c, "bench:gpu", lease_ttl=3.0) for c in clients]
    workers = [
        Admission([budget], ledger=ledger, poll_interval=0.02, max_wait=0.5) for ledger in ledgers
    ]
    held = [0, 0, 0]
    peak = 0

    async def beat(ledger: RedisLedger) -> None:
        while True:
            await asyncio.sleep(ledger.heartbeat_interval)
            with contextlib.suppress(Exception):  # Redis restarting: the next beat
                await ledger.heartbeat()

    async def claimer(i: int, until: float) -> None:
        nonlocal peak
        while time.monotonic() < until:
            try:
                grant = await workers[i].acquire(7000 * MB)
            except (AdmissionRejected, Exception):
                await asyncio.sleep(0.05)
                continue
            held[i] += grant.nbytes
            peak = max(peak, sum(held))
            await asyncio.sleep(0.2)
            held[i] -= grant.nbytes
            await workers[i].release(grant)

    beats = [asyncio.ensure_future(beat(ledger)) for ledger in ledgers]
    try:
        for _ in range(3):
            grant = await workers[0].acquire(7000 * MB)
            held[0] += grant.nbytes
        for w in workers[1:]:
            await w.release(await w.acquire(1 * MB))  # B and C have used the ledger
        peak = sum(held)
        server.kill()
        server.start()
        until = time.monotonic() + 4
        await asyncio.gather(claimer(1, until), claimer(2, until))
    finally:
        for b in beats:
            b.cancel()
        for w in workers:
            await w.close()
        for c in clients:
            await close_client(c)
    return peak // MB, budget // MB


def per_1000(twice: int, lost: int, jobs: int) -> str:
    return f"{twice * 1000 / jobs:.1f} ({twice} of {jobs}, lost {lost})"


def fmt_range(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if min(values) != max(values) else str(values[0])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    from tests.support.cluster import LocalCluster
    from tests.support.faults import RedisServer

    server = RedisServer().start()
    cluster = LocalCluster().start()
    rows: list[tuple[str, str, str, str]] = []
    try:
        for name, url in (("redis", server.url), ("cluster", cluster.url)):
            totals = cold_burst(url, args.runs)
            rows.append(("global limit, cold burst of 4x60", "100 of 100", name,
                         f"{fmt_range(totals)} allowed ({args.runs} runs)"))  # fmt: skip
            twice, lost = await jobs_twice(url, args.jobs, crash=False)
            rows.append(("jobs run twice per 1,000, no crash", "0", name,
                         per_1000(twice, lost, args.jobs)))  # fmt: skip
            twice, lost = await jobs_twice(url, args.jobs, crash=True)
            rows.append(("jobs run twice per 1,000, a worker SIGKILLed", "<= its 4 running", name,
                         per_1000(twice, lost, args.jobs)))  # fmt: skip
            if name == "redis":
                twice, lost = await jobs_twice(url, args.jobs, crash=False, broker="taskiq-redis")
                rows.append(("  peer: taskiq-redis RedisStreamBroker, no crash", "-", name,
                             per_1000(twice, lost, args.jobs)))  # fmt: skip
                peak, budget = await gpu_restart(server)
                rows.append(("GPU peak across an empty Redis restart", f"<= {budget} MB", name,
                             f"{peak} MB"))  # fmt: skip
    finally:
        cluster.close()
        server.close()
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'promise':<18} {'backend':<8} measured")
    for check, promise, backend, measured in rows:
        print(f"{check:<{width}}  {promise:<18} {backend:<8} {measured}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--burst":
        asyncio.run(burst_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--jobs-worker":
        asyncio.run(jobs_worker(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        asyncio.run(main())
