"""Fault injection with real processes, across the plugins working together.

Each plugin's own suite tests its faults alone; these attack the whole: a
private redis-server killed and restarted or SIGSTOPped under the cache,
PostgreSQL cut behind a TCP proxy under the pools plugin, and many clients at
once that leave at random points while the app raises, hangs or streams and a
plugin raises at random. Properties:

* no request gets an answer it should not get (a cached body is always the
  one the app produces for that URL; a private answer is never shared);
* nothing leaks: GPU memory reserved, concurrency slots, cache flights,
  profiler in-flight requests and pool connections are all back to zero;
* everything recovers without a restart of the host.

A test whose plugin is not installed is skipped (the plugins arrive on main
one branch at a time).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import overdrive
from overdrive.contrib.testing import make_host
from overdrive.middleware import OverdriveMiddleware
from tests.support.faults import RedisServer

Message = dict[str, Any]


# -- a raw ASGI client: full control over when it leaves -----------------------------------


async def request(
    app: Any,
    path: str,
    *,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    leave_after: int | None = None,
) -> tuple[int | None, dict[bytes, bytes], bytes]:
    """One request; with `leave_after`, the client is gone after that many messages."""
    sent: list[Message] = []
    path_part, _, query = path.partition("?")

    async def receive() -> Message:
        if leave_after is not None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if leave_after is not None and len(sent) >= leave_after:
            raise OSError("client went away")
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path_part,
        "raw_path": path_part.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    try:
        await app(scope, receive, send)
    except OSError:
        if leave_after is None:
            raise
    if not sent:
        return None, {}, b""
    head = dict(sent[0].get("headers") or ())
    return sent[0]["status"], head, b"".join(m.get("body", b"") for m in sent[1:])


async def until(check: Callable[[], Awaitable[bool]], what: str, limit: float = 30.0) -> None:
    """Poll `check` until it holds (recovery); fail naming `what` after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"no recovery: {what} after {limit} s")
        await asyncio.sleep(0.1)


# -- the cache over a Redis that dies ------------------------------------------------------


