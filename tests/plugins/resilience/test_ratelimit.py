"""The `ratelimit` plugin on `limits`: memory by default, Redis shared, Redis down."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive import ConfigError, Overdrive
from overdrive.contrib.testing import check_plugin, serve
from overdrive.plugins.resilience import RateLimiter, RateLimitPlugin


async def hello(request: Any) -> PlainTextResponse:
    return PlainTextResponse("hi")


APP = Starlette(routes=[Route("/thumb", hello), Route("/generate", hello)])


def test_check_plugin() -> None:
    check_plugin(RateLimitPlugin)


async def test_429_with_retry_after_and_ratelimit_headers() -> None:
    config = {"plugins": ["ratelimit"], "ratelimit": {"limit": "3/minute"}}
    async with serve(APP, config=config) as h:
        remaining = []
        for _ in range(3):
            r = await h.client.get("/thumb")
            assert r.status_code == 200
            assert r.headers["ratelimit-limit"] == "3"
            assert r.headers["ratelimit-policy"] == "3;w=60"
            remaining.append(int(r.headers["ratelimit-remaining"]))
        assert remaining == [2, 1, 0]
        r = await h.client.get("/thumb")
        assert r.status_code == 429
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["ratelimit-remaining"] == "0"
        stats = (await h.host.get_system_stats())["ratelimit"]
        assert stats["limited"] == 1
        assert stats["backend"] == "memory"


async def test_client_key_from_a_header() -> None:
    config = {
        "plugins": ["ratelimit"],
        "ratelimit": {"limit": "1/minute", "key": "header:X-API-Key"},
    }
    async with serve(APP, config=config) as h:
        assert (await h.client.get("/thumb", headers={"x-api-key": "alice"})).status_code == 200
        assert (await h.client.get("/thumb", headers={"x-api-key": "alice"})).status_code == 429
        assert (await h.client.get("/thumb", headers={"x-api-key": "bob"})).status_code == 200


async def test_cost_and_limit_per_route() -> None:
    config = {
        "plugins": ["ratelimit"],
        "ratelimit": {"limit": "100/minute"},
        "routes": [{"path": "/generate", "ratelimit": {"limit": "4/minute", "cost": 2}}],
    }
    async with serve(APP, config=config) as h:
        assert (await h.client.get("/generate")).status_code == 200
        assert (await h.client.get("/generate")).status_code == 200
        assert (await h.client.get("/generate")).status_code == 429
        assert (await h.client.get("/thumb")).status_code == 200  # its own bucket


async def test_route_may_turn_it_off() -> None:
    config = {
        "plugins": ["ratelimit"],
        "ratelimit": {"limit": "1/minute"},
        "routes": [{"path": "/thumb", "ratelimit": {"enabled": False}}],
    }
    async with serve(APP, config=config) as h:
        for _ in range(3):
            r = await h.client.get("/thumb")
            assert r.status_code == 200
            assert "ratelimit-limit" not in r.headers


async def test_redis_shares_counts_between_workers(redis_url: str, namespace: str) -> None:
    config = {
        "plugins": ["ratelimit"],
        "ratelimit": {"limit": "2/minute", "storage_url": redis_url, "key_prefix": namespace},
    }
    async with serve(APP, config=config) as a, serve(APP, config=config) as b:
        assert (await a.client.get("/thumb")).status_code == 200
        assert (await b.client.get("/thumb")).status_code == 200
        assert (await a.client.get("/thumb")).status_code == 429
        assert (await b.host.get_system_stats())["ratelimit"]["backend"] == "redis"


async def test_redis_down_falls_back_to_local_counts(private_redis, namespace: str) -> None:  # type: ignore[no-untyped-def]
    config = {
        "plugins": ["ratelimit"],
        "ratelimit": {
            "limit": "3/minute",
            "storage_url": private_redis.url,
            "key_prefix": namespace,
        },
    }
    async with serve(APP, config=config) as h:
        assert (await h.client.get("/thumb")).status_code == 200
        private_redis.kill()
        codes = [(await h.client.get("/thumb")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]  # local counts from the fallback on
        stats = (await h.host.get_system_stats())["ratelimit"]
        assert stats["backend"] == "local-fallback"
        assert stats["storage_errors"] >= 1


async def test_hung_redis_does_not_hold_requests(private_redis, namespace: str) -> None:  # type: ignore[no-untyped-def]
    config = {
        "plugins": ["ratelimit"],
        "ratelimit": {
            "limit": "5/minute",
            "storage_url": private_redis.url,
            "key_prefix": namespace,
        },
    }
    async with serve(APP, config=config) as h:
        assert (await h.client.get("/thumb")).status_code == 200
        private_redis.stop()  # SIGSTOP: connections stay open, nothing answers
        try:
            assert (await h.client.get("/thumb")).status_code == 200
            assert (await h.host.get_system_stats())["ratelimit"]["backend"] == "local-fallback"
        finally:
            private_redis.cont()


async def test_limiter_on_its_own() -> None:
    limiter = RateLimiter("fixed-window")
    from limits import parse_many

    items = parse_many("2/second;3/minute")
    results = [(await limiter.hit(items, "api", "k"))[0] for _ in range(3)]
    assert results == [True, True, False]
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"limit": "lots"}, "ratelimit.limit"),
        ({"limit": ""}, "ratelimit.limit"),
        ({"key": "cookie"}, "ratelimit.key"),
        ({"key": "header:"}, "ratelimit.key"),
        ({"cost": 0}, "ratelimit.cost"),
        ({"strategy": "leaky"}, "ratelimit.strategy"),
    ],
)
def test_nonsense_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Overdrive({"plugins": ["ratelimit"], "ratelimit": table}, env={})


async def test_the_outage_warning_never_shows_the_storage_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from limits import parse_many

    from tests.support.faults import free_port

    url = f"redis://default:hunter2@127.0.0.1:{free_port()}/0?password=hunter2"  # nothing there
    limiter = RateLimiter("fixed-window", url, key_prefix="odtest")
    try:
        with caplog.at_level(logging.WARNING, logger="overdrive.plugins.ratelimit"):
            assert (await limiter.hit(parse_many("100/minute"), "b", "k"))[0]  # counted locally
        warned = [r.getMessage() for r in caplog.records if r.name == "overdrive.plugins.ratelimit"]
        assert len(warned) == 1 and "counting per process" in warned[0]
        assert "hunter2" not in warned[0] and "127.0.0.1" in warned[0]
    finally:
        await limiter.close()


async def test_the_fallback_is_a_warning_once_per_outage(  # type: ignore[no-untyped-def]
    private_redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    from limits import parse_many

    items = parse_many("100/minute")
    limiter = RateLimiter("fixed-window", private_redis.url, key_prefix=namespace)
    limiter.retry_interval = 0.0  # try Redis again at every hit: each one meets the outage
    try:
        with caplog.at_level(logging.WARNING, logger="overdrive.plugins.ratelimit"):
            assert (await limiter.hit(items, "b", "k"))[0]
            private_redis.kill()
            for _ in range(5):
                assert (await limiter.hit(items, "b", "k"))[0]  # counted per process
            private_redis.start()  # the same port again: the outage ends
            assert (await limiter.hit(items, "b", "k"))[0]
            private_redis.kill()  # a second outage is warned about again
            assert (await limiter.hit(items, "b", "k"))[0]
        warned = [r.getMessage() for r in caplog.records if r.name == "overdrive.plugins.ratelimit"]
        assert len(warned) == 3, warned
        assert "counting per process" in warned[0] and private_redis.url in warned[0]
        assert "answers again" in warned[1]
        assert "counting per process" in warned[2]
        assert limiter.errors == 6
    finally:
        await limiter.close()
