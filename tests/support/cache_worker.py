"""A cache worker process for the scale-out tests: ``python -m uvicorn
tests.support.cache_worker:create_app --factory``, configured by environment.

``GET /slow`` counts each call in Redis (``<namespace>:origin_calls``, so the count
survives a killed worker), takes ``SLOW_SECONDS`` and answers a cacheable 200.
``GET /health`` answers at once (no plugin keys it). ``CACHE_LOCK_LEASE`` sets the
cross-worker lock's lease when given.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from overdrive.middleware import OverdriveMiddleware


def create_app() -> Any:
    url = os.environ["REDIS_URL"]
    namespace = os.environ["NAMESPACE"]
    slow = float(os.environ.get("SLOW_SECONDS", "1"))
    counter = f"{namespace}:origin_calls"
    client = aioredis.Redis.from_url(url)

    async def render(request: Request) -> Response:
        await client.incr(counter)
        await asyncio.sleep(slow)
        return PlainTextResponse(
            f"rendered by {os.getpid()}", headers={"cache-control": "max-age=600"}
        )

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok", headers={"cache-control": "no-store"})

    cache: dict[str, Any] = {"redis_url": url, "namespace": f"{namespace}:http"}
    if "CACHE_LOCK_LEASE" in os.environ:
        cache["lock_lease"] = float(os.environ["CACHE_LOCK_LEASE"])
    if "CACHE_LOCK_TTL" in os.environ:
        cache["lock_ttl"] = float(os.environ["CACHE_LOCK_TTL"])
    app = Starlette(routes=[Route("/slow", render), Route("/health", health)])
    return OverdriveMiddleware(app, config={"plugins": ["cache"], "cache": cache})
