"""The `breaker` plugin in front of an app, and around host.run operations."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive import ConfigError, Overdrive
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.plugins.resilience import BreakerPlugin, CircuitOpenError, RetryPlugin

calls: dict[str, int] = {}


def make_app() -> Starlette:
    calls.clear()

    async def flaky(request: Any) -> PlainTextResponse:
        calls["flaky"] = calls.get("flaky", 0) + 1
        return PlainTextResponse("broken", status_code=int(request.query_params.get("s", "500")))

    async def slow(request: Any) -> PlainTextResponse:
        calls["slow"] = calls.get("slow", 0) + 1
        await asyncio.sleep(5)
        return PlainTextResponse("late")

    async def crash(request: Any) -> PlainTextResponse:
        raise RuntimeError("app bug")

    async def fine(request: Any) -> PlainTextResponse:
        return PlainTextResponse("fine")

    return Starlette(
        routes=[
            Route("/flaky", flaky),
            Route("/slow", slow),
            Route("/crash", crash),
            Route("/fine", fine),
        ]
    )


CONFIG = {
    "plugins": ["timeout", "breaker"],
    "breaker": {"failure_threshold": 3, "recovery_timeout": 60},
    "routes": [
        {"path": "/flaky", "breaker": {}},
        {"path": "/slow", "breaker": {}, "timeout": {"seconds": 0.02}},
        {"path": "/crash", "breaker": {"failure_threshold": 2}},
    ],
}


def test_check_plugin() -> None:
    check_plugin(BreakerPlugin)


async def test_5xx_opens_and_open_answers_503_without_the_app() -> None:
    async with serve(make_app(), config=CONFIG) as h:
        for _ in range(3):
            assert (await h.client.get("/flaky")).status_code == 500
        r = await h.client.get("/flaky")
        assert r.status_code == 503
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert calls["flaky"] == 3
        assert (await h.client.get("/fine")).status_code == 200  # no breaker there
        stats = (await h.host.get_system_stats())["breaker"]
        assert stats["route:/flaky"]["state"] == "open"
        assert stats["route:/flaky"]["rejected_calls"] == 1


async def test_client_errors_do_not_count() -> None:
    async with serve(make_app(), config=CONFIG) as h:
        for _ in range(10):
            assert (await h.client.get("/flaky?s=404")).status_code == 404
        assert h.host.circuit_breakers["route:/flaky"].state == "closed"


async def test_timeouts_and_exceptions_count() -> None:
    async with serve(make_app(), config=CONFIG, raise_app_exceptions=False) as h:
        for _ in range(3):
            assert (await h.client.get("/slow")).status_code == 504
        assert (await h.client.get("/slow")).status_code == 503
        assert calls["slow"] == 3
        for _ in range(2):
            assert (await h.client.get("/crash")).status_code == 500
        assert (await h.client.get("/crash")).status_code == 503


async def test_half_open_lets_one_trial_through_then_closes() -> None:
    config = {
        "plugins": ["breaker"],
        "breaker": {"failure_threshold": 1, "recovery_timeout": 0.02},
        "routes": [{"path": "/flaky", "breaker": {}}],
    }
    async with serve(make_app(), config=config) as h:
        assert (await h.client.get("/flaky")).status_code == 500
        assert (await h.client.get("/flaky")).status_code == 503
        await asyncio.sleep(0.03)
        assert (await h.client.get("/flaky?s=200")).status_code == 200
        assert h.host.circuit_breakers["route:/flaky"].state == "closed"


async def test_all_routes_shares_a_default_breaker() -> None:
    config = {"plugins": ["breaker"], "breaker": {"failure_threshold": 1, "all_routes": True}}
    async with serve(make_app(), config=config) as h:
        assert (await h.client.get("/flaky")).status_code == 500
        assert (await h.client.get("/fine")).status_code == 503


async def test_operations_are_guarded_per_name() -> None:
    host = make_host(BreakerPlugin(), config={"breaker": {"failure_threshold": 2}})

    async def down() -> None:
        raise ConnectionError("downstream")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await host.run("external_api", down)
    with pytest.raises(CircuitOpenError):
        await host.run("external_api", down)
    assert await host.run("other", asyncio.sleep, 0, "ok") == "ok"
    assert host.circuit_breakers["op:external_api"].state == "open"


async def test_retries_are_each_recorded_by_the_breaker() -> None:
    host = make_host(
        BreakerPlugin(),
        RetryPlugin(),
        config={
            "plugins": ["breaker", "retry"],
            "breaker": {"failure_threshold": 3},
            "retry": {"attempts": 5, "wait_initial": 0, "wait_max": 0},
        },
    )
    attempts = 0

    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError

    with pytest.raises(CircuitOpenError):
        await host.run("api", down)
    assert attempts == 3  # the breaker opened after 3 failures; the 4th attempt was refused


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"failure_threshold": -1}, "breaker.failure_threshold"),
        ({"recovery_timeout": 0}, "breaker.recovery_timeout"),
        ({"sliding_window_size": 0}, "breaker.sliding_window_size"),
        ({"half_open_max_calls": 0}, "breaker.half_open_max_calls"),
        ({"sliding_window_type": "weekly"}, "breaker.sliding_window_type"),
        ({"shared": True}, "breaker.shared"),
    ],
)
def test_nonsense_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Overdrive({"plugins": ["breaker"], "breaker": table}, env={})


def test_route_rule_settings_are_checked_at_startup() -> None:
    with pytest.raises(ConfigError, match="failure_threshold"):
        Overdrive(
            {
                "plugins": ["breaker"],
                "routes": [{"path": "/x", "breaker": {"failure_threshold": 0}}],
            },
            env={},
        )


async def test_shared_breaker_through_the_plugin(redis_url: str, namespace: str) -> None:
    config = {
        "plugins": ["breaker"],
        "breaker": {
            "failure_threshold": 1,
            "shared": True,
            "redis_url": redis_url,
            "key_prefix": f"{namespace}:",
        },
        "routes": [{"path": "/flaky", "breaker": {}}],
    }
    async with serve(make_app(), config=config) as a, serve(make_app(), config=config) as b:
        assert (await a.client.get("/flaky")).status_code == 500
        await asyncio.sleep(0.3)  # past the other worker's sync interval
        assert (await b.client.get("/flaky")).status_code == 503


async def test_half_open_race_through_the_middleware() -> None:
    gate = asyncio.Event()
    entered = 0

    async def trial(request: Any) -> PlainTextResponse:
        nonlocal entered
        entered += 1
        if request.query_params.get("fail"):
            return PlainTextResponse("down", status_code=500)
        await gate.wait()
        return PlainTextResponse("up")

    app = Starlette(routes=[Route("/gen", trial)])
    config = {
        "plugins": ["breaker"],
        "breaker": {"failure_threshold": 1, "recovery_timeout": 0.02, "half_open_max_calls": 2},
        "routes": [{"path": "/gen", "breaker": {}}],
    }
    async with serve(app, config=config) as h:
        assert (await h.client.get("/gen?fail=1")).status_code == 500
        await asyncio.sleep(0.03)
        entered = 0
        tasks = [asyncio.ensure_future(h.client.get("/gen")) for _ in range(50)]
        for _ in range(500):
            if sum(t.done() for t in tasks) + entered >= len(tasks):
                break
            await asyncio.sleep(0.01)
        assert entered == 2
        gate.set()
        codes = sorted(r.status_code for r in await asyncio.gather(*tasks))
        assert codes == [200] * 2 + [503] * 48
        assert h.host.circuit_breakers["route:/gen"].state == "closed"


async def test_answers_of_other_plugins_are_not_the_apps_outcome() -> None:
    config = {
        "plugins": ["breaker", "ratelimit"],  # breaker first: the worst order
        "breaker": {"failure_threshold": 1, "all_routes": True},
        "ratelimit": {"limit": "1/minute"},
    }
    async with serve(make_app(), config=config) as h:
        assert (await h.client.get("/fine")).status_code == 200
        for _ in range(3):
            assert (await h.client.get("/fine")).status_code == 429
        stats = h.host.circuit_breakers["route:default"].get_stats()
        assert stats["state"] == "closed"
        assert stats["total_calls"] == 1
