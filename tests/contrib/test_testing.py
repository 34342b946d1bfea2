"""The plugin authors' kit: check_plugin, the pytest fixtures, and every built-in plugin."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import overdrive
from overdrive.contrib.testing import HookRecorder, PluginContractError, check_plugin
from overdrive.discovery import discover


def test_a_good_plugin_passes() -> None:
    check_plugin(HookRecorder)
    check_plugin(HookRecorder("x"))


def test_problems_are_all_listed() -> None:
    @dataclasses.dataclass
    class Bad:
        ttl: int = "soon"  # type: ignore[assignment]

    class Wrong:
        Settings = Bad

        @overdrive.hookimpl
        def before_requets(self, ctx: Any) -> None: ...

        @overdrive.hookimpl
        def after_request(self, ctx: Any, extra: Any) -> None: ...

        @overdrive.hookimpl
        async def on_response_start(self, ctx: Any, status: int, headers: Any) -> None: ...

    with pytest.raises(PluginContractError) as info:
        check_plugin(Wrong)
    text = str(info.value)
    assert "no `name` attribute" in text
    assert "unknown hook 'before_requets'" in text
    assert "argument(s) ['extra'] not in the hookspec" in text
    assert "on_response_start is a sync hook" in text
    assert "Settings defaults do not validate" in text


def test_a_plugin_with_no_hooks_is_refused() -> None:
    class Empty(overdrive.Plugin):
        name = "empty"

    with pytest.raises(PluginContractError, match="implements no hook"):
        check_plugin(Empty)


BUILTIN = sorted(name for name, d in discover().items() if d.distribution == "overdrive")


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_plugin_keeps_the_contract(name: str) -> None:
    check_plugin(discover()[name].load())


async def test_fixtures_drive_an_app(overdrive_serve: Any, hook_recorder: HookRecorder) -> None:
    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    h = await overdrive_serve(Starlette(routes=[Route("/", ok)]), plugins=[hook_recorder])
    assert (await h.client.get("/")).text == "ok"
    assert hook_recorder.hooks[:3] == ["overdrive_configure", "overdrive_startup", "before_request"]
