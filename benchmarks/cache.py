"""A cache hit, ours and the libraries a FastAPI user would otherwise pick, in one run.

    ./run bench cache          (needs Redis on 127.0.0.1:6379 for the Redis rows)

Every row calls the same FastAPI endpoint in-process through ASGI (no server,
no HTTP client: the figures are the framework's own cost), a few thousand
times after a warm-up, and prints the median of several rounds in
microseconds per request and as a ratio to the bare app:

- bare app (no cache), trivial endpoint and one doing 1 ms of work;
- Overdrive `cache` plugin: hit from memory, hit from Redis (memory emptied
  before each request, so every hit reads Redis and backfills memory);
- fastapi-cache2 hit with InMemoryBackend and with RedisBackend;
- cashews hit, memory and Redis;
- a raw `redis.asyncio` GET of the same bytes (the floor for a Redis hit).
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

REDIS_URL = os.environ.get("OVERDRIVE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
N = int(os.environ.get("BENCH_N", "2000"))
ROUNDS = 5


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


async def measure(fn: Callable[[], Awaitable[Any]], n: int = N) -> float:
    """Median over rounds of the mean microseconds per call."""
    for _ in range(min(200, n)):
        await fn()
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds)


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


async def ours(redis: bool, work: float = 0.0) -> tuple[float, Any]:
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

            us = await measure(hit)
            assert plugin.cache.redis.hits > N, plugin.cache.get_stats()
        else:
            us = await measure(lambda: call(wrapped, "/item"))
        await plugin.cache.clear()
    return us, plugin


async def fastapi_cache2(redis: bool) -> float:
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
    us = await measure(lambda: call(app, "/item"))
    await FastAPICache.clear()
    if redis:
        await client.aclose()
    FastAPICache.reset()
    return us


async def cashews_hit(redis: bool) -> float:
    from cashews import Cache

    cache = Cache()
    cache.setup(REDIS_URL if redis else "mem://")
    app = fastapi_app(cache(ttl="10m", key="odbench:cashews:item"))
    await call(app, "/item")
    us = await measure(lambda: call(app, "/item"))
    await cache.clear()
    await cache.close()
    return us


async def raw_redis_get() -> float:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    await client.set("odbench:raw", b'{"id":1,"title":"a video","tags":["a","b"]}', ex=60)
    us = await measure(lambda: client.get("odbench:raw"))
    await client.delete("odbench:raw")
    await client.aclose()
    return us


async def main() -> None:
    try:
        import cashews  # noqa: F401
        import fastapi_cache  # noqa: F401
    except ImportError:
        sys.exit("needs the bench extra: ./run bench cache installs it")
    rows: list[tuple[str, float | None]] = []
    bare = fastapi_app()
    bare_us = await measure(lambda: call(bare, "/item"))
    rows.append(("bare FastAPI app, trivial endpoint (no cache)", bare_us))
    plain = starlette_app()
    bare_starlette = await measure(lambda: call(plain, "/item"))
    rows.append(("bare Starlette app, trivial endpoint (no cache)", bare_starlette))
    ours_mem, _ = await ours(redis=False)
    rows.append(("Overdrive cache hit, memory", ours_mem))
    fc2_mem = await fastapi_cache2(redis=False)
    rows.append(("fastapi-cache2 hit, InMemoryBackend", fc2_mem))
    cashews_mem = await cashews_hit(redis=False)
    rows.append(("cashews hit, mem://", cashews_mem))
    have_redis = redis_up()
    raw = ours_redis = fc2_redis = cashews_redis = None
    if have_redis:
        raw = await raw_redis_get()
        rows.append(("raw redis.asyncio GET (no app)", raw))
        ours_redis, _ = await ours(redis=True)
        rows.append(("Overdrive cache hit, Redis (memory emptied each time)", ours_redis))
        fc2_redis = await fastapi_cache2(redis=True)
        rows.append(("fastapi-cache2 hit, RedisBackend", fc2_redis))
        cashews_redis = await cashews_hit(redis=True)
        rows.append(("cashews hit, redis://", cashews_redis))
    else:
        print("(Redis not running on 127.0.0.1:6379: Redis rows skipped)")
    slow = fastapi_app(work=0.001)
    slow_us = await measure(lambda: call(slow, "/item"), n=N // 4)
    rows.append(("bare FastAPI app, endpoint doing 1 ms of work (a miss)", slow_us))
    slow_hit, _ = await ours(redis=False, work=0.001)
    rows.append(("Overdrive cache hit on that endpoint, memory", slow_hit))

    width = max(len(name) for name, _ in rows) + 2
    print(
        f"{'in-process ASGI, ' + str(N) + ' requests x ' + str(ROUNDS) + ' rounds':<{width}}"
        f"{'us/req':>9}{'x bare':>9}"
    )
    print("-" * (width + 18))
    for name, us in rows:
        print(f"{name:<{width}}{us:>9.1f}{us / bare_us:>9.2f}")
    print("-" * (width + 18))
    print(f"fastapi-cache2 memory hit / our memory hit: {fc2_mem / ours_mem:.1f}x (goal >= 5x)")
    print(f"cashews memory hit / our memory hit: {cashews_mem / ours_mem:.1f}x")
    print(f"our memory hit / bare trivial endpoint: {ours_mem / bare_us:.2f} (goal < 1)")
    if have_redis and raw and ours_redis and fc2_redis and cashews_redis:
        floor = raw + bare_starlette
        print(
            f"our Redis hit / (raw GET + bare Starlette): {ours_redis / floor:.2f} "
            f"(goal <= 1.3); fastapi-cache2 Redis / ours: {fc2_redis / ours_redis:.1f}x, "
            f"cashews Redis / ours: {cashews_redis / ours_redis:.1f}x"
        )
    print(f"1 ms endpoint: miss / hit = {slow_us / slow_hit:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    asyncio.run(main())
