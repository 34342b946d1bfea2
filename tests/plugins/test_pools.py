"""ConnectionPoolManager and the `pools` plugin against the real PostgreSQL and Redis,
aiohttp against a local aiohttp test server, SQLite embedded."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import overdrive.plugins.pools as pools_module
from overdrive import ConfigError
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.plugins.pools import ConnectionPoolManager, PoolExhausted, PoolsPlugin, pool_of


def via(url: str, port: int) -> str:
    """`url` with its port replaced (to go through a FaultProxy)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] if ":" in parts.netloc.split("@")[-1] else parts.netloc
    return urlunsplit(parts._replace(netloc=f"{netloc}:{port}"))


def port_of(url: str) -> int:
    return urlsplit(url).port or 5432


@pytest.fixture
async def http_server() -> Any:
    """A local aiohttp server: /items answers JSON, /slow?s=N answers after N seconds."""
    release = asyncio.Event()

    async def items(request: web.Request) -> web.Response:
        return web.json_response({"items": [1, 2, 3]})

    async def held(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"held": True})

    app = web.Application()
    app.router.add_get("/items", items)
    app.router.add_get("/held", held)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    server.release = release  # type: ignore[attr-defined]
    yield server
    release.set()
    await server.close()


def test_public_names_are_pinned() -> None:
    assert pools_module.__all__ == sorted(pools_module.__all__)
    assert pools_module.__all__ == [
        "ConnectionPoolManager",
        "DatabasePoolSettings",
        "HttpPoolSettings",
        "PoolError",
        "PoolExhausted",
        "PoolFigures",
        "PoolsPlugin",
        "PoolsSettings",
        "RedisPoolSettings",
        "is_exhausted",
        "pool_of",
    ]


def test_plugin_keeps_the_hook_contract() -> None:
    check_plugin(PoolsPlugin)


async def test_seed_snippet_creates_three_named_pools(
    postgres_url: str, redis_url: str, http_server: Any
) -> None:
    pool_manager = ConnectionPoolManager()
    db_pool = await pool_manager.create_database_pool(
        "main_db", postgres_url, pool_size=20, max_overflow=30
    )
    redis_pool = await pool_manager.create_redis_pool("cache", redis_url, max_connections=50)
    http_pool = await pool_manager.create_http_pool(
        "api_client", str(http_server.make_url("")), connection_limit=100, limit_per_host=30
    )
    try:
        assert len(pool_manager.pools) == 3
        async with db_pool.connect() as conn:
            assert (await conn.execute(text("SELECT 40 + 2"))).scalar() == 42
        assert await redis_pool.ping() is True
        async with http_pool.get("/items") as response:
            assert await response.json() == {"items": [1, 2, 3]}

        stats = await pool_manager.get_pool_stats("main_db")
        assert stats["size"] == 20 and stats["max_overflow"] == 30
        assert stats["size"] == stats["free_size"]  # the seed's "all connections free"
        assert stats["healthy"] is True and stats["waits"] == 0
        assert (await pool_manager.get_pool_stats("cache"))["size"] == 50
        assert (await pool_manager.get_pool_stats("api_client"))["size"] == 100
        with pytest.raises(KeyError, match="known: api_client, cache, main_db"):
            await pool_manager.get_pool_stats("nope")
        with pytest.raises(ValueError, match="exists already"):
            await pool_manager.create_redis_pool("cache", redis_url)
    finally:
        await pool_manager.close_all()
    assert pool_manager.pools == {}
    assert http_pool.closed


async def test_database_stats_follow_checked_out_connections(postgres_url: str) -> None:
    manager = ConnectionPoolManager()
    engine = await manager.create_database_pool("db", postgres_url, pool_size=2, max_overflow=1)
    try:
        first = await engine.connect()
        second = await engine.connect()
        stats = await manager.get_pool_stats("db")
        assert (stats["checked_out"], stats["free_size"], stats["overflow"]) == (2, 0, 0)
        third = await engine.connect()  # the overflow connection
        stats = await manager.get_pool_stats("db")
        assert (stats["checked_out"], stats["free_size"], stats["overflow"]) == (3, 0, 1)
        for conn in (first, second, third):
            await conn.close()
        stats = await manager.get_pool_stats("db")
        assert (stats["checked_out"], stats["free_size"]) == (0, 2)
    finally:
        await manager.close_all()


async def test_exhausted_database_pool_waits_then_names_itself(postgres_url: str) -> None:
    manager = ConnectionPoolManager()
    engine = await manager.create_database_pool(
        "orders", postgres_url, pool_size=1, max_overflow=0, pool_timeout=0.5
    )
    try:
        held = await engine.connect()
        waiter = asyncio.ensure_future(engine.connect())
        await asyncio.sleep(0.05)
        assert not waiter.done()  # it waits for a connection, it does not fail at once
        with pytest.raises(PoolExhausted, match="pool 'orders' exhausted") as caught:
            await waiter
        assert isinstance(caught.value, sa_exc.TimeoutError)  # code written for SQLAlchemy
        assert pool_of(caught.value) == "orders"
        stats = await manager.get_pool_stats("orders")
        assert stats["waits"] == 1 and stats["timeouts"] == 1
        # A waiter that gets a connection in time does not time out.
        waiter = asyncio.ensure_future(engine.connect())
        await asyncio.sleep(0.05)
        await held.close()
        conn = await waiter
        await conn.close()
        stats = await manager.get_pool_stats("orders")
        assert stats["waits"] == 2 and stats["timeouts"] == 1
    finally:
        await manager.close_all()


