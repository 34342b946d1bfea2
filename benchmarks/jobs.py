"""Async jobs, idempotency keys and fair queuing, measured in one run.

    ./run bench jobs            (or: .venv/bin/python benchmarks/jobs.py)

1. Goodput under a client timeout shorter than a generation. The app stands for
   a GPU service: `SLOTS` generations at once, each `GEN` seconds. `CLIENTS`
   clients each want one video, with a `TIMEOUT` s client timeout (shorter than
   `GEN`). Synchronously (the bare app's behaviour: no `Prefer`), a client posts
   and retries on timeout until `WINDOW` s have passed; asynchronously it posts
   with `Prefer: respond-async` and polls the monitor (same timeout per request).
   Printed: videos delivered to a client, generations the GPU finished in the
   window (one nobody received was orphaned by a timed-out client), requests still
   waiting for the GPU at the end (retries piling up), seconds, and goodput
   (videos delivered per second).
2. Duplicate executions per 1,000 retried submissions: 1,000 orders, each posted
   with a timeout shorter than the endpoint and retried once (longer timeout), with
   and without `Idempotency-Key`; executions beyond 1,000 are duplicates.
3. Per-tenant queue wait with one tenant flooding: tenant A queues `FLOOD` jobs at
   once, tenants B, C, D then `SMALL` each; `WORKERS` workers, `JOB` s per job.
   p50/p95 of each tenant's wait (submission to start), FIFO vs fair queuing.

Every server is a real uvicorn on loopback (parts 1 and 2) or the app in process
(part 3, where only the queue order matters), started and stopped here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from overdrive.contrib.testing import serve
from overdrive.middleware import OverdriveMiddleware

SLOTS, GEN, TIMEOUT, CLIENTS, WINDOW = 2, 1.0, 0.5, 8, 8.0
ORDERS, WORK, SHORT_TIMEOUT, CONCURRENCY = 1000, 0.1, 0.03, 50
FLOOD, SMALL, WORKERS, JOB = 200, 10, 2, 0.005


@contextmanager
def serving(app: Any) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_level="critical", access_log=False, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def gpu_app(
    ran: list[int],
    seconds: float,
    slots: int,
    finished: list[int] | None = None,
    arrived: list[int] | None = None,
) -> Starlette:
    arrived = [] if arrived is None else arrived
    gpu = asyncio.Semaphore(slots)  # created unbound; bound to uvicorn's loop at first use

    async def generate(request: Request) -> Response:
        await request.body()
        arrived.append(1)
        async with gpu:
            ran.append(1)
            ctx = request.scope.get("overdrive.ctx")
            for step in range(4):
                if ctx is not None:
                    ctx.progress(step / 4, f"step {step}/4")
                await asyncio.sleep(seconds / 4)
            if finished is not None:
                finished.append(1)
        return JSONResponse({"video_url": "/files/x.mp4"})

    return Starlette(routes=[Route("/generate", generate, methods=["POST"])])


def jobs_config(**jobs: Any) -> dict[str, Any]:
    return {
        "plugins": ["jobs"],
        "jobs": {"workers": 64, "max_queue": 10_000, "max_queued_per_tenant": 10_000, **jobs},
        "routes": [{"path": "/generate", "jobs": {"job": True, "idempotency": "optional"}}],
    }


async def sync_client(client: httpx.AsyncClient, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            r = await client.post("/generate", content=b"{}")
            if r.status_code == 200:
                return True
        except httpx.TimeoutException:
            pass
    return False


async def async_client(client: httpx.AsyncClient, deadline: float) -> bool:
    location = None
    while time.monotonic() < deadline:
        try:
            if location is None:
                r = await client.post(
                    "/generate", content=b"{}", headers={"prefer": "respond-async"}
                )
                if r.status_code == 202:
                    location = r.headers["location"]
                continue
            r = await client.get(location)
            if r.headers.get("overdrive-job-state") == "succeeded":
                return True
            await asyncio.sleep(0.2)
        except httpx.TimeoutException:
            pass
    return False


async def goodput() -> None:
    print(f"1. goodput: {CLIENTS} clients, {SLOTS} GPU slots, {GEN:.1f} s per generation,")
    print(f"   client timeout {TIMEOUT:.1f} s, window {WINDOW:.0f} s")
    print(
        f"   {'mode':<32}{'delivered':>10}{'GPU runs':>9}{'waiting':>8}"
        f"{'seconds':>8}{'goodput/s':>10}"
    )
    for mode in (
        "sync (bare app)",
        "sync (jobs plugin, no Prefer)",
        "async (Prefer: respond-async)",
    ):
        ran: list[int] = []
        finished: list[int] = []
        arrived: list[int] = []
        app = gpu_app(ran, GEN, SLOTS, finished, arrived)
        wrapped = (
            app if mode.startswith("sync (bare") else OverdriveMiddleware(app, config=jobs_config())
        )
        with serving(wrapped) as url:
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                start = time.monotonic()
                deadline = start + WINDOW
                fn = async_client if mode.startswith("async") else sync_client
                done = await asyncio.gather(*(fn(client, deadline) for _ in range(CLIENTS)))
                elapsed = time.monotonic() - start
                runs, waiting = len(finished), len(arrived) - len(ran)
        delivered = sum(done)
        print(
            f"   {mode:<32}{delivered:>10}{runs:>9}{waiting:>8}{elapsed:>8.1f}"
            f"{delivered / elapsed:>10.2f}"
        )


async def duplicates() -> None:
    print(f"\n2. duplicate executions per {ORDERS} retried submissions")
    print(
        f"   (endpoint {WORK * 1000:.0f} ms, first try times out at {SHORT_TIMEOUT * 1000:.0f} ms,"
    )
    print(f"   one retry; {CONCURRENCY} orders at a time)")
    for keyed in (False, True):
        ran: list[int] = []
        app = OverdriveMiddleware(gpu_app(ran, WORK, 10_000), config=jobs_config())
        gate = asyncio.Semaphore(CONCURRENCY)
        with serving(app) as url:
            limits = httpx.Limits(max_connections=2 * CONCURRENCY)
            async with httpx.AsyncClient(base_url=url, limits=limits) as client:
                ok = await asyncio.gather(*(order(i, client, gate, keyed) for i in range(ORDERS)))
            await asyncio.sleep(WORK * 2)  # let orphaned first tries finish and be counted
        label = "with Idempotency-Key" if keyed else "without keys"
        print(
            f"   {label:<24} executions {len(ran):>5}  duplicates {len(ran) - ORDERS:>5}"
            f"  failed orders {ok.count(False)}"
        )


async def order(i: int, client: httpx.AsyncClient, gate: asyncio.Semaphore, keyed: bool) -> bool:
    """One order: a first try that times out, then one retry that waits."""
    headers = {"idempotency-key": f"order-{i}"} if keyed else {}
    async with gate:
        with suppress(httpx.TimeoutException):
            await client.post(
                "/generate", content=b"%d" % i, headers=headers, timeout=SHORT_TIMEOUT
            )
        r = await client.post("/generate", content=b"%d" % i, headers=headers, timeout=30)
        return r.status_code == 200


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def fairness() -> None:
    print(f"\n3. queue wait per tenant: A queues {FLOOD} jobs at once, then B, C, D {SMALL} each")
    print(f"   ({WORKERS} workers, {JOB * 1000:.0f} ms per job); seconds, p50 / p95")
    print(f"   {'queue':<8}" + "".join(f"{t:>16}" for t in "ABCD"))
    for fairness_mode in ("fifo", "fair"):

        async def work(request: Request) -> Response:
            await asyncio.sleep(JOB)
            return Response(b"ok")

        app = Starlette(routes=[Route("/generate", work, methods=["POST"])])
        cfg = jobs_config(workers=WORKERS, fairness=fairness_mode)
        cfg["routes"][0]["jobs"]["tenant"] = "header:x-tenant"
        async with serve(app, config=cfg) as h:
            plugin = h.host.get_plugin("jobs")
            submit = {"prefer": "respond-async"}
            for _ in range(FLOOD):
                await h.client.post("/generate", headers={**submit, "x-tenant": "A"})
            for _ in range(SMALL):
                for t in "BCD":
                    await h.client.post("/generate", headers={**submit, "x-tenant": t})
            while plugin.store.by_state()["succeeded"] < FLOOD + 3 * SMALL:
                await asyncio.sleep(0.05)
            waits: dict[str, list[float]] = {}
            for job in plugin.store.jobs.values():
                waits.setdefault(job.tenant, []).append(job.started_at - job.created_at)
        cells = "".join(f"{pct(waits[t], 0.5):>7.2f} / {pct(waits[t], 0.95):<6.2f}" for t in "ABCD")
        print(f"   {fairness_mode:<8}{cells}".rstrip())


async def main() -> None:
    print(f"jobs benchmark (python {sys.version.split()[0]}, {os.cpu_count()} cpus)\n")
    await goodput()
    await duplicates()
    await fairness()


if __name__ == "__main__":
    asyncio.run(main())
