"""Overload and a failing downstream, over loopback against a real server (uvicorn).

    ./run bench overload            (or: .venv/bin/python benchmarks/overload.py)

The app stands for a GPU service of known capacity: `SLOTS` jobs at once, each
taking `JOB` seconds, so it serves SLOTS / JOB requests per second and no more.
An open-loop load generator (arrivals at a fixed rate, whatever the answers)
drives it at 0.5x (unloaded), 2x and 5x capacity, without and with the
`concurrency` plugin; a request is good when it answers 200 within the client's
deadline. Printed: goodput (good answers per second, and as a share of
capacity), p50/p99 latency of admitted (200) answers, the share shed (503) and
the share that missed the deadline.

Then a route whose downstream is dead (each call waits `DEAD` seconds, then
fails with 502): latency of every request, without and with the `breaker`
plugin. Each server runs in its own process and is stopped at the end; the
whole run is bounded (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

SLOTS = 2
JOB = 0.05  # seconds per job: capacity = SLOTS / JOB = 40 requests per second
CAPACITY = SLOTS / JOB
DEAD = 0.1  # seconds a call to the dead downstream takes before it fails
DEADLINE = 2.0  # the client's timeout

SERVER_CONFIGS: dict[str, dict[str, Any] | None] = {
    "bare app": None,
    "concurrency (fixed limit)": {
        "plugins": ["concurrency"],
        "concurrency": {"max_concurrent": SLOTS, "max_queue": 4 * SLOTS, "max_wait": JOB},
    },
    "concurrency (gradient)": {
        "plugins": ["concurrency"],
        "concurrency": {
            "max_concurrent": 4 * SLOTS,
            "min_limit": 1,
            "max_queue": 4 * SLOTS,
            "max_wait": JOB,
            "mode": "gradient",
        },
    },
    "breaker": {
        "plugins": ["breaker"],
        "breaker": {"failure_threshold": 5, "recovery_timeout": 30},
        "routes": [{"path": "/downstream", "breaker": {}}],
    },
}


def build_app(config: dict[str, Any] | None) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from overdrive.middleware import OverdriveMiddleware

    gpu = asyncio.Semaphore(SLOTS)

    async def generate(request: Any) -> PlainTextResponse:
        async with gpu:
            await asyncio.sleep(JOB)
        return PlainTextResponse("video")

    async def downstream(request: Any) -> PlainTextResponse:
        await asyncio.sleep(DEAD)  # waiting on a service that is gone
        return PlainTextResponse("bad gateway", status_code=502)

    app = Starlette(routes=[Route("/generate", generate), Route("/downstream", downstream)])
    return app if config is None else OverdriveMiddleware(app, config=config)


def serve(name: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        build_app(SERVER_CONFIGS[name]),
        host="127.0.0.1",
        port=port,
        log_level="error",
        access_log=False,
        lifespan="on",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(name: str):  # type: ignore[no-untyped-def]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", name, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"server {name!r} died: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def drive(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """Open loop: one request every 1/rate s for `seconds`, whatever the answers."""
    import aiohttp

    results: list[tuple[int, float, float]] = []  # (status or 0 if missed, latency, done at)
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with session.get(url) as response:
                    await response.read()
                    now = time.perf_counter()
                    results.append((response.status, now - t0, now))
            except (TimeoutError, aiohttp.ClientError):
                now = time.perf_counter()
                results.append((0, now - t0, now))

        tasks = []
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
    good = sorted(lat for status, lat, _ in results if status == 200)
    last_good = max((done for status, _, done in results if status == 200), default=start)
    n = len(results)
    shed = sorted(lat for status, lat, _ in results if status == 503)
    return {
        "sent": n,
        # good answers over the time it took to give them (the backlog drains after the load)
        "goodput": len(good) / max(seconds, last_good - start),
        "p50": pct(good, 50),
        "p99": pct(good, 99),
        "shed": len(shed) / n,
        "shed_p99": pct(shed, 99),
        "missed": sum(1 for s, _, _ in results if s == 0) / n,
        "all_p50": pct(sorted(lat for _, lat, _ in results), 50),
        "all_p99": pct(sorted(lat for _, lat, _ in results), 99),
    }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


async def main(seconds: float, part: str) -> None:
    if part in ("all", "overload"):
        await overload(seconds)
    if part in ("all", "downstream"):
        await failing_downstream(seconds)


async def overload(seconds: float) -> None:
    print(
        f"\n## Overload: app capacity {CAPACITY:.0f} req/s ({SLOTS} slots x {JOB * 1000:.0f} ms), "
        f"open loop for {seconds:.0f} s per row, client deadline {DEADLINE:.0f} s\n"
    )
    print("| server | load | goodput req/s | of capacity | p50 ms | p99 ms | shed | missed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    unloaded_p99 = None
    for name in ("bare app", "concurrency (fixed limit)", "concurrency (gradient)"):
        with server(name) as base:
            for factor in (0.5, 2, 5):
                if factor == 0.5 and name != "bare app":
                    continue
                r = await drive(f"{base}/generate", CAPACITY * factor, seconds)
                if factor == 0.5:
                    unloaded_p99 = r["p99"]
                print(
                    f"| {name} | {factor:g}x | {r['goodput']:.1f} | {r['goodput'] / CAPACITY:.0%} "
                    f"| {r['p50'] * 1000:.0f} | {r['p99'] * 1000:.0f} | {r['shed']:.0%} "
                    f"| {r['missed']:.0%} |"
                )
                await asyncio.sleep(DEADLINE)  # let the server drain before the next row
    if unloaded_p99:
        print(
            f"\nUnloaded p99: {unloaded_p99 * 1000:.0f} ms; goal with the plugin: p99 within "
            f"{2 * unloaded_p99 * 1000:.0f} ms and goodput >= 90% of capacity."
        )


async def failing_downstream(seconds: float) -> None:
    print(
        f"\n## Failing downstream: each call waits {DEAD * 1000:.0f} ms then fails (502); "
        f"50 req/s for {seconds:.0f} s\n"
    )
    print("| server | p50 ms (all) | p99 ms (all) | answered 503 at once | p99 ms of those |")
    print("|---|---:|---:|---:|---:|")
    for name in ("bare app", "breaker"):
        with server(name) as base:
            r = await drive(f"{base}/downstream", 50, seconds)
            print(
                f"| {name} | {r['all_p50'] * 1000:.1f} | {r['all_p99'] * 1000:.1f} "
                f"| {r['shed']:.0%} | {r['shed_p99'] * 1000:.1f} |"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of load per row")
    parser.add_argument(
        "--part", choices=("all", "overload", "downstream"), default="all", help="what to run"
    )
    parser.add_argument("--serve", choices=sorted(SERVER_CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        serve(args.serve, args.port)
    else:
        asyncio.run(main(args.seconds, args.part))
