"""Startup that fails loudly: configuration errors as lifespan.startup.failed, the app's
own lifespan untouched, and a real uvicorn that exits before serving."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive import ConfigError, PluginLoadError
from overdrive.contrib.testing import HookRecorder, make_host, serve
from overdrive.middleware import OverdriveMiddleware
from tests.support.faults import free_port

Message = dict[str, Any]


async def ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def drive(app: Any) -> tuple[list[Message], BaseException | None]:
    """Run `app`'s lifespan as a server does: what it sent, and what it raised."""
    incoming: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(dict(message))

    try:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    except Exception as exc:
        return sent, exc
    return sent, None


async def test_a_bad_config_fails_the_startup_with_its_one_line_message() -> None:
    ran: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        ran.append("app startup")
        yield

    app = Starlette(routes=[Route("/", ok)], lifespan=lifespan)
    app.add_middleware(OverdriveMiddleware, config={"plugins": ["nosuch"]}, env={})
    sent, raised = await drive(app)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert sent[0]["message"].startswith("plugins: unknown plugin 'nosuch'; available: ")
    assert "\n" not in sent[0]["message"]
    assert isinstance(raised, PluginLoadError)
    assert ran == []  # the app's own startup never ran


@pytest.mark.parametrize("where", ["receive", "send"])
async def test_the_apps_own_lifespan_failure_reaches_the_server_as_without_us(where: str) -> None:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("no database")

    def build() -> Any:
        if where == "send":  # Starlette answers startup.failed with the traceback, re-raises
            return Starlette(routes=[Route("/", ok)], lifespan=lifespan)
        return raw  # a raw app that reads the startup and raises without answering

    recorder = HookRecorder()
    bare = await drive(build())
    wrapped = await drive(OverdriveMiddleware(build(), host=make_host(recorder)))
    assert [m["type"] for m in wrapped[0]] == [m["type"] for m in bare[0]]
    assert type(wrapped[1]) is type(bare[1]) is RuntimeError
    assert str(wrapped[1]) == str(bare[1]) == "no database"
    assert recorder.hooks.count("overdrive_startup") == 1
    assert recorder.hooks[-1] == "overdrive_shutdown"  # ours stopped again


async def test_an_app_refusing_the_lifespan_scope_refuses_it_through_us() -> None:
    async def raw(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"

    recorder = HookRecorder()
    sent, raised = await drive(OverdriveMiddleware(raw, host=make_host(recorder)))
    assert sent == []
    assert isinstance(raised, AssertionError)
    assert "overdrive_startup" not in recorder.hooks  # it starts at the first request


async def test_without_lifespan_a_bad_config_answers_500_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = OverdriveMiddleware(
        Starlette(routes=[Route("/", ok)]),
        config={"plugins": ["cache"], "cache": {"default_ttl": "soon"}},
        env={},
    )
    assert isinstance(app.error, ConfigError)
    with caplog.at_level(logging.ERROR, logger="overdrive"):
        async with serve(app, lifespan=False) as h:
            responses = [await h.client.get("/") for _ in range(3)]
    assert [r.status_code for r in responses] == [500, 500, 500]
    assert "soon" not in responses[0].text  # never the error text to a client
    logged = [r for r in caplog.records if "cache.default_ttl" in r.getMessage()]
    assert [r.levelname for r in logged] == ["ERROR"]
    assert logged[0].name == "overdrive.middleware"


# -- under a real uvicorn --------------------------------------------------------------

APP = textwrap.dedent(
    """
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from overdrive.middleware import OverdriveMiddleware

    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", ok)])
    app.add_middleware(OverdriveMiddleware, {config})
    """
)


def uvicorn_start(tmp_path: Path, config: str, env: dict[str, str] | None = None) -> Any:
    (tmp_path / "service.py").write_text(APP.format(config=config))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OVERDRIVE_")}
    return subprocess.run(
        [sys.executable, "-m", "uvicorn", "service:app", "--port", str(free_port())],
        cwd=tmp_path,
        env={**clean, "PYTHONPATH": str(tmp_path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,  # a server that did not refuse would serve on and hit this
    )


@pytest.mark.parametrize(
    ("config", "files", "env", "message"),
    [
        (
            "config={'plugins': ['profiler', 'cahce']}",
            {},
            {},
            "plugins: unknown plugin 'cahce'; available: ",
        ),
        (
            "",
            {"overdrive.toml": 'plugins = ["cache"]\n\n[cache]\ndefault_ttl = "soon"\n'},
            {},
            "cache.default_ttl: expected an integer or none, got 'soon' (at {dir}/overdrive.toml, "
            "line 4)",
        ),
        (
            "",
            {"overdrive.toml": 'plugins = ["cache"]\n[cache]\ndefault_ttl = = 5\n'},
            {},
            "config file '{dir}/overdrive.toml': invalid TOML: Invalid value "
            "(at line 3, column 15)",
        ),
        (
            "",
            {},
            {"OVERDRIVE_PLUGINS": "cache", "OVERDRIVE_CACHE__DEFAULT_TTL": "soon"},
            "cache.default_ttl: expected an integer or none, got 'soon' "
            "(from OVERDRIVE_CACHE__DEFAULT_TTL)",
        ),
    ],
    ids=["unknown-plugin", "toml-value", "toml-syntax", "environment"],
)
def test_uvicorn_exits_before_serving_with_the_message(
    tmp_path: Path, config: str, files: dict[str, str], env: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    done = uvicorn_start(tmp_path, config, env)
    assert done.returncode == 3  # uvicorn: startup failed
    assert message.format(dir=tmp_path.resolve()) in done.stderr
    assert "Application startup failed. Exiting." in done.stderr
    assert "Application startup complete" not in done.stderr
    assert "Traceback" not in done.stderr  # the one line is the whole story
