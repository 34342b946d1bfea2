"""A cache hit, ours and the libraries a FastAPI user would otherwise pick, in one run.

    ./run bench cache          (needs Redis on 127.0.0.1:6379 for the Redis rows)

Every row calls the same FastAPI endpoint in-process through ASGI (no server,
no HTTP client: the figures are the framework's own cost), a few thousand
times after a warm-up, and prints the best of several rounds (the one least
disturbed by other work on the machine) in microseconds per request and as a
ratio to the bare app:

- bare app (no cache), trivial endpoint and one doing 1 ms of work;
- Overdrive `cache` plugin: hit from memory, hit from Redis (memory emptied
  before each request, so every hit reads Redis and backfills memory);
- fastapi-cache2 hit with InMemoryBackend and with RedisBackend;
- cashews hit, memory and Redis;
- a raw `redis.asyncio` GET of the same bytes (the floor for a Redis hit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

REDIS_URL = os.environ.get("OVERDRIVE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
N = int(os.environ.get("BENCH_N", "2000"))
ROUNDS = 7


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


def make_scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 1234),
        "server": ("bench", 80),
    }


async def call(app: Any, path: str) -> tuple[int, bytes]:
    """One request through `app`: (status, body)."""
    status = 0
    body = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await app(make_scope(path), receive, send)
    return status, b"".join(body)


Variant = Callable[[], Awaitable[Any]]


async def measure(variants: dict[str, Variant], n: int = N) -> dict[str, float]:
    """Microseconds per call of each variant: rounds taken in turn, so that every variant
    sees the same machine load, and the best round kept (the least disturbed one)."""
    for fn in variants.values():
        for _ in range(min(200, n)):
            await fn()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(n):
                await fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e6)
    return best


def fastapi_app(decorator: Callable[[Any], Any] | None = None, work: float = 0.0) -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    async def item() -> dict[str, Any]:
        if work:
            await asyncio.sleep(work)
        return {"id": 1, "title": "a video", "tags": ["a", "b"]}

    if decorator is not None:
        item = decorator(item)
    app.get("/item")(item)
    return app


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def item(request: Any) -> Any:
        return JSONResponse({"id": 1, "title": "a video", "tags": ["a", "b"]})

    return Starlette(routes=[Route("/item", item)])


@contextlib.asynccontextmanager
async def ours(redis: bool, work: float = 0.0) -> AsyncIterator[Variant]:
    from asgi_lifespan import LifespanManager

    from overdrive.middleware import OverdriveMiddleware

    settings: dict[str, Any] = {"default_ttl": 600, "namespace": "odbench:http"}
    if redis:
        settings["redis_url"] = REDIS_URL
    wrapped = OverdriveMiddleware(
        fastapi_app(work=work), config={"plugins": ["cache"], "cache": settings}
    )
    async with LifespanManager(wrapped):
        plugin = wrapped.host.get_plugin("cache")
        await call(wrapped, "/item")  # the miss that stores it
        status, body = await call(wrapped, "/item")
        assert status == 200 and b"a video" in body, (status, body)
        if redis:
            memory = plugin.cache.memory

            async def hit() -> Any:
                memory.clear()
                return await call(wrapped, "/item")

            yield hit
            assert plugin.cache.redis.hits > 100, plugin.cache.get_stats()
        else:
            yield lambda: call(wrapped, "/item")
        await plugin.cache.clear()


@contextlib.asynccontextmanager
async def fastapi_cache2(redis: bool) -> AsyncIterator[Variant]:
    from fastapi_cache import FastAPICache
    from fastapi_cache.decorator import cache

    if redis:
        import redis.asyncio as aioredis
        from fastapi_cache.backends.redis import RedisBackend

        client = aioredis.from_url(REDIS_URL)
        FastAPICache.init(RedisBackend(client), prefix="odbench:fc2")
    else:
        from fastapi_cache.backends.inmemory import InMemoryBackend

        FastAPICache.init(InMemoryBackend(), prefix="odbench:fc2")
    app = fastapi_app(cache(expire=600))
    await call(app, "/item")
    yield lambda: call(app, "/item")
    await FastAPICache.clear()
    if redis:
        await client.aclose()
    FastAPICache.reset()


@contextlib.asynccontextmanager
async def cashews_hit(redis: bool) -> AsyncIterator[Variant]:
    from cashews import Cache

    cache = Cache()
    cache.setup(REDIS_URL if redis else "mem://")
    app = fastapi_app(cache(ttl="10m", key="odbench:cashews:item"))
    await call(app, "/item")
    yield lambda: call(app, "/item")
    await cache.clear()
    await cache.close()


@contextlib.asynccontextmanager
async def raw_redis_get() -> AsyncIterator[Variant]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    await client.set("odbench:raw", b'{"id":1,"title":"a video","tags":["a","b"]}', ex=60)
    yield lambda: client.get("odbench:raw")
    await client.delete("odbench:raw")
    await client.aclose()


@contextlib.asynccontextmanager
async def plain(app: Any) -> AsyncIterator[Variant]:
    yield lambda: call(app, "/item")


async def group(variants: dict[str, Any], n: int = N) -> dict[str, float]:
    """Open every variant's context, measure them in turn, close them."""
    async with contextlib.AsyncExitStack() as stack:
        fns = {name: await stack.enter_async_context(cm) for name, cm in variants.items()}
        return await measure(fns, n)


