"""FastAPI helpers: endpoint policies become route rules; dependencies reach the context."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI

import overdrive
from overdrive import ConfigError
from overdrive.contrib.fastapi import OverdriveContext, OverdriveHost, policy
from overdrive.contrib.testing import make_host, serve


@dataclasses.dataclass
class Settings:
    ttl: int | None = None


class Echo(overdrive.Plugin):
    """Puts its effective ttl for the request in a header."""

    name = "echo"
    Settings = Settings

    @overdrive.hookimpl
    def on_response_start(self, ctx: Any, status: int, headers: Any) -> None:
        headers.append((b"x-ttl", str(ctx.settings("echo").ttl).encode()))


def build() -> FastAPI:
    app = FastAPI()
    router = APIRouter(prefix="/api")

    @router.get("/thumbnails/{video_id}")
    @policy(echo={"ttl": 3600})
    async def thumbnail(video_id: str, ctx: OverdriveContext, host: OverdriveHost) -> Any:
        return {"id": video_id, "request_id": ctx.request_id, "plugins": list(host.plugins)}

    @router.get("/plain")
    async def plain() -> Any:
        return {}

    app.include_router(router)
    return app


async def test_policy_becomes_a_route_rule_from_the_template() -> None:
    async with serve(build(), plugins=[Echo()]) as h:
        thumb = await h.client.get("/api/thumbnails/abc", headers={"x-request-id": "r1"})
        plain = await h.client.get("/api/plain")
    assert thumb.headers["x-ttl"] == "3600"
    assert thumb.json() == {"id": "abc", "request_id": "r1", "plugins": ["echo"]}
    assert plain.headers["x-ttl"] == "None"
    assert "/api/thumbnails/{video_id}" in [r.path for r in h.host.routes.rules]


async def test_configuration_overrides_the_endpoint_policy() -> None:
    host = make_host(
        Echo(), config={"routes": [{"path": "/api/thumbnails/*", "echo": {"ttl": 60}}]}
    )
    async with serve(build(), host=host) as h:
        response = await h.client.get("/api/thumbnails/abc")
    assert response.headers["x-ttl"] == "60"


async def test_a_bad_policy_fails_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()

    @app.get("/x")
    @policy(echo={"ttl": "soon"})
    async def x() -> Any:
        return {}

    with pytest.raises(ConfigError, match=r"echo\.ttl: expected an integer or none"):
        async with serve(app, plugins=[Echo()]):
            pass
    # Without a lifespan: a 500 for every request, the reason logged once.
    async with serve(app, plugins=[Echo()], lifespan=False) as h:
        statuses = [(await h.client.get("/x")).status_code for _ in range(2)]
    assert statuses == [500, 500]
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "echo.ttl" in r.message]
    assert len(errors) == 1


def test_policy_rejects_non_tables() -> None:
    with pytest.raises(TypeError, match="expected a dict"):
        policy(cache=5)  # type: ignore[arg-type]


async def test_dependency_without_the_middleware_is_a_clear_500() -> None:
    import httpx

    app = build()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/api/thumbnails/abc")
    assert response.status_code == 500
    assert "OverdriveMiddleware is not installed" in response.text


async def test_context_on_demand_when_no_plugin_is_enabled() -> None:
    app = FastAPI()

    @app.get("/ids")
    async def ids(ctx: OverdriveContext, host: OverdriveHost) -> Any:
        return {"request_id": ctx.request_id, "plugins": list(host.plugins)}

    async with serve(app) as h:
        response = await h.client.get("/ids", headers={"x-request-id": "r9"})
    assert response.json() == {"request_id": "r9", "plugins": []}
    assert response.headers["x-request-id"] == "r9"
