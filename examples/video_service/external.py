"""A stand-in for an external recommendation service, which can be told to fail.

`./run demo` starts it beside the video service (port 8001). The video service
calls it through ``host.run("recommender", ...)``, so the breaker, retry and
timeout plugins guard the call. Make it misbehave and watch the breaker open
on the dashboard::

    curl -X POST localhost:8001/control -H 'content-type: application/json' \\
         -d '{"fail": true}'              # every call answers 503
    curl -X POST localhost:8001/control -d '{"fail": false, "delay": 2.0}' \\
         -H 'content-type: application/json'   # slow: the timeout plugin cuts it
    curl localhost:8001/control            # the current behaviour

    uvicorn examples.video_service.external:app --port 8001
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

#: How the service behaves now; changed through POST /control.
BEHAVIOUR: dict[str, Any] = {"fail": False, "delay": 0.01, "error_rate": 0.0}
CALLS = {"ok": 0, "failed": 0}


async def recommendations(request: Request) -> JSONResponse:
    await asyncio.sleep(float(BEHAVIOUR["delay"]))
    if BEHAVIOUR["fail"] or random.random() < float(BEHAVIOUR["error_rate"]):
        CALLS["failed"] += 1
        return JSONResponse({"error": "recommender unavailable"}, status_code=503)
    CALLS["ok"] += 1
    video_id = int(request.path_params["video_id"])
    items = [(video_id * 7 + k * 13) % 500 + 1 for k in range(1, 6)]
    return JSONResponse({"video_id": video_id, "items": items, "source": "recommender"})


async def control(request: Request) -> JSONResponse:
    if request.method == "POST":
        try:
            changes = await request.json()
        except ValueError:
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        if not isinstance(changes, dict) or not set(changes) <= set(BEHAVIOUR):
            return JSONResponse(
                {"error": f"expected a JSON object with keys from {sorted(BEHAVIOUR)}"},
                status_code=400,
            )
        try:
            update = {
                "fail": bool(changes.get("fail", BEHAVIOUR["fail"])),
                "delay": max(0.0, float(changes.get("delay", BEHAVIOUR["delay"]))),
                "error_rate": min(
                    1.0, max(0.0, float(changes.get("error_rate", BEHAVIOUR["error_rate"])))
                ),
            }
        except (TypeError, ValueError):
            return JSONResponse({"error": "delay and error_rate: numbers"}, status_code=400)
        BEHAVIOUR.update(update)
    return JSONResponse({**BEHAVIOUR, "calls": CALLS})


app = Starlette(
    routes=[
        Route("/recommendations/{video_id:int}", recommendations),
        Route("/control", control, methods=["GET", "POST"]),
    ]
)