async def main() -> None:
    try:
        import cashews  # noqa: F401
        import fastapi_cache  # noqa: F401
    except ImportError:
        sys.exit("needs the bench extra: ./run bench cache installs it")
    bare_name = "bare FastAPI app, trivial endpoint (no cache)"
    starlette_name = "bare Starlette app, trivial endpoint (no cache)"
    rows = await group(
        {
            bare_name: plain(fastapi_app()),
            starlette_name: plain(starlette_app()),
            "Overdrive cache hit, memory": ours(redis=False),
            "fastapi-cache2 hit, InMemoryBackend": fastapi_cache2(redis=False),
            "cashews hit, mem://": cashews_hit(redis=False),
        }
    )
    have_redis = redis_up()
    if have_redis:
        redis_rows = await group(
            {
                "raw redis.asyncio GET (no app)": raw_redis_get(),
                "bare Starlette app, beside the Redis rows": plain(starlette_app()),
                "Overdrive cache hit, Redis (memory emptied each time)": ours(redis=True),
                "fastapi-cache2 hit, RedisBackend": fastapi_cache2(redis=True),
                "cashews hit, redis://": cashews_hit(redis=True),
            }
        )
        rows.update(redis_rows)
    else:
        print("(Redis not running on 127.0.0.1:6379: Redis rows skipped)")
    slow_rows = await group(
        {
            "bare FastAPI app, endpoint doing 1 ms of work (a miss)": plain(
                fastapi_app(work=0.001)
            ),
            "Overdrive cache hit on that endpoint, memory": ours(redis=False, work=0.001),
        },
        n=N // 4,
    )
    rows.update(slow_rows)
    bare_us = rows[bare_name]
    ours_mem = rows["Overdrive cache hit, memory"]
    fc2_mem = rows["fastapi-cache2 hit, InMemoryBackend"]
    cashews_mem = rows["cashews hit, mem://"]
    slow_us, slow_hit = slow_rows.values()

    width = max(len(name) for name in rows) + 2
    print(
        f"{'in-process ASGI, ' + str(N) + ' requests x ' + str(ROUNDS) + ' rounds':<{width}}"
        f"{'us/req':>9}{'x bare':>9}"
    )
    print("-" * (width + 18))
    for name, us in rows.items():
        print(f"{name:<{width}}{us:>9.1f}{us / bare_us:>9.2f}")
    print("-" * (width + 18))
    print(f"fastapi-cache2 memory hit / our memory hit: {fc2_mem / ours_mem:.1f}x (goal >= 10x)")
    print(f"cashews memory hit / our memory hit: {cashews_mem / ours_mem:.1f}x")
    print(f"our memory hit / bare trivial endpoint: {ours_mem / bare_us:.2f} (goal < 1)")
    if have_redis:
        raw = redis_rows["raw redis.asyncio GET (no app)"]
        floor = raw + redis_rows["bare Starlette app, beside the Redis rows"]
        ours_redis = redis_rows["Overdrive cache hit, Redis (memory emptied each time)"]
        fc2_redis = redis_rows["fastapi-cache2 hit, RedisBackend"]
        cashews_redis = redis_rows["cashews hit, redis://"]
        print(
            f"our Redis hit / (raw GET + bare Starlette, same rounds): {ours_redis / floor:.2f} "
            f"(goal <= 1.3); fastapi-cache2 Redis / ours: {fc2_redis / ours_redis:.1f}x "
            "(goal >= 2.5x), "
            f"cashews Redis / ours: {cashews_redis / ours_redis:.1f}x"
        )
    print(f"1 ms endpoint: miss / hit = {slow_us / slow_hit:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    asyncio.run(main())
