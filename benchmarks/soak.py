"""Soak: the reference service under steady load for a long time, every plugin on.

    ./run bench soak                      # 10 minutes (the default)
    ./run bench soak --duration 120       # a short check
    .venv/bin/python benchmarks/soak.py --duration 600 --concurrency 8 --json soak.json

Starts uvicorn serving examples/video_service (every plugin enabled by its
overdrive.toml) with its recommender stand-in, or, where the example is not
installed, a small app with every discovered plugin on; then drives a mixed
workload over loopback for `--duration` seconds and prints, every `--every`
seconds, requests, throughput, p99 and the server's RSS; at the end a
summary: requests, errors (anything not deliberate: deliberate are 429 and
503-with-Retry-After, i.e. rate limits and load shedding), throughput,
p50/p99, RSS after warm-up and at the end, and what the plugins still hold
once the load stopped (GPU memory reserved, requests in flight, cache
flights: all must be zero). Not part of ./run test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (weight, method, path template, headers, json body): the reference service's traffic.
VIDEO_MIX: list[tuple[int, str, str, dict[str, str], Any]] = [
    (45, "GET", "/api/videos/{id}/thumbnail", {}, None),
    (30, "GET", "/api/videos/{id}", {}, None),
    (8, "GET", "/api/videos/{id}/stream", {"range": "bytes=0-65535"}, None),
    (10, "GET", "/api/videos/{id}/recommendations", {}, None),
    (5, "POST", "/api/videos/generate", {}, {"prompt": "a cat surfing at sunset", "frames": 8}),
    (1, "GET", "/api/system/stats", {}, None),
    (1, "GET", "/health", {}, None),
]
FALLBACK_MIX: list[tuple[int, str, str, dict[str, str], Any]] = [
    (60, "GET", "/items/{id}", {}, None),
    (20, "GET", "/slow/{id}", {}, None),
    (10, "GET", "/stream", {"range": "bytes=0-1023"}, None),
    (10, "POST", "/work", {}, {"n": 1}),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def create_fallback_app() -> Any:
    """Where examples/video_service is absent: a small app with every plugin discovered, on."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    from overdrive.discovery import discover
    from overdrive.middleware import OverdriveMiddleware

    async def item(request: Any) -> PlainTextResponse:
        return PlainTextResponse(
            "item " + request.path_params["id"], headers={"cache-control": "max-age=5"}
        )

    async def slow(request: Any) -> PlainTextResponse:
        await asyncio.sleep(0.005)
        return PlainTextResponse("slow " + request.path_params["id"])

    async def stream(request: Any) -> StreamingResponse:
        async def chunks() -> Any:
            for _ in range(16):
                yield b"x" * 4096

        return StreamingResponse(chunks())

    async def work(request: Any) -> JSONResponse:
        return JSONResponse(await request.json())

    app = Starlette(
        routes=[
            Route("/items/{id}", item),
            Route("/slow/{id}", slow),
            Route("/stream", stream),
            Route("/work", work, methods=["POST"]),
            Route("/health", lambda request: PlainTextResponse("ok")),
        ]
    )
    plugins = sorted(discover())
    config: dict[str, Any] = {"plugins": plugins}
    wanted = {  # each only when that plugin is installed (unknown keys are refused)
        "ratelimit": {"limit": "1000000/minute"},  # counted, never hit by this load
        "access_log": {"enabled": False},  # one line per request would be the soak's cost
        "gpu": {"backend": "simulated", "simulated_devices": 1},
        "timeout": {"seconds": 5.0},
    }
    config.update({name: table for name, table in wanted.items() if name in plugins})
    if "gpu" in plugins:
        config["routes"] = [{"path": "/slow/{id}", "gpu": {"memory_mb": 512}}]
    return OverdriveMiddleware(app, config=config)


@dataclass
class Window:
    """Figures of one reporting interval (latencies kept only for the interval)."""

    latencies: list[float] = field(default_factory=list)
    requests: int = 0


@dataclass
class Totals:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    deliberate: int = 0
    # All latencies (seconds): 10 minutes at a few hundred a second is a few MB.
    latencies: list[float] = field(default_factory=list)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


