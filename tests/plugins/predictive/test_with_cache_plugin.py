"""The predictive plugin with the real `cache` plugin, and PredictiveCache on AsyncCache."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import overdrive.plugins.cache as cache_mod
from overdrive.contrib.testing import make_host, serve
from overdrive.plugins.predictive import PredictiveCache, PredictivePlugin, is_prefetch


def make_app(app_calls: list[tuple[str, bool]]) -> Starlette:
    async def page(request: Request) -> Response:
        app_calls.append((request.url.path, is_prefetch(request.scope)))
        name = request.path_params["name"]
        headers = {} if name.startswith("nocache") else {"cache-control": "max-age=60"}
        return PlainTextResponse(f"page {name}", headers=headers)

    return Starlette(routes=[Route("/{name}", page)])


PREDICTIVE = {
    "min_support": 1,
    "prefetch_per_second": 1000,
    "refetch_after": 0,
    "client": "header:x-session",
}


async def test_prefetch_is_stored_by_the_cache_plugin_and_served_as_a_hit() -> None:
    app_calls: list[tuple[str, bool]] = []
    predictive = PredictivePlugin()
    host = make_host(predictive, cache_mod.CachePlugin(), config={"predictive": PREDICTIVE})
    async with serve(make_app(app_calls), host=host) as h:
        s = {"x-session": "s1"}
        for _ in range(3):  # learn /home -> /feed (the cache keeps both for 60 s)
            await h.client.get("/home", headers=s)
            await h.client.get("/feed", headers=s)
            await predictive.drain()
        await h.host.cache.clear()  # everything expired
        app_calls.clear()
        await h.client.get("/home", headers=s)
        await predictive.drain()
        assert ("/feed", True) in app_calls  # the prefetch reached the app once ...
        r = await h.client.get("/feed", headers=s)
        assert r.text == "page feed"
        assert ("/feed", False) not in app_calls  # ... and the client got the cached copy
        await predictive.drain()
        stats = (await h.host.get_system_stats())["predictive"]["prefetch"]
        assert stats["used"] >= 1
        # /home had been prefetched (it follows /feed) and clear() threw that copy
        # away: the client's /home was a MISS, which the plugin noticed.
        assert stats["not_kept"] == 1 and stats["refused_keys"] == 1


async def test_urls_the_cache_does_not_keep_stop_being_prefetched() -> None:
    app_calls: list[tuple[str, bool]] = []
    predictive = PredictivePlugin()
    host = make_host(predictive, cache_mod.CachePlugin(), config={"predictive": PREDICTIVE})
    async with serve(make_app(app_calls), host=host) as h:
        s = {"x-session": "s1"}
        for _ in range(6):  # /nocache-next has no freshness: the cache does not store it
            await h.client.get("/start", headers=s)
            await h.client.get("/nocache-next", headers=s)
            await predictive.drain()
        prefetches = [p for p, pre in app_calls if pre and p == "/nocache-next"]
        assert len(prefetches) <= 1  # tried once, then refused
        stats = predictive.collect_stats(host)["prefetch"]
        assert stats["refused_keys"] >= 1


async def test_predictive_cache_on_an_async_cache(redis_url: str, namespace: str) -> None:
    calls: list[str] = []

    async def loader(key: str) -> dict[str, Any]:
        calls.append(key)
        return {"key": key}

    backend = cache_mod.AsyncCache(cache_mod.CacheConfig(namespace=namespace), redis_url=redis_url)
    try:
        pc = PredictiveCache(100, cache=backend, min_support=2)
        pc.register_loader(loader)
        for _ in range(3):
            await pc.get("user_1")
            await pc.get("user_1_videos")
            await backend.delete("user_1_videos")
        calls.clear()
        await pc.get("user_1")
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert calls == ["user_1_videos"]  # prefetched into the AsyncCache
        assert await backend.get("user_1_videos") == {"key": "user_1_videos"}
        assert await pc.get("user_1_videos") == {"key": "user_1_videos"}
        assert calls == ["user_1_videos"]
        await pc.close()
    finally:
        await backend.clear()
        await backend.close()


async def test_prefetches_are_marked_internal_and_left_out_of_rate_limits() -> None:
    """A sub-request carrying the "overdrive.internal" extension is ctx.internal, and
    the rate limiter never counts it against a client."""

    from starlette.responses import PlainTextResponse

    from overdrive.contrib.testing import make_host
    from overdrive.middleware import OverdriveMiddleware

    seen: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["overdrive.ctx"].internal)
        await PlainTextResponse("ok")(scope, receive, send)

    host = make_host(config={"plugins": ["ratelimit"], "ratelimit": {"limit": "1/minute"}})
    mw = OverdriveMiddleware(app, host=host)
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    base = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": ("10.0.0.1", 1)}
    for _ in range(3):
        await mw({**base, "extensions": {"overdrive.internal": {}}}, receive, send)
    await mw(dict(base), receive, send)
    await mw(dict(base), receive, send)
    assert seen == [True, True, True, False]
    assert statuses == [200, 200, 200, 200, 429]
