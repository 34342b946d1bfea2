"""The `cache` plugin shared: single-flight with streaming, several workers on Redis, faults."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from overdrive.contrib.testing import make_host, serve
from overdrive.middleware import OverdriveMiddleware
from tests.plugins.test_cache_async import until
from tests.support.faults import RedisServer


class App:
    """A Starlette app that counts its calls; `gate` holds the stream after its first chunk."""

    def __init__(self, headers: dict[str, str] | None = None, delay: float = 0.05) -> None:
        self.calls = 0
        self.headers = headers if headers is not None else {"cache-control": "max-age=60"}
        self.delay = delay
        self.gate: asyncio.Event | None = None
        self.fail_first = False

    def starlette(self) -> Starlette:
        async def render(request: Request) -> Response:
            self.calls += 1
            if self.fail_first and self.calls == 1:
                await asyncio.sleep(self.delay)
                raise RuntimeError("the first render crashed")
            call = self.calls

            async def body() -> Any:
                yield b"first chunk;"
                if self.gate is not None:
                    await self.gate.wait()
                await asyncio.sleep(self.delay)
                yield f"render {call}".encode()

            return StreamingResponse(body(), headers=self.headers)

        return Starlette(routes=[Route("/render", render)])


def settings(**extra: Any) -> dict[str, Any]:
    return {"plugins": ["cache"], "cache": extra}


async def test_1000_concurrent_misses_make_one_app_call() -> None:
    app = App()
    async with serve(app.starlette(), config=settings()) as h:
        responses = await asyncio.gather(*(h.client.get("/render") for _ in range(1000)))
    assert app.calls == 1
    assert {r.status_code for r in responses} == {200}
    assert {r.text for r in responses} == {"first chunk;render 1"}
    assert sorted(r.headers["x-cache"] for r in responses).count("MISS") == 1


async def test_1000_concurrent_misses_with_redis_make_one_app_call(
    redis_url: str, namespace: str
) -> None:
    app = App()
    async with serve(
        app.starlette(), config=settings(redis_url=redis_url, namespace=namespace)
    ) as h:
        responses = await asyncio.gather(*(h.client.get("/render") for _ in range(1000)))
        await h.host.cache.clear()
    assert app.calls == 1
    assert {r.text for r in responses} == {"first chunk;render 1"}


async def asgi_stream(app: Any, received: list[bytes], done: asyncio.Event) -> dict[str, Any]:
    """A GET through ASGI that records each body chunk as it arrives."""
    out: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = dict(message["headers"])
        elif message.get("body"):
            received.append(message["body"])

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/render",
        "raw_path": b"/render",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return out


async def test_waiters_get_the_body_as_the_first_request_produces_it() -> None:
    app = App()
    app.gate = asyncio.Event()
    wrapped = OverdriveMiddleware(app.starlette(), host=make_host(config=settings()))
    done = asyncio.Event()
    leader_chunks: list[bytes] = []
    follower_chunks: list[bytes] = []
    leader = asyncio.create_task(asgi_stream(wrapped, leader_chunks, done))
    assert await until(lambda: leader_chunks == [b"first chunk;"])
    follower = asyncio.create_task(asgi_stream(wrapped, follower_chunks, done))
    # The follower has its first byte while the leader's app is still rendering.
    assert await until(lambda: follower_chunks == [b"first chunk;"])
    assert not leader.done()
    app.gate.set()
    first, second = await asyncio.gather(leader, follower)
    done.set()
    assert b"".join(follower_chunks) == b"".join(leader_chunks) == b"first chunk;render 1"
    assert first["headers"][b"x-cache"] == b"MISS"
    assert second["headers"][b"x-cache"] == b"HIT"
    assert app.calls == 1


async def test_waiters_call_the_app_themselves_when_the_response_is_not_shareable() -> None:
    app = App(headers={"cache-control": "private, max-age=60"})
    async with serve(app.starlette(), config=settings()) as h:
        responses = await asyncio.gather(*(h.client.get("/render") for _ in range(5)))
    assert app.calls == 5
    assert len({r.text for r in responses}) == 5


async def test_waiters_go_on_when_the_first_request_fails() -> None:
    app = App()
    app.fail_first = True
    async with serve(app.starlette(), config=settings(), raise_app_exceptions=False) as h:
        responses = await asyncio.gather(*(h.client.get("/render") for _ in range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and statuses[-1] == 500 and statuses.count(500) == 1
    assert 2 <= app.calls <= 5


# -- several workers sharing Redis ----------------------------------------------------------------


async def test_workers_share_responses_and_invalidations_through_redis(
    redis_url: str, namespace: str
) -> None:
    app = App(headers={"cache-control": "max-age=60", "x-cache-tags": "video:1"})
    cfg = settings(redis_url=redis_url, namespace=namespace)
    async with serve(app.starlette(), config=cfg) as a, serve(app.starlette(), config=cfg) as b:
        first = await a.client.get("/render")
        from_redis = await b.client.get("/render")
        assert first.headers["x-cache"] == "MISS"
        assert from_redis.headers["x-cache"] == "HIT" and from_redis.text == first.text
        assert "x-cache-tags" not in from_redis.headers
        assert b.host.cache.get_stats()["redis"]["hits"] == 1
        assert (await b.client.get("/render")).headers["x-cache"] == "HIT"  # now memory
        await a.host.cache.invalidate_tags(["video:1"])
        assert await until(lambda: len(b.host.cache.memory) == 0)
        again = await b.client.get("/render")
        assert again.headers["x-cache"] == "MISS" and again.text == "first chunk;render 2"
        await a.host.cache.clear()


async def test_concurrent_misses_on_two_workers_make_one_app_call(
    redis_url: str, namespace: str
) -> None:
    app = App(delay=0.2)
    cfg = settings(redis_url=redis_url, namespace=namespace)
    async with serve(app.starlette(), config=cfg) as a, serve(app.starlette(), config=cfg) as b:
        responses = await asyncio.gather(
            *(a.client.get("/render") for _ in range(20)),
            *(b.client.get("/render") for _ in range(20)),
        )
        raw = aioredis.from_url(redis_url)
        locks = [k async for k in raw.scan_iter(match=f"{namespace}:v:lock:*")]
        await raw.aclose()
        assert locks == []  # the leader released its lock
        await a.host.cache.clear()
    assert app.calls == 1
    assert {r.text for r in responses} == {"first chunk;render 1"}


async def test_a_leader_slower_than_the_lock_lease_renews_it(
    redis_url: str, namespace: str
) -> None:
    """The cross-worker lock is a short lease its holder renews (issue 16, item 6): a
    render three times longer than the lease still makes one app call."""
    app = App(delay=3.0)
    cfg = settings(redis_url=redis_url, namespace=namespace, lock_lease=1.0)
    async with serve(app.starlette(), config=cfg) as a, serve(app.starlette(), config=cfg) as b:
        first = asyncio.ensure_future(a.client.get("/render"))
        await until(lambda: app.calls == 1)
        second = await b.client.get("/render")
        assert (await first).text == second.text == "first chunk;render 1"
        await a.host.cache.clear()
    assert app.calls == 1


async def test_corrupt_entry_in_redis_is_a_miss(redis_url: str, namespace: str) -> None:
    app = App()
    raw = aioredis.from_url(redis_url)
    cfg = settings(redis_url=redis_url, namespace=namespace)
    try:
        async with serve(app.starlette(), config=cfg) as h:
            await h.client.get("/render")
            keys = [k async for k in raw.scan_iter(match=f"{namespace}:v:*")]
            assert keys
            for key in keys:
                await raw.set(key, b"\x80\x04garbage that is not ours")
            h.host.cache.memory.clear()
            r = await h.client.get("/render")
            assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
            assert h.host.cache.get_stats()["redis"]["corrupt"] >= 1
            await h.host.cache.clear()
    finally:
        await raw.aclose()


async def test_redis_killed_mid_run_no_request_fails(private_redis: RedisServer) -> None:
    app = App(delay=0)
    cfg = settings(redis_url=private_redis.url, redis_timeout=0.2)
    async with serve(app.starlette(), config=cfg) as h:
        h.host.cache.config.redis_retry_after = 0.05
        assert (await h.client.get("/render")).headers["x-cache"] == "MISS"
        private_redis.kill()
        for _ in range(5):
            r = await h.client.get("/render")
            assert (r.status_code, r.headers["x-cache"]) == (200, "HIT")  # from memory
        r = await h.client.get("/render?new=1")
        assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
        assert h.host.cache.get_stats()["errors"] >= 1
        private_redis.start()
        raw = aioredis.from_url(private_redis.url)
        try:
            n = 0

            async def stored_again() -> bool:
                nonlocal n
                n += 1
                await h.client.get(f"/render?after={n}")
                return bool([k async for k in raw.scan_iter(match="overdrive:http:v:*")])

            assert await until(stored_again)
        finally:
            await raw.aclose()


async def test_redis_paused_mid_run_no_request_fails(private_redis: RedisServer) -> None:
    app = App(delay=0)
    cfg = settings(redis_url=private_redis.url, redis_timeout=0.1)
    async with serve(app.starlette(), config=cfg) as h:
        await h.client.get("/render")
        private_redis.stop()
        try:
            async with asyncio.timeout(10):  # a generous bound, not a timing assertion
                for i in range(3):
                    assert (await h.client.get("/render")).headers["x-cache"] == "HIT"
                    r = await h.client.get(f"/render?paused={i}")
                    assert r.status_code == 200
        finally:
            private_redis.cont()


# -- invalidations across a reconnect (issue 16, item 8) -------------------------------------


async def _two_workers_holding_render_1(a: Any, b: Any) -> None:
    assert (await a.client.get("/render")).text == "first chunk;render 1"
    assert (await b.client.get("/render")).headers["x-cache"] == "HIT"  # from Redis
    b_memory = b.host.cache.memory_hits
    assert (await b.client.get("/render")).headers["x-cache"] == "HIT"
    assert b.host.cache.memory_hits == b_memory + 1  # B holds render 1 in memory


async def _redis_answers(cache: Any) -> bool:
    return await cache.redis.call(cache.redis.client.ping) is True


async def test_an_invalidation_right_after_a_redis_restart_reaches_every_worker(
    private_redis: RedisServer,
) -> None:
    """Reads and writes came back before the listener's back-off ended: an invalidation
    made then was lost, and the other worker served the old copy for as long as it lived."""
    app = App(delay=0, headers={"cache-control": "max-age=600", "x-cache-tags": "video:1"})
    cfg = settings(redis_url=private_redis.url)
    async with serve(app.starlette(), config=cfg) as a, serve(app.starlette(), config=cfg) as b:
        await _two_workers_holding_render_1(a, b)
        private_redis.kill()
        private_redis.start()  # same port, empty
        assert await until(lambda: _redis_answers(a.host.cache))
        await asyncio.sleep(0.1)  # B's listener reads the end of its connection
        await a.host.cache.invalidate_tags(["video:1"])  # published while B is not listening
        answers = [(await b.client.get("/render")).text for _ in range(5)]
        assert "first chunk;render 1" not in answers
        # B subscribes again at once (its Redis reads wake it) and trusts memory again.
        assert await until(lambda: b.host.cache.get_stats()["invalidation_listener"]["listening"])
        assert b.host.cache.resyncs == 1
        await b.client.get("/render")
        hits = b.host.cache.memory_hits
        assert (await b.client.get("/render")).headers["x-cache"] == "HIT"
        assert b.host.cache.memory_hits == hits + 1


async def test_a_worker_whose_subscription_dropped_drops_what_it_may_have_missed(
    private_redis: RedisServer,
) -> None:
    """Redis stays up; only B's pub/sub connection is cut (a proxy, a CLIENT KILL)."""
    app = App(delay=0, headers={"cache-control": "max-age=600", "x-cache-tags": "video:1"})
    cfg = settings(redis_url=private_redis.url)
    async with serve(app.starlette(), config=cfg) as a, serve(app.starlette(), config=cfg) as b:
        await _two_workers_holding_render_1(a, b)
        raw = aioredis.from_url(private_redis.url)
        try:
            assert await raw.client_kill_filter(_type="pubsub") == 2  # A's and B's listeners
        finally:
            await raw.aclose()
        await asyncio.sleep(0.1)  # the listeners read the end of their connections
        await a.host.cache.invalidate_tags(["video:1"])
        answers = [(await b.client.get("/render")).text for _ in range(5)]
        assert "first chunk;render 1" not in answers
        assert set(answers) == {"first chunk;render 2"}