async def test_postgres_gone_fails_fast_then_the_pool_recovers(
    postgres_url: str, fault_proxy: Any
) -> None:
    proxy = await fault_proxy("127.0.0.1", port_of(postgres_url))
    manager = ConnectionPoolManager()
    engine = await manager.create_database_pool(
        "main_db", via(postgres_url, proxy.port), pool_size=2, pool_timeout=30
    )
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        proxy.cut()  # PostgreSQL "stopped": connections closed, new ones refused
        for _ in range(2):
            with pytest.raises(Exception) as caught:
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            assert pool_of(caught.value) == "main_db"
            assert not isinstance(caught.value, PoolExhausted)
        stats = await manager.get_pool_stats("main_db")
        assert stats["healthy"] is False and stats["errors"] >= 1
        assert stats["last_error"] and stats["down_since"] is not None
        assert stats["checked_out"] == 0  # failed attempts leave nothing checked out
        assert await manager.ping("main_db") is False

        proxy.restore()  # PostgreSQL is back
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 2"))).scalar() == 2
        stats = await manager.get_pool_stats("main_db")
        assert stats["healthy"] is True and stats["recoveries"] == 1
        assert stats["down_since"] is None
    finally:
        await manager.close_all()


async def test_embedded_sqlite_is_the_default(tmp_path: Any) -> None:
    manager = ConnectionPoolManager()
    memory = await manager.create_database_pool("local")
    filed = await manager.create_database_pool(
        "filed", f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", pool_size=2, max_overflow=0
    )
    try:
        async with memory.begin() as conn:
            await conn.execute(text("CREATE TABLE videos (id TEXT)"))
            await conn.execute(text("INSERT INTO videos VALUES ('123')"))
        async with memory.connect() as conn:  # the same in-memory database
            assert (await conn.execute(text("SELECT id FROM videos"))).scalar() == "123"
        assert (await manager.get_pool_stats("local"))["url"].startswith("sqlite+aiosqlite")
        async with filed.connect() as conn:
            await conn.execute(text("SELECT 1"))
            stats = await manager.get_pool_stats("filed")
            assert (stats["size"], stats["checked_out"], stats["free_size"]) == (2, 1, 1)
    finally:
        await manager.close_all()


async def test_redis_pool_counts_waits_and_times_out_clearly(redis_url: str) -> None:
    import redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    manager = ConnectionPoolManager()
    client = await manager.create_redis_pool("cache", redis_url, max_connections=1, timeout=0.2)
    try:
        assert await client.ping()
        pool = client.connection_pool
        # redis-py before 5.3 needs a command name; from 5.3 on, passing one warns.
        new_api = tuple(int(p) for p in redis.__version__.split(".")[:2]) >= (5, 3)
        held = await (pool.get_connection() if new_api else pool.get_connection("PING"))
        stats = await manager.get_pool_stats("cache")
        assert (stats["checked_out"], stats["free_size"]) == (1, 0)
        with pytest.raises(PoolExhausted, match="pool 'cache' exhausted") as caught:
            await client.ping()
        assert isinstance(caught.value, RedisConnectionError)
        await pool.release(held)
        assert await client.ping()
        stats = await manager.get_pool_stats("cache")
        assert (stats["waits"], stats["timeouts"], stats["checked_out"]) == (1, 1, 0)
    finally:
        await manager.close_all()


async def test_redis_gone_then_back(redis_url: str, fault_proxy: Any) -> None:
    proxy = await fault_proxy("127.0.0.1", urlsplit(redis_url).port or 6379)
    manager = ConnectionPoolManager()
    client = await manager.create_redis_pool("cache", via(redis_url, proxy.port))
    try:
        assert await client.ping()
        proxy.cut()
        with pytest.raises(Exception) as caught:
            await client.ping()
        assert pool_of(caught.value) == "cache"
        assert (await manager.get_pool_stats("cache"))["healthy"] is False
        proxy.restore()
        assert await client.ping()
        stats = await manager.get_pool_stats("cache")
        assert stats["healthy"] is True and stats["recoveries"] == 1
    finally:
        await manager.close_all()


async def test_http_pool_reports_in_use_connections_and_waits(http_server: Any) -> None:
    manager = ConnectionPoolManager()
    session = await manager.create_http_pool(
        "api", str(http_server.make_url("")), connection_limit=1, limit_per_host=1
    )
    try:
        async with session.get("/items") as response:  # relative to base_url
            assert response.status == 200

        async def fetch(path: str) -> Any:
            async with session.get(path) as response:
                return await response.json()

        held = asyncio.ensure_future(fetch("/held"))
        while (await manager.get_pool_stats("api"))["checked_out"] == 0:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(fetch("/items"))
        while (await manager.get_pool_stats("api"))["waits"] == 0:
            await asyncio.sleep(0.01)
        stats = await manager.get_pool_stats("api")
        assert (stats["checked_out"], stats["free_size"]) == (1, 0)
        http_server.release.set()
        assert await held == {"held": True}
        assert await queued == {"items": [1, 2, 3]}
        stats = await manager.get_pool_stats("api")
        assert (stats["checked_out"], stats["timeouts"]) == (0, 0)
    finally:
        await manager.close_all()