@contextlib.contextmanager
def serve(port: int, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """uvicorn with the reference service (and its recommender) or the fallback app."""
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    common = ["--host", "127.0.0.1", "--log-level", "warning", "--no-access-log"]
    try:
        video = (ROOT / "examples" / "video_service" / "app.py").exists()
        if video:
            stub = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "examples.video_service.external:app",
                        *common,
                        "--port",
                        str(stub),
                    ],
                    cwd=ROOT,
                )
            )
            env = {
                **env,
                "RECOMMENDER_URL": f"http://127.0.0.1:{stub}",
                "DATABASE_URL": env.get("DATABASE_URL")
                or f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='soak-')}/video.db",
                "OVERDRIVE_ACCESS_LOG__ENABLED": "false",
            }
            target = ["examples.video_service.app:create_app", "--factory"]
            kind = "examples/video_service (every plugin in its overdrive.toml)"
        else:
            target = ["--app-dir", str(ROOT / "benchmarks"), "soak:create_fallback_app"]
            target.append("--factory")
            kind = "fallback app (every discovered plugin)"
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *target, *common, "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **env},
        )
        procs.append(server)
        deadline = time.monotonic() + 90
        while not answers(base + "/health"):
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit("the server did not answer /health within 90 s")
            time.sleep(0.2)
        yield server, base, kind
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total / 2**20


async def held(base: str, token: str) -> dict[str, Any]:
    """What the plugins still hold once the load stopped (from the stats endpoint)."""
    import httpx

    async with httpx.AsyncClient(timeout=10) as client:
        stats: dict[str, Any] = {}
        for path in ("/api/system/stats", "/overdrive/stats"):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await client.get(
                    base + path, headers={"authorization": f"Bearer {token}"}
                )
                if response.status_code == 200:
                    stats = response.json()
                    break
    out: dict[str, Any] = {}
    gpu = stats.get("gpu") or {}
    if "reserved_mb" in gpu:
        out["gpu_reserved_mb"] = sum(gpu["reserved_mb"])
        out["gpu_leases_not_released"] = gpu.get("admitted", 0) - gpu.get("releases", 0)
    concurrency = (stats.get("concurrency") or {}).get("global") or {}
    if "in_flight" in concurrency:
        out["concurrency_in_flight"] = max(0, concurrency["in_flight"] - 1)  # less our own
    profiler = stats.get("profiler") or {}
    if "in_flight" in profiler:
        out["profiler_in_flight"] = max(0, profiler["in_flight"] - 1)  # less our own request
    cache = stats.get("cache") or {}
    if "http" in cache:
        out["cache_flights"] = cache["http"].get("in_flight", 0)
    for name, pool in (stats.get("pools") or {}).get("pools", {}).items():
        if isinstance(pool, dict) and "checked_out" in pool:
            out[f"pool_{name}_checked_out"] = pool["checked_out"]
    return out


