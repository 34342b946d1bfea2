"""The `timeout` plugin: per-route request deadlines (504) and per-operation deadlines."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive import ConfigError, Overdrive
from overdrive.contrib.testing import HookRecorder, check_plugin, make_host, serve
from overdrive.plugins.resilience import TimeoutPlugin

state: dict[str, Any] = {}


async def slow(request: Any) -> PlainTextResponse:
    state["started"] = True
    try:
        await asyncio.sleep(5)
    except asyncio.CancelledError:
        state["cancelled"] = True
        raise
    return PlainTextResponse("late")


async def quick(request: Any) -> PlainTextResponse:
    return PlainTextResponse("quick")


APP = Starlette(routes=[Route("/slow", slow), Route("/quick", quick)])


def test_check_plugin() -> None:
    check_plugin(TimeoutPlugin)


async def test_route_timeout_answers_504_and_cancels_the_app() -> None:
    state.clear()
    recorder = HookRecorder()
    host = make_host(
        TimeoutPlugin(),
        recorder,
        config={
            "plugins": ["timeout", "recorder"],
            "routes": [{"path": "/slow", "timeout": {"seconds": 0.02}}],
        },
    )
    async with serve(APP, host=host) as h:
        r = await h.client.get("/slow")
        assert r.status_code == 504
        assert r.text == "Gateway Timeout"
        assert state == {"started": True, "cancelled": True}
        assert recorder.hooks[-1] == "after_request"
        assert (await h.client.get("/quick")).text == "quick"


async def test_global_timeout_and_tighter_route_timeout() -> None:
    config = {
        "plugins": ["timeout"],
        "timeout": {"seconds": 10},
        "routes": [{"path": "/slow", "timeout": {"seconds": 0.01}}],
    }
    async with serve(APP, config=config) as h:
        assert (await h.client.get("/slow")).status_code == 504


async def test_operation_timeouts() -> None:
    plugin = TimeoutPlugin()
    host = make_host(
        plugin,
        config={"timeout": {"operation_seconds": 5, "operations": {"model": 0.01}}},
    )
    with pytest.raises(TimeoutError):
        await host.run("model", asyncio.sleep, 1)
    assert await host.run("other", asyncio.sleep, 0, "ok") == "ok"
    assert (await host.get_system_stats())["timeout"]["operation_timeouts"] == 1


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"seconds": 0}, "timeout.seconds"),
        ({"seconds": -3}, "timeout.seconds"),
        ({"operation_seconds": 0}, "timeout.operation_seconds"),
        ({"operations": {"db": -1}}, "timeout.operations.db"),
        ({"seconds": "soon"}, "timeout.seconds"),
    ],
)
def test_nonsense_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Overdrive({"plugins": ["timeout"], "timeout": table}, env={})
