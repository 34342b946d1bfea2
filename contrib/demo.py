"""The app `overdrive demo` serves: a small FastAPI service with every built-in plugin on.

Every plugin runs on its embedded default (memory cache, local state, simulated
GPUs), so the demo needs no Redis, database or GPU. Route rules are added only
for the plugins that are installed, so the demo runs at every stage of the project.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from overdrive.contrib.fastapi import OverdriveContext, OverdriveHost
from overdrive.discovery import discover
from overdrive.middleware import OverdriveMiddleware

BUILTIN = sorted(name for name, found in discover().items() if found.distribution == "overdrive")

# Per-route settings for the built-in plugins, used when that plugin is installed.
ROUTE_POLICIES: list[dict[str, Any]] = [
    {"path": "/thumbnails/*", "cache": {"ttl": 3600}},
    {"path": "/render/*", "gpu": {"memory_mb": 2048}, "timeout": {"seconds": 30}},
    {"path": "/flaky", "breaker": {"failure_threshold": 3}},
]


def demo_config() -> dict[str, Any]:
    available = set(BUILTIN)
    routes = []
    for rule in ROUTE_POLICIES:
        kept = {k: v for k, v in rule.items() if k == "path" or k in available}
        if len(kept) > 1:
            routes.append(kept)
    config: dict[str, Any] = {"plugins": BUILTIN, "routes": routes}
    if "stats" in available:
        # The demo listens on loopback only: its dashboard needs no token.
        config["stats"] = {"public": True}
    return config


app = FastAPI(title="Overdrive demo")


@app.get("/", response_class=HTMLResponse)
async def index() -> str:
    links = "".join(
        f'<li><a href="{path}">{path}</a></li>'
        for path in ("/hello", "/thumbnails/1", "/render/1", "/flaky", "/stats")
    )
    return f"<h1>Overdrive demo</h1><p>Plugins: {', '.join(BUILTIN) or 'none'}</p><ul>{links}</ul>"


@app.get("/hello")
async def hello(ctx: OverdriveContext) -> dict[str, Any]:
    return {"hello": "world", "request_id": ctx.request_id}


@app.get("/thumbnails/{video_id}")
async def thumbnail(video_id: str) -> Response:
    await asyncio.sleep(0.05)  # pretend to render
    digest = hashlib.sha256(video_id.encode()).hexdigest()
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="36"><rect width="64" height="36" fill="#{digest[:6]}"/></svg>'  # noqa: E501
    return Response(svg, media_type="image/svg+xml")


@app.get("/render/{video_id}")
async def render(video_id: str, ctx: OverdriveContext) -> dict[str, Any]:
    await asyncio.sleep(0.2)  # a stand-in for GPU work
    lease = ctx.lease
    return {"video": video_id, "device": lease.device if lease else None}


_flaky_calls = 0


@app.get("/flaky")
async def flaky() -> dict[str, Any]:
    global _flaky_calls
    _flaky_calls += 1
    if _flaky_calls % 3 == 0:
        return Response("downstream failed", status_code=502)  # type: ignore[return-value]
    return {"ok": True}


@app.get("/stats")
async def stats(host: OverdriveHost) -> dict[str, Any]:
    return await host.get_system_stats()


app.add_middleware(OverdriveMiddleware, config=demo_config())
