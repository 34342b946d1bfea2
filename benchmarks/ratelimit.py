"""Cost of rate limiting per request, in process: ours vs slowapi, against the bare app.

    ./run bench ratelimit            (or: .venv/bin/python benchmarks/ratelimit.py)

Each variant is the same Starlette app called directly through ASGI (no
server, no client: only the framework's own cost is measured), with a limit
high enough never to refuse, memory storage, one client address. slowapi is
measured in its three forms: the endpoint decorator, its pure ASGI middleware
and its `BaseHTTPMiddleware` one. Best of 5 runs.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from time import perf_counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive.middleware import OverdriveMiddleware

LIMIT = "1000000000/minute"


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hi")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/", hello)])


async def drive(app: Callable[..., Any], n: int, repeat: int = 1) -> float:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 5000),
        "server": ("bench", 80),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    best = float("inf")
    for _ in range(repeat):
        t0 = perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        best = min(best, (perf_counter() - t0) / n)
    assert set(statuses) == {200}, set(statuses)
    return best * 1e6


def variants() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {"bare Starlette app": starlette_app()}
    out["overdrive middleware, no plugin"] = OverdriveMiddleware(starlette_app(), config={})
    out["overdrive ratelimit (memory, fixed window: default)"] = OverdriveMiddleware(
        starlette_app(), config={"plugins": ["ratelimit"], "ratelimit": {"limit": LIMIT}}
    )
    out["overdrive ratelimit (memory, sliding window counter)"] = OverdriveMiddleware(
        starlette_app(),
        config={
            "plugins": ["ratelimit"],
            "ratelimit": {"limit": LIMIT, "strategy": "sliding-window-counter"},
        },
    )
    try:
        from slowapi import Limiter
        from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
        from slowapi.util import get_remote_address

        limiter = Limiter(key_func=get_remote_address)

        @limiter.limit(LIMIT)
        async def limited(request: Request) -> PlainTextResponse:
            return PlainTextResponse("hi")

        app = Starlette(routes=[Route("/", limited)])
        app.state.limiter = limiter
        out["slowapi decorator"] = app

        for label, mw in (
            ("slowapi ASGI middleware", SlowAPIASGIMiddleware),
            ("slowapi BaseHTTPMiddleware", SlowAPIMiddleware),
        ):
            lim = Limiter(key_func=get_remote_address, default_limits=[LIMIT])
            app = starlette_app()
            app.state.limiter = lim
            app.add_middleware(mw)
            out[label] = app
    except ImportError:
        print("# slowapi not installed (pip install -e .[bench])")
    return out


async def direct(n: int) -> float:
    from limits import parse_many

    from overdrive.plugins.resilience import RateLimiter

    limiter = RateLimiter()
    items = parse_many(LIMIT)
    best = float("inf")
    for _ in range(5):
        t0 = perf_counter()
        for _ in range(n):
            await limiter.hit(items, "global", "127.0.0.1")
        best = min(best, (perf_counter() - t0) / n)
    return best * 1e6


async def main(n: int) -> None:
    apps = variants()
    best = dict.fromkeys(apps, float("inf"))
    for _ in range(5):  # round robin, so that a noisy moment hits every variant alike
        for name, app in apps.items():
            best[name] = min(best[name], await drive(app, n))
    rows = list(best.items())
    bare = rows[0][1]
    print(f"\n## Rate limiting: one request through ASGI (n={n}, best of 5)\n")
    print("| variant | us per request | added over bare |")
    print("|---|---:|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} | {us - bare:+.1f} |")
    print(f"\nRateLimiter.hit alone (memory, fixed window): {await direct(n):.1f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=5000, help="requests per run")
    asyncio.run(main(parser.parse_args().n))
