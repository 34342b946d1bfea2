"""The jobs plugin over ASGI: submission, the status monitor, progress, cancel, bounds.

Endpoints here block on events the test releases, so no assertion depends on time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import overdrive.plugins.jobs as jobs_mod
from overdrive import ConfigError, Lease, Overdrive, RequestContext, hookimpl
from overdrive.contrib.testing import check_plugin, serve
from overdrive.plugins.jobs import JobsPlugin, is_job

ASYNC = {"prefer": "respond-async"}


def test_public_names_are_pinned() -> None:
    assert jobs_mod.__all__ == sorted(jobs_mod.__all__)
    assert jobs_mod.__all__ == [
        "FairQueue",
        "JobsPlugin",
        "JobsSettings",
        "QueueFull",
        "TenantFull",
        "is_job",
    ]


def test_contract() -> None:
    check_plugin(JobsPlugin())


class Gate:
    """An endpoint's work: counts runs, reports progress, waits until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = 0

    async def endpoint(self, request: Request) -> Response:
        ctx: RequestContext = request.scope["overdrive.ctx"]
        body = await request.body()
        self.runs += 1
        ctx.progress(0.4, "denoising step 20/50")
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if body == b"big":
            return Response(b"x" * 5000)
        if body == b"boom":
            raise RuntimeError("secret detail")
        return JSONResponse(
            {"echo": body.decode(), "q": request.url.query}, status_code=201, headers={"x-v": "7"}
        )


class Leases:
    """A GPU stand-in: one lease per request on /gen, counted when released."""

    name = "leases"

    def __init__(self) -> None:
        self.held = 0
        self.admitted: list[bool] = []  # per request: was it a job's replay

    @hookimpl
    def before_request(self, ctx: RequestContext) -> None:
        self.admitted.append(is_job(ctx.scope))

    @hookimpl
    def gpu_allocate(self, ctx: RequestContext) -> Lease:
        self.held += 1
        return Lease(0, 1)

    @hookimpl
    def gpu_release(self, ctx: RequestContext, lease: Lease) -> None:
        self.held -= 1


def config(**jobs: Any) -> dict[str, Any]:
    route = {"job": True, "idempotency": "optional"}
    route.update(jobs.pop("route", {}))
    return {
        "plugins": ["jobs"],
        "jobs": {"max_body": 1000, "max_result_bytes": 1000, **jobs},
        "routes": [{"path": "/gen", "jobs": route}],
    }


def app_for(gate: Gate) -> Starlette:
    return Starlette(routes=[Route("/gen", gate.endpoint, methods=["POST"])])


async def until(predicate: Any) -> None:
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


async def test_async_submission_answers_202_and_the_monitor_returns_the_sync_response() -> None:
    gate = Gate()
    gate.release.set()
    async with serve(app_for(gate), config=config()) as h:
        sync = await h.client.post("/gen?n=1", content=b"hello")
        r = await h.client.post("/gen?n=1", content=b"hello", headers=ASYNC)
        assert r.status_code == 202
        assert r.headers["preference-applied"] == "respond-async"
        assert r.headers["retry-after"] == "1"
        location = r.headers["location"]
        job_id = location.rsplit("/", 1)[1]
        assert location == f"/_jobs/{job_id}" and len(job_id) == 22
        assert r.json()["state"] == "queued" and r.json()["durable"] is False
        await until(lambda: gate.runs == 2)
        for _ in range(200):
            done = await h.client.get(location)
            if done.headers["overdrive-job-state"] == "succeeded":
                break
            await asyncio.sleep(0.01)
        assert done.status_code == sync.status_code == 201
        assert done.content == sync.content == b'{"echo":"hello","q":"n=1"}'
        assert done.headers["x-v"] == sync.headers["x-v"] == "7"
        assert done.headers["content-type"] == sync.headers["content-type"]
        assert done.headers.get_list("x-request-id") == [done.headers["x-request-id"]]
        status = (await h.client.get(location + "/status")).json()
        assert status["state"] == "succeeded" and status["result"] == {"status": 201, "bytes": 26}