def item_app() -> Any:
    """/items/N answers b"item-N" (cacheable); /me answers the caller's own token (private)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/me":
            auth = dict(scope["headers"]).get(b"authorization", b"anonymous")
            body, cc = b"user:" + auth, b"private, max-age=60"
        else:
            body, cc = b"item-" + path.rsplit("/", 1)[-1].encode(), b"max-age=60"
        headers = [(b"content-type", b"text/plain"), (b"cache-control", cc)]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def check_answers(app: Any, rounds: int, paths: int) -> list[bytes]:
    """Ask for items and private pages; every answer must be the right one."""
    statuses = []
    for n in range(rounds):
        i = n % paths
        status, head, body = await request(app, f"/items/{i}")
        assert (status, body) == (200, f"item-{i}".encode())
        statuses.append(head.get(b"x-cache", b""))
        token = f"token-{n}".encode()
        status, head, body = await request(app, "/me", headers=[(b"authorization", token)])
        assert (status, body) == (200, b"user:" + token)  # never another user's page
    return statuses


async def redis_keys(url: str, namespace: str) -> int:
    import redis.asyncio as redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return len([k async for k in client.scan_iter(match=f"{namespace}*")])
    finally:
        await client.aclose()


@pytest.fixture
def cache_app(private_redis: RedisServer, namespace: str) -> Any:
    cache_mod = pytest.importorskip("overdrive.plugins.cache")
    plugin = cache_mod.CachePlugin()
    host = make_host(
        plugin, config={"cache": {"redis_url": private_redis.url, "namespace": namespace}}
    )
    return OverdriveMiddleware(item_app(), host=host)


async def test_cache_survives_redis_killed_and_restarted(
    cache_app: Any, private_redis: RedisServer, namespace: str
) -> None:
    host = cache_app.host
    await host.initialize()
    try:
        await check_answers(cache_app, rounds=20, paths=5)
        assert await redis_keys(private_redis.url, namespace) >= 5  # shared through Redis

        private_redis.kill()
        # Redis is gone: answers stay right (memory tier or the app), none is an error.
        await check_answers(cache_app, rounds=20, paths=10)

        private_redis.start()  # same port, empty
        cache = host.cache

        async def redis_back() -> bool:
            # New responses reach Redis again, with no restart of the host.
            await check_answers(cache_app, rounds=2, paths=1)
            status, _, _ = await request(cache_app, f"/items/new-{time.monotonic_ns()}")
            return status == 200 and await redis_keys(private_redis.url, namespace) > 0

        await until(redis_back, "the cache writing to the restarted Redis")
        assert cache.redis.available
        await check_answers(cache_app, rounds=20, paths=10)
    finally:
        await host.cleanup()


async def test_cache_survives_redis_paused_and_resumed(
    cache_app: Any, private_redis: RedisServer, namespace: str
) -> None:
    host = cache_app.host
    await host.initialize()
    try:
        await check_answers(cache_app, rounds=10, paths=5)
        private_redis.stop()  # SIGSTOP: connections open, nothing answers
        try:
            # Each Redis command is bounded (redis_timeout): answers still come, and right.
            await check_answers(cache_app, rounds=10, paths=10)
        finally:
            private_redis.cont()

        async def redis_back() -> bool:
            status, _, _ = await request(cache_app, f"/items/after-{time.monotonic_ns()}")
            return status == 200 and bool(host.cache.redis.available)

        await until(redis_back, "the cache using Redis again after SIGCONT")
        await check_answers(cache_app, rounds=10, paths=10)
        assert await redis_keys(private_redis.url, namespace) >= 5
    finally:
        await host.cleanup()


# -- PostgreSQL cut under the pools plugin ---------------------------------------------------


async def test_pools_postgres_cut_and_restored(postgres_url: str, fault_proxy: Any) -> None:
    pools_mod = pytest.importorskip("overdrive.plugins.pools")
    from sqlalchemy import text

    proxy = await fault_proxy("127.0.0.1", 5432)
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    config = {
        "pools": {
            "ping_on_startup": False,
            "databases": {
                "main_db": {"url": url, "pool_size": 3, "max_overflow": 0, "pool_timeout": 2.0}
            },
        }
    }
    host = make_host(pools_mod.PoolsPlugin(), config=config)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        engine = host.state["pools"]["main_db"]
        async with engine.connect() as conn:
            n = (await conn.execute(text("select 40 + 2"))).scalar_one()
        body = str(n).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    wrapped = OverdriveMiddleware(app, host=host)
    manager = host.connection_pool_manager
    await host.initialize()
    try:
        for _ in range(5):
            assert (await request(wrapped, "/"))[::2] == (200, b"42")
        proxy.cut()
        outcomes = set()
        for _ in range(5):
            try:
                status, _, body = await request(wrapped, "/")
            except Exception as exc:  # the app's own error, if the plugin lets it through
                outcomes.add(type(exc).__name__)
                continue
            assert status != 200 or body == b"42"  # never a wrong answer
            outcomes.add(str(status))
        assert "200" not in outcomes or len(outcomes) > 1  # the cut was noticed
        proxy.restore()

        async def back() -> bool:
            try:
                return (await request(wrapped, "/"))[::2] == (200, b"42")
            except Exception:
                return False

        await until(back, "queries through the pool after PostgreSQL came back")
        stats = await manager.get_pool_stats("main_db")
        assert stats["checked_out"] == 0, stats  # no connection leaked by the outage
    finally:
        await host.cleanup()


# -- every plugin at once, clients leaving, the app misbehaving ----------------------------


class Chaos(overdrive.Plugin):
    """Raises now and then in any request hook (fail-open): the others must not notice."""

    name = "chaos"

    def __init__(self, seed: int, rate: float = 0.05) -> None:
        self.random = random.Random(seed)
        self.rate = rate
        self.raised = 0

    def _maybe(self) -> None:
        if self.random.random() < self.rate:
            self.raised += 1
            raise RuntimeError("chaos")

    @overdrive.hookimpl
    def before_request(self, ctx: Any) -> None:
        self._maybe()

    @overdrive.hookimpl
    def cache_lookup(self, ctx: Any) -> None:
        self._maybe()

    @overdrive.hookimpl
    def on_response_start(self, ctx: Any, status: int, headers: Any) -> None:
        self._maybe()

    @overdrive.hookimpl
    def gpu_release(self, ctx: Any, lease: Any) -> None:
        self._maybe()

    @overdrive.hookimpl
    def after_request(self, ctx: Any) -> None:
        self._maybe()


def misbehaving_app() -> Any:
    """/ok, /boom (raises), /hang (never answers), /stream (forever), /half (dies mid-body)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"].split("/")[1]
        if path == "boom":
            raise RuntimeError("app failed")
        if path == "hang":
            await asyncio.Event().wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if path == "stream":
            while True:
                await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
                await asyncio.sleep(0.001)
        if path == "half":
            await send({"type": "http.response.body", "body": b"par", "more_body": True})
            raise RuntimeError("died mid-body")
        await send({"type": "http.response.body", "body": b"ok:" + path.encode()})

    return app


def every_plugin(seed: int) -> tuple[Any, list[Any]]:
    """The plugins that hold something per request, all on, plus chaos."""
    resilience = pytest.importorskip("overdrive.plugins.resilience")
    gpu = pytest.importorskip("overdrive.plugins.gpu")
    cache = pytest.importorskip("overdrive.plugins.cache")
    plugins: list[Any] = [
        resilience.ConcurrencyPlugin(),
        resilience.TimeoutPlugin(),
        cache.CachePlugin(),
        gpu.GPUPlugin(),
        Chaos(seed),
    ]
    try:
        profiler = pytest.importorskip("overdrive.plugins.profiler")
        plugins.insert(0, profiler.ProfilerPlugin())
    except pytest.skip.Exception:
        pass
    config = {
        "concurrency": {"max_concurrent": 8, "max_queue": 64, "max_wait": 5.0},
        "timeout": {"seconds": 0.2},
        "cache": {"default_ttl": 30},
        "gpu": {"backend": "simulated", "simulated_devices": 1, "memory_mb": 100, "max_wait": 5.0},
        "quarantine_after": 10_000,
    }
    return make_host(*plugins, config=config), plugins


