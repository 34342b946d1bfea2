"""Under a real uvicorn: a generation longer than the client's timeout.

The scale is shortened (a 2 s generation behind a 1 s client timeout, for a 20 s
one behind 10 s) to keep the suite fast; the relation is what matters.
"""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from overdrive.middleware import OverdriveMiddleware
from tests.support.server import serving

GENERATION_S = 2.0
CLIENT_TIMEOUT_S = 1.0


def make_app(runs: list[bytes]) -> OverdriveMiddleware:
    async def generate(request: Request) -> Response:
        body = await request.body()
        runs.append(body)
        ctx = request.scope["overdrive.ctx"]
        for step in range(4):
            ctx.progress(step / 4, f"step {step}/4")
            await asyncio.sleep(GENERATION_S / 4)
        return JSONResponse({"video": f"/files/{body.decode()}.mp4"})

    app = Starlette(routes=[Route("/generate", generate, methods=["POST"])])
    return OverdriveMiddleware(
        app,
        config={
            "plugins": ["jobs"],
            "jobs": {"workers": 8},
            "routes": [{"path": "/generate", "jobs": {"job": True, "idempotency": "optional"}}],
        },
    )


async def test_sync_calls_time_out_and_async_submissions_all_succeed() -> None:
    runs: list[bytes] = []
    with serving(make_app(runs)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
            sync = await asyncio.gather(
                *(client.post("/generate", content=b"s%d" % i) for i in range(4)),
                return_exceptions=True,
            )
            assert all(isinstance(r, httpx.TimeoutException) for r in sync)
            submitted = await asyncio.gather(
                *(
                    client.post(
                        "/generate", content=b"a%d" % i, headers={"prefer": "respond-async"}
                    )
                    for i in range(8)
                )
            )
            assert [r.status_code for r in submitted] == [202] * 8
            results = {}
            while len(results) < 8:
                for i, r in enumerate(submitted):
                    if i in results:
                        continue
                    m = await client.get(r.headers["location"])
                    if m.headers["overdrive-job-state"] == "succeeded":
                        results[i] = m.json()["video"]
                    else:
                        assert m.headers["overdrive-job-state"] in ("queued", "running")
                await asyncio.sleep(0.2)
            assert results == {i: f"/files/a{i}.mp4" for i in range(8)}


async def test_a_hundred_retried_posts_with_one_key_run_the_generation_once() -> None:
    runs: list[bytes] = []
    with serving(make_app(runs)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
            headers = {"idempotency-key": "order-42"}
            attempts = await asyncio.gather(
                *(client.post("/generate", content=b"v", headers=headers) for _ in range(100)),
                return_exceptions=True,
            )
            assert all(isinstance(r, httpx.TimeoutException) for r in attempts)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            final = await client.post("/generate", content=b"v", headers=headers)
            assert final.status_code == 200 and final.json() == {"video": "/files/v.mp4"}
            assert final.headers["idempotent-replayed"] == "true"
    assert runs == [b"v"]