async def test_http_pool_exhausted_times_out_and_is_counted(http_server: Any) -> None:
    manager = ConnectionPoolManager()
    session = await manager.create_http_pool(
        "api", str(http_server.make_url("")), connection_limit=1, pool_timeout=0.2
    )
    try:
        held = asyncio.ensure_future(session.get("/held"))
        while (await manager.get_pool_stats("api"))["checked_out"] == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(Exception) as caught:
            await session.get("/items")
        assert pool_of(caught.value) == "api"
        assert pools_module.is_exhausted(caught.value)
        assert (await manager.get_pool_stats("api"))["timeouts"] == 1
        http_server.release.set()
        (await held).release()
    finally:
        await manager.close_all()


async def test_bad_pool_arguments_are_refused() -> None:
    manager = ConnectionPoolManager()
    with pytest.raises(ValueError, match="pool_size: expected an integer >= 1, got 0"):
        await manager.create_database_pool("db", pool_size=0)
    with pytest.raises(ValueError, match="max_connections"):
        await manager.create_redis_pool("r", max_connections=-1)
    with pytest.raises(ValueError, match="pool name"):
        await manager.create_http_pool("", None)
    assert manager.pools == {}


def test_settings_errors_name_the_pool_and_the_key() -> None:
    bad = {"plugins": ["pools"], "pools": {"databases": {"main": {"pool_size": 0}}}}
    with pytest.raises(ConfigError, match=r"pools\.databases\.main\.pool_size: expected >= 1"):
        make_host(config=bad)
    bad = {"plugins": ["pools"], "pools": {"redis": {"cache": {"url": "http://x"}}}}
    with pytest.raises(ConfigError, match=r"pools\.redis\.cache\.url"):
        make_host(config=bad)
    bad = {"plugins": ["pools"], "pools": {"databases": {"a": {}}, "http": {"a": {}}}}
    with pytest.raises(ConfigError, match=r"used by pools\.databases too"):
        make_host(config=bad)
    bad = {"plugins": ["pools"], "pools": {"databases": {"a": {"pool_size": "many"}}}}
    with pytest.raises(ConfigError, match=r"pools\.databases\.a\.pool_size: expected an integer"):
        make_host(config=bad)


async def test_plugin_opens_publishes_answers_503_and_closes(
    postgres_url: str, redis_url: str, fault_proxy: Any
) -> None:
    proxy = await fault_proxy("127.0.0.1", port_of(postgres_url))
    host = make_host(
        config={
            "plugins": ["pools"],
            "pools": {
                "databases": {"main_db": {"url": via(postgres_url, proxy.port), "pool_size": 2}},
                "redis": {"cache": {"url": redis_url, "max_connections": 4}},
                "http": {"api": {"base_url": "http://127.0.0.1:9"}},
            },
        }
    )

    async def query(request: Any) -> JSONResponse:
        engine = host.state["pools"]["main_db"]
        async with engine.connect() as conn:
            value = (await conn.execute(text("SELECT 7"))).scalar()
        return JSONResponse({"value": value})

    app = Starlette(routes=[Route("/query", query)])
    # Starlette re-raises an endpoint's error after its response; the server logs it.
    async with serve(app, host=host, raise_app_exceptions=False) as h:
        manager = h.host.connection_pool_manager
        assert manager is h.host.state["connection_pool_manager"]
        assert sorted(manager.pools) == ["api", "cache", "main_db"]
        assert (await h.client.get("/query")).json() == {"value": 7}

        proxy.cut()
        response = await h.client.get("/query")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"] == "pool 'main_db' unavailable"
        stats = await h.host.get_system_stats()
        assert stats["pools"]["pools"]["main_db"]["healthy"] is False
        assert stats["pools"]["healthy"] is False

        proxy.restore()
        assert (await h.client.get("/query")).json() == {"value": 7}
        stats = await h.host.get_system_stats()
        assert stats["pools"]["pools"]["main_db"]["healthy"] is True
        assert stats["pools"]["count"] == 3
    assert manager.pools == {}  # closed at shutdown


async def test_an_unreachable_pool_does_not_stop_startup(fault_proxy: Any) -> None:
    proxy = await fault_proxy("127.0.0.1", 9)  # nothing listens there: connects are refused
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/test"
    host = make_host(config={"plugins": ["pools"], "pools": {"databases": {"db": {"url": url}}}})
    app = Starlette(routes=[])
    async with serve(app, host=host) as h:
        stats = await h.host.connection_pool_manager.get_pool_stats("db")
        assert stats["healthy"] is False and stats["errors"] >= 1