async def test_progress_and_state_while_running_then_sse_to_the_end() -> None:
    gate = Gate()
    async with serve(app_for(gate), config=config()) as h:
        r = await h.client.post("/gen", content=b"a", headers=ASYNC)
        location = r.headers["location"]
        await gate.started.wait()
        running = await h.client.get(location)
        assert running.status_code == 200 and running.headers["retry-after"] == "1"
        data = running.json()
        assert data["state"] == "running" and data["started_at"] is not None
        assert data["progress"] == {"fraction": 0.4, "message": "denoising step 20/50"}
        stream = asyncio.ensure_future(
            h.client.get(location, headers={"accept": "text/event-stream"})
        )
        await asyncio.sleep(0.05)
        gate.release.set()
        sse = await stream
        assert sse.headers["content-type"].startswith("text/event-stream")
        events = [
            json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")
        ]
        assert events[0]["state"] == "running" and events[-1]["state"] == "succeeded"


async def test_wait_answers_synchronously_when_done_in_time_else_202() -> None:
    gate = Gate()
    gate.release.set()
    async with serve(app_for(gate), config=config()) as h:
        r = await h.client.post("/gen", content=b"w", headers={"prefer": "wait=30"})
        assert r.status_code == 201 and r.json()["echo"] == "w"
        gate.release.clear()
        r = await h.client.post("/gen", content=b"w", headers={"prefer": "wait=0.05"})
        assert r.status_code == 202 and r.headers["location"]


async def test_a_rule_can_make_async_the_default_and_without_it_a_job_route_stays_sync() -> None:
    gate = Gate()
    gate.release.set()
    async with serve(app_for(gate), config=config(route={"async_default": True})) as h:
        assert (await h.client.post("/gen", content=b"d")).status_code == 202
    async with serve(app_for(gate), config=config()) as h:
        assert (await h.client.post("/gen", content=b"d")).status_code == 201


async def test_admission_applies_when_the_job_runs_and_cancel_releases_the_lease() -> None:
    gate = Gate()
    leases = Leases()
    async with serve(app_for(gate), host=_host(leases)) as h:
        r = await h.client.post("/gen", content=b"c", headers=ASYNC)
        location = r.headers["location"]
        await gate.started.wait()
        # the submission went past no admission plugin; the replay did
        assert leases.admitted == [True] and leases.held == 1
        d = await h.client.delete(location)
        assert d.status_code == 200 and d.json()["state"] == "cancelled"
        await until(lambda: leases.held == 0)
        assert gate.cancelled == 1
        m = await h.client.get(location)
        assert m.json()["state"] == "cancelled"
        assert (await h.client.delete(location)).status_code == 409  # already cancelled


def _host(*plugins: Any, **jobs: Any) -> Overdrive:
    cfg = config(**jobs)
    cfg["plugins"] = ["jobs", *(p.name for p in plugins)]
    return Overdrive(cfg, plugins=list(plugins))


async def test_cancel_a_queued_job_and_cancel_of_a_finished_one_is_409() -> None:
    gate = Gate()
    async with serve(app_for(gate), config=config(workers=1)) as h:
        first = await h.client.post("/gen", content=b"1", headers=ASYNC)
        await gate.started.wait()
        second = await h.client.post("/gen", content=b"2", headers=ASYNC)
        assert (await h.client.get(second.headers["location"])).json()["position"] == 0
        d = await h.client.delete(second.headers["location"])
        assert d.json()["state"] == "cancelled"
        gate.release.set()
        await until(lambda: gate.runs == 1)
        for _ in range(200):
            r = await h.client.get(first.headers["location"])
            if r.headers["overdrive-job-state"] == "succeeded":
                break
            await asyncio.sleep(0.01)
        assert (await h.client.delete(first.headers["location"])).status_code == 409
        assert gate.runs == 1  # the cancelled queued job never ran


