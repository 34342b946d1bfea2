"""The predictive plugin over HTTP: it warms whatever response cache is enabled.

The cache here is a tiny test-only plugin (store a captured 200 response, serve
it on the next GET): prefetch sub-requests go through the middleware, so any
cache plugin stores them the same way.
"""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from overdrive import CapturedResponse, ConfigError, RequestContext, hookimpl
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.plugins.predictive import PredictivePlugin, is_prefetch


class TinyCache:
    """Stores 200 responses that are not private; serves them to later GETs."""

    name = "tinycache"

    def __init__(self) -> None:
        self.store: dict[str, CapturedResponse] = {}
        self.stored_by_prefetch: list[str] = []

    @hookimpl
    def cache_lookup(self, ctx: RequestContext) -> Any:
        if ctx.method != "GET":
            return None
        hit = self.store.get(ctx.path)
        if hit is not None:
            return Response(hit.body, hit.status, headers={"x-cache": "HIT"})
        ctx.capture_response(1 << 20)
        return None

    @hookimpl
    def cache_store(self, ctx: RequestContext, response: CapturedResponse) -> None:
        cc = dict(response.headers).get(b"cache-control", b"")
        if response.status == 200 and b"private" not in cc:
            self.store[ctx.path] = response
            if is_prefetch(ctx.scope):
                self.stored_by_prefetch.append(ctx.path)


class Traffic:
    """Counts requests as the app saw them, split into client and prefetch ones."""

    name = "traffic"

    def __init__(self) -> None:
        self.client: list[str] = []
        self.prefetch: list[str] = []

    @hookimpl
    def after_request(self, ctx: RequestContext) -> None:
        (self.prefetch if is_prefetch(ctx.scope) else self.client).append(ctx.path)


def make_app(app_calls: list[tuple[str, bool]]) -> Starlette:
    async def page(request: Request) -> Response:
        app_calls.append((request.url.path, is_prefetch(request.scope)))
        name = request.path_params["name"]
        headers = {"cache-control": "private"} if name == "private" else {}
        return PlainTextResponse(f"page {name}", headers=headers)

    return Starlette(routes=[Route("/{name}", page)])


CONFIG = {
    "predictive": {
        "min_support": 1,
        "prefetch_per_second": 1000,
        "refetch_after": 0,
        "client": "header:x-session",
    }
}


async def test_prefetch_warms_the_response_cache() -> None:
    app_calls: list[tuple[str, bool]] = []
    cache, traffic, predictive = TinyCache(), Traffic(), PredictivePlugin()
    host = make_host(predictive, cache, traffic, config=CONFIG)
    async with serve(make_app(app_calls), host=host) as h:
        session = {"x-session": "s1"}
        for _ in range(3):  # learn: /home is followed by /feed
            await h.client.get("/home", headers=session)
            await h.client.get("/feed", headers=session)
            await predictive.drain()
        cache.store.clear()  # everything expired
        app_calls.clear()

        r = await h.client.get("/home", headers=session)
        assert r.text == "page home"
        await predictive.drain()
        assert ("/feed", True) in app_calls  # fetched by a sub-request ...
        assert "/feed" in cache.stored_by_prefetch  # ... and stored by the cache plugin
        r = await h.client.get("/feed", headers=session)
        assert r.text == "page feed" and r.headers["x-cache"] == "HIT"
        assert ("/feed", False) not in app_calls  # the client's request never reached the app

        await predictive.drain()
        stats = (await h.host.get_system_stats())["predictive"]
        assert stats["prefetch"]["used"] >= 1
        # Sub-requests are not client traffic: not learned from, not prefetched after.
        assert stats["observed"] == len(traffic.client) == 8
        assert "/feed" in traffic.prefetch  # (and /home, which follows /feed)
        assert set(traffic.prefetch) <= {"/feed", "/home"}
        assert stats["prefetch"]["issued"] == len(traffic.prefetch)


async def test_private_and_personal_responses_are_never_prefetched() -> None:
    app_calls: list[tuple[str, bool]] = []
    predictive = PredictivePlugin()
    host = make_host(predictive, TinyCache(), config=CONFIG)
    async with serve(make_app(app_calls), host=host) as h:
        for _ in range(4):
            await h.client.get("/start", headers={"x-session": "s"})
            await h.client.get("/private", headers={"x-session": "s"})  # Cache-Control: private
            await h.client.get("/start", headers={"x-session": "t", "cookie": "sid=1"})
            await h.client.get("/mine", headers={"x-session": "t", "cookie": "sid=1"})
            await predictive.drain()
        prefetched = {path for path, pre in app_calls if pre}
        assert prefetched <= {"/start"}  # /start is public; /private and /mine never
        stats = (await h.host.get_system_stats())["predictive"]
        assert stats["observed"] == 8  # the cookie-carrying requests were not learned


async def test_random_browsing_prefetches_almost_nothing() -> None:
    import random

    rng = random.Random(11)
    app_calls: list[tuple[str, bool]] = []
    predictive = PredictivePlugin()
    config = {"predictive": {"prefetch_per_second": 1000, "refetch_after": 0}}
    host = make_host(predictive, TinyCache(), config=config)
    async with serve(make_app(app_calls), host=host) as h:
        for _ in range(300):
            await h.client.get(f"/p{rng.randrange(30)}")
        await predictive.drain()
    stats = predictive.collect_stats(host)
    assert stats["prefetch"]["issued"] <= 6  # at most 2% of 300 requests


def test_plugin_contract_and_settings() -> None:
    check_plugin(PredictivePlugin)
    with pytest.raises(ConfigError, match=r"predictive.client: expected '', 'ip' or"):
        make_host(PredictivePlugin, config={"predictive": {"client": "cookie"}})
    with pytest.raises(ConfigError, match=r"predictive.threshold"):
        make_host(PredictivePlugin, config={"predictive": {"threshold": 1.5}})
    with pytest.raises(ConfigError, match=r"predictive.max_inflight: expected >= 1"):
        make_host(PredictivePlugin, config={"predictive": {"max_inflight": 0}})
