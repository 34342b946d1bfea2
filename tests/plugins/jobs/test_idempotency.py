"""Idempotency-Key: the first request runs, repeats replay it, a changed request is 422."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from overdrive import Overdrive
from overdrive.contrib.testing import serve
from overdrive.middleware import OverdriveMiddleware
from overdrive.plugins.jobs.idempotency import Record


class Counter:
    def __init__(self) -> None:
        self.runs = 0
        self.release = asyncio.Event()
        self.release.set()
        self.status = 201

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        self.runs += 1
        await self.release.wait()
        return JSONResponse({"run": self.runs, "body": body.decode()}, status_code=self.status)


def make(counter: Counter, **route: Any) -> tuple[Starlette, dict[str, Any]]:
    app = Starlette(routes=[Route("/charge", counter.endpoint, methods=["POST", "GET"])])
    cfg = {
        "plugins": ["jobs"],
        "jobs": {"max_body": 1000},
        "routes": [{"path": "/charge", "jobs": {"idempotency": "optional", **route}}],
    }
    return app, cfg


def key(k: str, **more: str) -> dict[str, str]:
    return {"idempotency-key": k, **more}


async def test_repeats_replay_the_first_response_and_run_it_once() -> None:
    c = Counter()
    app, cfg = make(c)
    async with serve(app, config=cfg) as h:
        first = await h.client.post("/charge", content=b"10 EUR", headers=key("k-1"))
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers
        for _ in range(20):
            again = await h.client.post("/charge", content=b"10 EUR", headers=key("k-1"))
            assert again.status_code == 201 and again.content == first.content
            assert again.headers["idempotent-replayed"] == "true"
        assert c.runs == 1
        # another key, or no key, runs again
        await h.client.post("/charge", content=b"10 EUR", headers=key("k-2"))
        await h.client.post("/charge", content=b"10 EUR")
        assert c.runs == 3


async def test_the_same_key_with_another_request_is_422() -> None:
    c = Counter()
    app, cfg = make(c)
    async with serve(app, config=cfg) as h:
        await h.client.post("/charge", content=b"10 EUR", headers=key("k"))
        other = await h.client.post("/charge", content=b"99 EUR", headers=key("k"))
        assert other.status_code == 422
        other = await h.client.post("/charge?x=1", content=b"10 EUR", headers=key("k"))
        assert other.status_code == 422
        assert c.runs == 1


async def test_concurrent_repeats_join_the_running_one_or_get_409() -> None:
    c = Counter()
    c.release.clear()
    app, cfg = make(c)
    async with serve(app, config=cfg) as h:
        calls = [
            asyncio.ensure_future(h.client.post("/charge", content=b"x", headers=key("j")))
            for _ in range(10)
        ]
        while c.runs == 0:
            await asyncio.sleep(0.005)
        c.release.set()
        answers = await asyncio.gather(*calls)
        assert {r.status_code for r in answers} == {201}
        assert len({r.content for r in answers}) == 1 and c.runs == 1
    c = Counter()
    c.release.clear()
    app, cfg = make(c, idempotency_conflict="409")
    cfg["jobs"]["idempotency_conflict"] = "409"
    async with serve(app, config=cfg) as h:
        first = asyncio.ensure_future(h.client.post("/charge", content=b"x", headers=key("j")))
        while c.runs == 0:
            await asyncio.sleep(0.005)
        second = await h.client.post("/charge", content=b"x", headers=key("j"))
        assert second.status_code == 409 and "retry-after" in second.headers
        c.release.set()
        assert (await first).status_code == 201


async def test_keys_are_scoped_per_principal() -> None:
    c = Counter()
    app, cfg = make(c)
    async with serve(app, config=cfg) as h:
        a = await h.client.post("/charge", content=b"x", headers=key("same", authorization="A"))
        b = await h.client.post("/charge", content=b"x", headers=key("same", authorization="B"))
        assert a.json()["run"] == 1 and b.json()["run"] == 2  # B never sees A's response


async def test_failures_are_not_kept_so_a_retry_runs_again() -> None:
    c = Counter()
    c.status = 503
    app, cfg = make(c)
    async with serve(app, config=cfg) as h:
        assert (await h.client.post("/charge", content=b"x", headers=key("f"))).status_code == 503
        c.status = 200
        r = await h.client.post("/charge", content=b"x", headers=key("f"))
        assert r.status_code == 200 and "idempotent-replayed" not in r.headers
        assert c.runs == 2


async def test_bad_keys_safe_methods_and_required_keys() -> None:
    c = Counter()
    app, cfg = make(c, idempotency="required")
    async with serve(app, config=cfg) as h:
        assert (await h.client.post("/charge", content=b"x")).status_code == 400
        assert (await h.client.post("/charge", headers=key("x" * 256))).status_code == 400
        assert (await h.client.post("/charge", headers=key(""))).status_code == 400
        quoted = await h.client.post("/charge", content=b"q", headers=key('"abc"'))
        assert quoted.status_code == 201
        bare = await h.client.post("/charge", content=b"q", headers=key("abc"))
        assert bare.headers["idempotent-replayed"] == "true"  # "abc" and abc are one key
        big = await h.client.post("/charge", content=b"x" * 1001, headers=key("big"))
        assert big.status_code == 413
        await h.client.get("/charge", headers=key("g"))  # GET is safe: not keyed
        await h.client.get("/charge", headers=key("g"))
        assert c.runs == 3


async def test_a_job_submission_with_a_key_is_one_job() -> None:
    c = Counter()
    app, cfg = make(c, job=True)
    async with serve(app, config=cfg) as h:
        hdrs = key("job-1", prefer="respond-async")
        first = await h.client.post("/charge", content=b"v", headers=hdrs)
        assert first.status_code == 202
        for _ in range(10):
            again = await h.client.post("/charge", content=b"v", headers=hdrs)
            assert again.headers["location"] == first.headers["location"]
            assert again.headers["idempotent-replayed"] == "true"
        for _ in range(200):
            if (await h.client.get(first.headers["location"])).status_code == 201:
                break
            await asyncio.sleep(0.01)
        assert c.runs == 1


def test_a_poisoned_record_is_never_a_response() -> None:
    assert Record.loads(b"not json") is None
    assert Record.loads(b'{"fp": "a", "owner": "b", "status": 200, "headers": 5}') is None


@pytest.mark.parametrize("kind", ["plain", "cluster", "sentinel"])
async def test_keys_are_shared_across_workers_through_redis(
    kind: str, request: pytest.FixtureRequest, namespace: str
) -> None:
    if kind == "plain":
        url = request.getfixturevalue("redis_url")
    elif kind == "cluster":
        url = request.getfixturevalue("redis_cluster")
    else:
        url = request.getfixturevalue("redis_sentinel").url
    c = Counter()
    app, cfg = make(c)
    cfg["jobs"].update(store="redis", redis_url=url, key_prefix=f"{namespace}:idem:")
    one = OverdriveMiddleware(app, host=Overdrive(cfg))
    two = OverdriveMiddleware(app, host=Overdrive(cfg))
    async with serve(one) as h1, serve(two) as h2:
        c.release.clear()
        first = asyncio.ensure_future(h1.client.post("/charge", content=b"r", headers=key("R")))
        while c.runs == 0:
            await asyncio.sleep(0.005)
        joined = asyncio.ensure_future(h2.client.post("/charge", content=b"r", headers=key("R")))
        await asyncio.sleep(0.1)
        c.release.set()
        a, b = await first, await joined
        assert a.content == b.content and b.headers["idempotent-replayed"] == "true"
        again = await h2.client.post("/charge", content=b"r", headers=key("R"))
        assert again.headers["idempotent-replayed"] == "true"
        assert (await h2.client.post("/charge", content=b"s", headers=key("R"))).status_code == 422
        assert c.runs == 1


async def test_a_dead_redis_degrades_to_no_keys(private_redis: Any) -> None:
    c = Counter()
    app, cfg = make(c)
    cfg["jobs"].update(store="redis", redis_url=private_redis.url)
    private_redis.kill()
    async with serve(app, config=cfg) as h:
        r = await h.client.post("/charge", content=b"x", headers=key("d"))
        assert r.status_code == 201  # served, without the key's protection
        stats = await h.host.get_system_stats()
        assert stats["jobs"]["key_store_errors"] >= 1
