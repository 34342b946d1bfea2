"""GPU admission on the simulated backend: our placement against first-fit and a global lock.

A mixed stream of requests (memory needs from 1 to 16 GB on 24 GB devices,
holding times of a few to tens of milliseconds, Poisson arrivals scaled with
the device count) is run on 1, 2 and 4 simulated devices by:

- ours: best fit, FIFO queue with bounded bypass (max_bypass=4) -- the plugin's default
- ours, strict FIFO: best fit, max_bypass=0
- first-fit: first device with room, strict FIFO (what a simple allocator does)
- first-fit + bypass: first fit with our queue, to separate placement from queueing
- global lock: one request at a time on the whole machine (a common "safe" pattern)

Printed per run: utilization (memory-time held over budget-time available),
rejected share (queue full or waited past max_wait), wait p99 of admitted
requests, and whether any admitted set ever exceeded a device's budget.
No assertions: it prints what it measured. Run: ./run bench gpu_admission
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass

from overdrive.plugins.gpu import Admission, AdmissionRejected, SimulatedBackend

GB = 2**30
DEVICE_MB = 24576
NEEDS_GB = [1, 1, 2, 2, 3, 4, 6, 8, 12, 16]
REQUESTS = int(sys.argv[1]) if len(sys.argv) > 1 else 500
MAX_WAIT = 0.5
MAX_QUEUE = 64


@dataclass
class Req:
    at: float
    need: int
    hold: float


def stream(devices: int, seed: int) -> list[Req]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    # Mean need ~5.5 GB held ~20 ms; aim the offered load at ~110% of the budget.
    rate = devices * (DEVICE_MB / 1024 * 1.1) / (5.5 * 0.020)
    for _ in range(REQUESTS):
        t += rng.expovariate(rate)
        out.append(Req(t, rng.choice(NEEDS_GB) * GB, rng.uniform(0.005, 0.035)))
    return out


@dataclass
class Result:
    name: str
    utilization: float
    rejected: float
    wait_p99_ms: float
    exceeded: bool


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def run_admission(name: str, reqs: list[Req], budgets: list[int], **kw: object) -> Result:
    adm = Admission(budgets, max_queue=MAX_QUEUE, max_wait=MAX_WAIT, **kw)  # type: ignore[arg-type]
    held = 0.0
    waits: list[float] = []
    rejected = 0
    exceeded = False
    t0 = time.perf_counter()

    async def one(r: Req) -> None:
        nonlocal held, rejected, exceeded
        await asyncio.sleep(max(0.0, r.at - (time.perf_counter() - t0)))
        try:
            grant = await adm.acquire(r.need)
        except AdmissionRejected:
            rejected += 1
            return
        if any(used > b for used, b in zip(adm.reserved, budgets, strict=True)):
            exceeded = True
        waits.append(grant.waited)
        await asyncio.sleep(r.hold)
        held += r.need * r.hold
        await adm.release(grant)

    await asyncio.gather(*(one(r) for r in reqs))
    span = time.perf_counter() - t0
    return Result(
        name, held / (sum(budgets) * span), rejected / len(reqs), p99(waits) * 1e3, exceeded
    )


async def run_global_lock(reqs: list[Req], budgets: list[int]) -> Result:
    lock = asyncio.Lock()
    held = 0.0
    waits: list[float] = []
    rejected = 0
    queued = 0
    t0 = time.perf_counter()

    async def one(r: Req) -> None:
        nonlocal held, rejected, queued
        await asyncio.sleep(max(0.0, r.at - (time.perf_counter() - t0)))
        if queued >= MAX_QUEUE:
            rejected += 1
            return
        start = time.perf_counter()
        queued += 1
        try:
            async with asyncio.timeout(MAX_WAIT):
                await lock.acquire()
        except TimeoutError:
            rejected += 1
            return
        finally:
            queued -= 1
        try:
            waits.append(time.perf_counter() - start)
            await asyncio.sleep(r.hold)
            held += r.need * r.hold
        finally:
            lock.release()

    await asyncio.gather(*(one(r) for r in reqs))
    span = time.perf_counter() - t0
    return Result(
        "global lock", held / (sum(budgets) * span), rejected / len(reqs), p99(waits) * 1e3, False
    )


async def main() -> None:
    print(f"{REQUESTS} requests per run, devices of {DEVICE_MB} MB (budget = 24 GB - 1 GB margin)")
    print(f"max_wait {MAX_WAIT}s, max_queue {MAX_QUEUE}; needs {NEEDS_GB} GB, hold 5-35 ms\n")
    header = (
        f"{'devices':>7} {'strategy':<20} {'util':>6} {'x lock':>7} {'rejected':>9} "
        f"{'wait p99':>10} {'over budget':>12}"
    )
    print(header)
    print("-" * len(header))
    any_exceeded = False
    for devices in (1, 2, 4):
        backend = SimulatedBackend(devices, DEVICE_MB)
        budgets = [backend.device_info(i).memory_free - GB for i in range(devices)]
        reqs = stream(devices, seed=devices)
        results = [
            await run_admission("ours (best fit)", reqs, budgets, placement="best_fit"),
            await run_admission("ours, strict FIFO", reqs, budgets, max_bypass=0),
            await run_admission("first-fit", reqs, budgets, placement="first_fit", max_bypass=0),
            await run_admission("first-fit + bypass", reqs, budgets, placement="first_fit"),
            await run_global_lock(reqs, budgets),
        ]
        base = results[-1].utilization or 1e-9
        for r in results:
            any_exceeded |= r.exceeded
            print(
                f"{devices:>7} {r.name:<20} {r.utilization:>6.1%} {r.utilization / base:>6.2f}x "
                f"{r.rejected:>9.1%} {r.wait_p99_ms:>8.1f}ms {'YES' if r.exceeded else 'never':>12}"
            )
        print()
    print(
        "an admitted set exceeded a device budget: "
        + ("YES (a bug)" if any_exceeded else "never, in any run")
    )


if __name__ == "__main__":
    asyncio.run(main())