async def test_bad_input_gets_the_right_status() -> None:
    gate = Gate()
    gate.release.set()
    async with serve(app_for(gate), config=config()) as h:
        c = h.client
        assert (await c.get("/_jobs/AAAAAAAAAAAAAAAAAAAAAA")).status_code == 404
        assert (await c.get("/_jobs/nonsense")).status_code == 404
        assert (await c.delete("/_jobs/AAAAAAAAAAAAAAAAAAAAAA")).status_code == 404
        mine = await c.post("/gen", content=b"m", headers={**ASYNC, "authorization": "Bearer a"})
        loc = mine.headers["location"]
        other = await c.get(loc, headers={"authorization": "Bearer b"})
        assert other.status_code == 404 and b"echo" not in other.content
        assert (await c.get(loc)).status_code == 404  # no credentials is another principal too
        assert (await c.delete(loc, headers={"authorization": "Bearer b"})).status_code == 404
        assert (await c.get(loc, headers={"authorization": "Bearer a"})).status_code == 200
        for bad in ("wait=soon", "wait=-1", "wait", "respond-async, wait=nan"):
            r = await c.post("/gen", content=b"m", headers={"prefer": bad})
            assert r.status_code == 400, bad
        # unknown preferences are ignored (RFC 7240): the call runs synchronously
        assert (
            await c.post("/gen", content=b"m", headers={"prefer": "return=minimal"})
        ).status_code == 201
        big = await c.post("/gen", content=b"x" * 1001, headers=ASYNC)
        assert big.status_code == 413
        assert (await c.post("/_jobs/" + "A" * 22)).status_code == 404
        assert gate.runs == 0 or gate.runs == 1  # only the one accepted job and the sync call


async def test_a_result_too_large_fails_clearly_and_a_raising_endpoint_fails() -> None:
    gate = Gate()
    gate.release.set()
    async with serve(app_for(gate), config=config(), raise_app_exceptions=False) as h:
        big = await h.client.post("/gen", content=b"big", headers={"prefer": "wait=30"})
        assert big.status_code == 507
        assert big.json()["state"] == "failed" and big.json()["error"] == "result_too_large"
        boom = await h.client.post("/gen", content=b"boom", headers={"prefer": "wait=30"})
        assert boom.status_code == 500 and boom.headers["overdrive-job-state"] == "failed"
        assert b"secret detail" not in boom.content


async def test_full_queue_is_503_and_a_full_tenant_is_429_with_retry_after() -> None:
    gate = Gate()
    cfg = config(workers=1, max_queue=3, max_queued_per_tenant=2, route={"tenant": "header:x-t"})
    async with serve(app_for(gate), config=cfg) as h:
        await h.client.post("/gen", content=b"0", headers={**ASYNC, "x-t": "a"})
        await gate.started.wait()  # one running, the rest queue
        codes = [
            (await h.client.post("/gen", content=b"q", headers={**ASYNC, "x-t": t})).status_code
            for t in ("a", "a", "a", "b", "c")
        ]
        assert codes == [202, 202, 429, 202, 503]
        r = await h.client.post("/gen", content=b"q", headers={**ASYNC, "x-t": "d"})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        r = await h.client.post("/gen", content=b"q", headers={**ASYNC, "x-t": "a"})
        assert r.status_code in (429, 503) and "retry-after" in r.headers
        gate.release.set()


async def test_progress_is_a_noop_outside_a_job() -> None:
    seen: list[str] = []

    async def plain(request: Request) -> Response:
        request.scope["overdrive.ctx"].progress(0.5, "nobody listens")
        seen.append("ran")
        return Response(b"ok")

    app = Starlette(routes=[Route("/p", plain)])
    async with serve(app, config={"plugins": ["jobs"]}) as h:
        assert (await h.client.get("/p")).content == b"ok"
    assert seen == ["ran"]


def test_settings_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"jobs\.tenant"):
        Overdrive({"plugins": ["jobs"], "jobs": {"tenant": "cookie"}})
    with pytest.raises(ConfigError, match=r"jobs\.workers"):
        Overdrive({"plugins": ["jobs"], "jobs": {"workers": 0}})
    with pytest.raises(ConfigError, match=r"jobs\.weights\.a"):
        Overdrive({"plugins": ["jobs"], "jobs": {"weights": {"a": 0}}})
    with pytest.raises(ConfigError, match=r"jobs\.store"):
        Overdrive({"plugins": ["jobs"], "jobs": {"store": "redis"}})
