"""End to end under a real server: uvicorn on loopback sends the lifespan and real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive.contrib.testing import HookRecorder, make_host
from overdrive.middleware import OverdriveMiddleware
from tests.support.faults import free_port

uvicorn = pytest.importorskip("uvicorn")


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_real_server_runs_the_lifespan_and_requests() -> None:
    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    recorder = HookRecorder()
    app = OverdriveMiddleware(Starlette(routes=[Route("/", ok)]), host=make_host(recorder))
    async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/", headers={"x-request-id": "real-1"})
        assert recorder.hooks[:2] == ["overdrive_configure", "overdrive_startup"]
    assert (response.text, response.headers["x-request-id"]) == ("ok", "real-1")
    assert recorder.hooks[-1] == "overdrive_shutdown"
    assert recorder.hooks.count("after_request") == 1
