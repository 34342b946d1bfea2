"""The app `benchmarks/loadgen.py` serves: one endpoint the cache plugin answers."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive.middleware import OverdriveMiddleware


async def cached(request: Any) -> PlainTextResponse:
    return PlainTextResponse("x" * 256, headers={"cache-control": "max-age=3600"})


app = OverdriveMiddleware(
    Starlette(routes=[Route("/cached", cached)]), config={"plugins": ["cache"]}, env={}
)