async def leaks(host: Any) -> dict[str, Any]:
    """What is still held once every request has ended (all must be zero)."""
    stats = await host.get_system_stats()
    held: dict[str, Any] = {}
    gpu = stats.get("gpu", {})
    held["gpu_reserved_mb"] = sum(gpu.get("reserved_mb", []) or [0])
    held["gpu_queued"] = gpu.get("queued_now", 0)
    held["gpu_leases_not_released"] = gpu.get("admitted", 0) - gpu.get("releases", 0)
    cache = stats.get("cache", {})
    held["cache_flights"] = cache.get("http", {}).get("in_flight", 0)
    concurrency = stats.get("concurrency", {}).get("global", {})
    for key in ("in_flight", "active", "running", "queued", "waiting"):
        if key in concurrency and isinstance(concurrency[key], int):
            held[f"concurrency_{key}"] = concurrency[key]
    profiler = stats.get("profiler", {})
    if isinstance(profiler.get("in_flight"), int):
        held["profiler_in_flight"] = profiler["in_flight"]
    return held


@pytest.mark.parametrize("seed", [1, 2])
async def test_no_leaks_when_clients_leave_and_the_app_misbehaves(seed: int) -> None:
    host, plugins = every_plugin(seed)
    chaos = plugins[-1]
    app = OverdriveMiddleware(misbehaving_app(), host=host)
    rng = random.Random(seed)
    await host.initialize()
    try:
        answers: list[tuple[str, int | None, bytes]] = []
        tally: Counter[str] = Counter()

        async def one(n: int) -> None:
            path = rng.choice(["/ok/a", "/ok/b", "/boom", "/hang", "/stream", "/half", "/ok/c"])
            leave = rng.choice([None, None, None, 0, 1, 2])
            tally[f"app {path.split('/')[1]}"] += 1
            tally["client left"] += leave is not None
            task = asyncio.ensure_future(request(app, path, leave_after=leave))
            if rng.random() < 0.15:  # the server cancels the request (shutdown, abort)
                await asyncio.sleep(rng.random() * 0.05)
                tally["cancelled by the server"] += task.cancel()
            try:
                status, _, body = await task
            except (asyncio.CancelledError, RuntimeError):
                return  # cancelled, or the app's own error (after its start, for /half)
            except Exception as exc:
                # A cache follower whose leader broke off mid-body: the server aborts it too.
                assert type(exc).__name__ == "FlightAborted", repr(exc)
                tally["follower aborted"] += 1
                return
            answers.append((path, status, body))

        await asyncio.gather(*(one(n) for n in range(120)))
        for path, status, body in answers:
            if status == 200 and path.startswith("/ok/") and body:
                assert body == b"ok:ok", (path, body)  # /ok/x answers b"ok:ok"
            if path in ("/hang", "/stream") and status is not None:
                assert status in (200, 503, 504), (path, status)
        await asyncio.sleep(0)
        held = await leaks(host)
        assert all(v == 0 for v in held.values()), held
        assert chaos.raised > 0  # the chaos plugin did raise, and nobody else noticed
        tally["plugin raised"] = chaos.raised
        print(f"faults injected (seed {seed}): {dict(sorted(tally.items()))}; held: {held}")

        # Recovery: the same host still answers normally.
        chaos.rate = 0.0
        assert (await request(app, "/ok/z"))[::2] == (200, b"ok:ok")
    finally:
        await host.cleanup()


# -- the rate limiter over a Redis that dies -------------------------------------------------


async def test_ratelimit_survives_redis_killed_and_restarted(
    private_redis: RedisServer, namespace: str
) -> None:
    resilience = pytest.importorskip("overdrive.plugins.resilience")
    config = {
        "ratelimit": {
            "limit": "5/minute",
            "storage_url": private_redis.url,
            "key_prefix": namespace,
            "redis_retry_interval": 0.2,
        }
    }
    host = make_host(resilience.RateLimitPlugin(), config=config)
    app = OverdriveMiddleware(item_app(), host=host)
    await host.initialize()
    try:
        statuses = [(await request(app, "/items/1"))[0] for _ in range(7)]
        assert statuses == [200] * 5 + [429] * 2  # counted in Redis
        assert await redis_keys(private_redis.url, namespace) > 0

        private_redis.kill()
        # Redis gone: the limiter counts locally; every answer is a 200 or a 429, never 5xx.
        during = [(await request(app, "/items/1"))[0] for _ in range(10)]
        assert set(during) <= {200, 429} and 429 in during

        private_redis.start()  # empty: the counts in Redis start again

        async def counting_in_redis_again() -> bool:
            status, _, _ = await request(app, "/items/1")
            assert status in (200, 429)
            return await redis_keys(private_redis.url, namespace) > 0

        await until(counting_in_redis_again, "the limiter counting in the restarted Redis")
        later = [(await request(app, "/items/1"))[0] for _ in range(7)]
        assert 429 in later and set(later) <= {200, 429}
    finally:
        await host.cleanup()
