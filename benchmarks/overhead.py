"""Framework overhead per request, in-process: `await app(scope, receive, send)` in a loop.

Prints microseconds per request for the bare Starlette app, a no-op pure-ASGI
middleware, Starlette's BaseHTTPMiddleware no-op, asgi-correlation-id (request
ids alone, if installed), and Overdrive with no plugin, five no-op plugins on
every request hook (sync and async mixed), and 1 / 1,000 route rules.

    ./run bench overhead [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import time
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import overdrive
from overdrive.middleware import OverdriveMiddleware


async def endpoint(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app(middleware: list[Middleware] | None = None) -> Starlette:
    routes = [Route("/items/{item_id}", endpoint)]
    return Starlette(routes=routes, middleware=middleware or [])


class NoopASGI:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class NoopBase(BaseHTTPMiddleware):
    async def dispatch(self, request: Any, call_next: Any) -> Any:
        return await call_next(request)


def noop_plugin(index: int) -> Any:
    """A plugin implementing every request hook; even ones sync, odd ones async."""

    @dataclasses.dataclass
    class Settings:
        weight: int = 1

    if index % 2 == 0:

        class SyncNoop(overdrive.Plugin):
            name = f"noop{index}"

            @overdrive.hookimpl
            def before_request(self, ctx: Any) -> None:
                return None

            @overdrive.hookimpl
            def cache_lookup(self, ctx: Any) -> None:
                return None

            @overdrive.hookimpl
            def gpu_allocate(self, ctx: Any) -> None:
                return None

            @overdrive.hookimpl
            def on_response_start(self, ctx: Any, status: int, headers: Any) -> None:
                return None

            @overdrive.hookimpl
            def after_request(self, ctx: Any) -> None:
                return None

        SyncNoop.Settings = Settings  # type: ignore[misc]
        return SyncNoop()

    class AsyncNoop(overdrive.Plugin):
        name = f"noop{index}"

        @overdrive.hookimpl
        async def before_request(self, ctx: Any) -> None:
            return None

        @overdrive.hookimpl
        async def cache_lookup(self, ctx: Any) -> None:
            return None

        @overdrive.hookimpl
        async def gpu_allocate(self, ctx: Any) -> None:
            return None

        @overdrive.hookimpl
        def on_response_start(self, ctx: Any, status: int, headers: Any) -> None:
            return None

        @overdrive.hookimpl
        async def after_request(self, ctx: Any) -> None:
            return None

    AsyncNoop.Settings = Settings  # type: ignore[misc]
    return AsyncNoop()


def rules(count: int) -> list[dict[str, Any]]:
    out = [{"path": f"/area{i}/*/x", "noop0": {"weight": i}} for i in range(count - 1)]
    out.append({"path": "/items/*", "noop0": {"weight": 7}})
    return out


def overdrive_app(plugins: int, route_rules: int = 0) -> Any:
    config = {"routes": rules(route_rules)} if route_rules else {}
    host = overdrive.Overdrive(config, plugins=[noop_plugin(i) for i in range(plugins)], env={})
    return starlette_app([Middleware(OverdriveMiddleware, host=host)])


def cases() -> dict[str, Any]:
    built = {
        "bare Starlette": starlette_app(),
        "no-op pure ASGI middleware": starlette_app([Middleware(NoopASGI)]),
        "BaseHTTPMiddleware no-op": starlette_app([Middleware(NoopBase)]),
    }
    try:
        from asgi_correlation_id import CorrelationIdMiddleware

        built["asgi-correlation-id"] = starlette_app([Middleware(CorrelationIdMiddleware)])
    except ImportError:
        print("(asgi-correlation-id not installed: pip install 'overdrive[bench]')")
    built["Overdrive, no plugin"] = overdrive_app(0)
    built["Overdrive, 5 no-op plugins"] = overdrive_app(5)
    built["Overdrive, 1 plugin, 1 route rule"] = overdrive_app(1, 1)
    built["Overdrive, 1 plugin, 1,000 route rules"] = overdrive_app(1, 1000)
    return built


async def drive(app: Any, requests: int, new_paths: bool = False) -> float:
    """Seconds per request over `requests` in-process calls."""
    headers = [(b"host", b"testserver"), (b"user-agent", b"bench"), (b"accept", b"*/*")]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    # CPU time of this process, not wall time: other processes on a shared machine
    # then cost us cache misses but not their whole time slices.
    start = time.process_time()
    for i in range(requests):
        path = f"/items/{i}" if new_paths else "/items/1"
        scope = dict(scope_base, path=path, raw_path=path.encode())
        await app(scope, receive, send)
    return (time.process_time() - start) / requests


async def main(requests: int, rounds: int) -> None:
    built = cases()
    lifespan_ready = [a for a in built.values()]
    for app in lifespan_ready:  # warm up: route caches, lazy startup
        await drive(app, 500)
    results: dict[str, list[float]] = {name: [] for name in built}
    cold: list[float] = []
    for _ in range(rounds):  # interleaved, so that drift hits every case alike
        for name, app in built.items():
            results[name].append(await drive(app, requests))
        cold.append(await drive(built["Overdrive, 1 plugin, 1,000 route rules"], requests, True))
    best = {name: min(values) * 1e6 for name, values in results.items()}
    best["Overdrive, 1 plugin, 1,000 rules, every path new"] = min(cold) * 1e6
    bare = best["bare Starlette"]
    noop = best["no-op pure ASGI middleware"]
    print(f"\n{requests} requests x {rounds} rounds, best round; Python {sys.version.split()[0]}")
    print(f"{'case':<50} {'us/req':>8} {'x bare':>7} {'+us vs no-op mw':>16}")
    for name, us in best.items():
        print(f"{name:<50} {us:>8.2f} {us / bare:>7.2f} {us - noop:>+16.2f}")
    spread = {n: statistics.pstdev(v) * 1e6 for n, v in results.items()}
    print(f"\nround-to-round spread (stdev, us): max {max(spread.values()):.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    ns = parser.parse_args()
    asyncio.run(main(ns.requests, ns.rounds))