async def load(
    base: str, mix: list[Any], seconds: float, clients: int, every: float, pid: int, warmup: float
) -> dict[str, Any]:
    import httpx

    totals = Totals()
    window = Window()
    weights = [m[0] for m in mix]
    rss: list[tuple[float, float]] = []
    start = time.perf_counter()
    deadline = start + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:

        async def worker(index: int) -> None:
            rng = random.Random(index)
            while time.perf_counter() < deadline:
                _, method, path, headers, body = rng.choices(mix, weights=weights)[0]
                path = path.replace("{id}", str(int(rng.paretovariate(1.2)) % 200 + 1))
                t0 = time.perf_counter()
                try:
                    async with client.stream(method, path, headers=headers, json=body) as r:
                        async for _ in r.aiter_raw():
                            pass
                except httpx.HTTPError as exc:
                    totals.errors[type(exc).__name__] += 1
                    totals.requests += 1
                    await asyncio.sleep(0.01)
                    continue
                elapsed = time.perf_counter() - t0
                totals.requests += 1
                window.requests += 1
                totals.statuses[r.status_code] += 1
                if r.status_code == 429 or (r.status_code == 503 and "retry-after" in r.headers):
                    totals.deliberate += 1
                elif r.status_code >= 500:
                    totals.errors[f"HTTP {r.status_code}"] += 1
                else:
                    totals.latencies.append(elapsed)
                    window.latencies.append(elapsed)

        async def report() -> None:
            nonlocal window
            columns = ("t (s)", "requests", "req/s", "p99 ms", "errors", "RSS MB")
            print(" ".join(f"{c:>9}" for c in columns))
            last = start
            while True:
                await asyncio.sleep(every)
                now = time.perf_counter()
                current, window = window, Window()
                mem = rss_mb(pid)
                rss.append((now - start, mem))
                rate = current.requests / (now - last)
                p99 = percentile(current.latencies, 99) * 1000
                errors = sum(totals.errors.values())
                print(
                    f"{now - start:9.0f} {totals.requests:9d} {rate:9.1f} {p99:9.1f} "
                    f"{errors:9d} {mem:9.1f}",
                    flush=True,
                )
                last = now

        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(worker(i) for i in range(clients)))
        finally:
            reporter.cancel()
    elapsed = time.perf_counter() - start
    after_warmup = [m for t, m in rss if t >= warmup] or [m for _, m in rss]
    return {
        "seconds": round(elapsed, 1),
        "clients": clients,
        "requests": totals.requests,
        "throughput_rps": round(totals.requests / elapsed, 1),
        "p50_ms": round(percentile(totals.latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(totals.latencies, 99) * 1000, 2),
        "errors": sum(totals.errors.values()),
        "error_kinds": dict(totals.errors),
        "deliberate_429_503": totals.deliberate,
        "statuses": {str(k): v for k, v in sorted(totals.statuses.items())},
        "rss_mb_after_warmup": round(after_warmup[0], 1) if after_warmup else None,
        "rss_mb_end": round(rss_mb(pid), 1),
        "rss_mb_max": round(max((m for _, m in rss), default=0.0), 1),
        "rss_samples": [(round(t), round(m, 1)) for t, m in rss],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients (default 8)")
    parser.add_argument("--every", type=float, default=10.0, help="report interval, seconds")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default 10%%)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    port = args.port or free_port()
    warmup = args.warmup if args.warmup is not None else args.duration / 10
    token = secrets.token_urlsafe(12)
    env = {"OVERDRIVE_STATS__TOKEN": token}
    with serve(port, env) as (server, base, kind):
        mix = VIDEO_MIX if kind.startswith("examples") else FALLBACK_MIX
        print(f"soak: {kind} on {base}, {args.concurrency} clients, {args.duration:.0f} s")
        summary = asyncio.run(
            load(base, mix, args.duration, args.concurrency, args.every, server.pid, warmup)
        )
        time.sleep(1.0)  # background work (revalidations, tasks) settles
        summary["held_after_load"] = asyncio.run(held(base, token))
        summary["app"] = kind
    growth = None
    if summary["rss_mb_after_warmup"]:
        growth = (summary["rss_mb_end"] / summary["rss_mb_after_warmup"] - 1) * 100
    summary["rss_growth_after_warmup_percent"] = round(growth, 1) if growth is not None else None
    print()
    rows = [
        ("app", summary["app"]),
        ("duration (s)", summary["seconds"]),
        ("clients", summary["clients"]),
        ("requests", summary["requests"]),
        ("throughput (req/s)", summary["throughput_rps"]),
        ("p50 / p99 (ms)", f"{summary['p50_ms']} / {summary['p99_ms']}"),
        ("errors (not deliberate)", f"{summary['errors']} {summary['error_kinds'] or ''}"),
        ("deliberate 429/503", summary["deliberate_429_503"]),
        ("statuses", summary["statuses"]),
        (
            "RSS after warm-up / end / max (MB)",
            f"{summary['rss_mb_after_warmup']} / {summary['rss_mb_end']} / {summary['rss_mb_max']}",
        ),
        ("RSS growth after warm-up", f"{summary['rss_growth_after_warmup_percent']} %"),
        ("held after the load", summary["held_after_load"] or "(stats not reachable)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    leaked = {k: v for k, v in summary["held_after_load"].items() if v}
    return 1 if summary["errors"] or leaked else 0


if __name__ == "__main__":
    sys.exit(main())
