"""QueryOptimizer on real databases: SQLite (aiosqlite) and PostgreSQL (asyncpg).

Statements are counted with SQLAlchemy's `before_cursor_execute` event, so "N
concurrent loads become one query" is what the database saw, not what we think.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import overdrive.plugins.query as query_mod
from overdrive import ConfigError
from overdrive.contrib.testing import check_plugin, make_host
from overdrive.plugins.cache import AsyncCache, CacheConfig, CachePlugin
from overdrive.plugins.query import DataLoader, QueryOptimizer, QueryPlugin, QueryUnavailable


async def drop_table(engine: AsyncEngine, name: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {name}"))


class Counted:
    """An engine with a statement counter and a table of its own (`name`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.statements: list[str] = []
        self.name = f"odq_{uuid.uuid4().hex[:10]}"

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if self.name in statement and statement.lstrip().upper().startswith("SELECT"):
                self.statements.append(statement)

    async def setup(self, rows: int = 100) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                text(f"CREATE TABLE {self.name} (id INTEGER PRIMARY KEY, owner TEXT, title TEXT)")
            )
            await conn.execute(
                text(f"INSERT INTO {self.name} (id, owner, title) VALUES (:id, :owner, :title)"),
                [{"id": i, "owner": f"user{i % 10}", "title": f"video {i}"} for i in range(rows)],
            )

    async def drop(self) -> None:
        await drop_table(self.engine, self.name)

    async def titles(self, ids: list[int]) -> dict[int, str]:
        """One round trip for many ids (portable: an expanding IN list)."""
        from sqlalchemy import bindparam

        stmt = text(f"SELECT id, title FROM {self.name} WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt, {"ids": ids})).all()
        return {row.id: row.title for row in rows}

    async def videos_of(self, owners: list[str]) -> dict[str, list[int]]:
        from sqlalchemy import bindparam

        stmt = text(f"SELECT id, owner FROM {self.name} WHERE owner IN :o ORDER BY id").bindparams(
            bindparam("o", expanding=True)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt, {"o": owners})).all()
        out: dict[str, list[int]] = {o: [] for o in owners}
        for row in rows:
            out[row.owner].append(row.id)
        return out

    async def title(self, video_id: int) -> str | None:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(
                    text(f"SELECT title FROM {self.name} WHERE id = :id"), {"id": video_id}
                )
            ).scalar()


@pytest.fixture
async def pg_db(postgres_url: str) -> AsyncIterator[Counted]:
    engine = create_async_engine(postgres_url, pool_pre_ping=True)
    db = Counted(engine)
    await db.setup()
    try:
        yield db
    finally:
        await db.drop()
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
async def any_db(request: Any, tmp_path: Path) -> AsyncIterator[Counted]:
    if request.param == "sqlite":
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}")
    else:
        engine = create_async_engine(request.getfixturevalue("postgres_url"), pool_pre_ping=True)
    db = Counted(engine)
    await db.setup()
    try:
        yield db
    finally:
        await db.drop()
        await engine.dispose()


def test_public_names_are_pinned() -> None:
    assert query_mod.__all__ == sorted(query_mod.__all__)
    assert query_mod.__all__ == [
        "DataLoader",
        "QueryOptimizer",
        "QueryPlugin",
        "QueryUnavailable",
        "is_connection_error",
    ]


async def test_concurrent_loads_become_one_query(any_db: Counted) -> None:
    db = any_db
    qo = QueryOptimizer()
    titles = qo.loader(db.titles)
    keys = [i % 25 for i in range(200)] + [999]  # 200 loads of 25 ids, and one missing id
    results = await asyncio.gather(*(titles.load(k) for k in keys))
    assert len(db.statements) == 1
    assert results[:25] == [f"video {i}" for i in range(25)]
    assert results[-1] is None  # a mapping result: a missing key is None
    assert titles.stats() == {"loads": 201, "batches": 1, "keys_sent": 26}


async def test_cached_query_is_single_flight_then_served_from_cache(any_db: Counted) -> None:
    db = any_db
    query_optimizer = QueryOptimizer()
    results = await asyncio.gather(
        *(query_optimizer.cached_query("video_7", lambda: db.title(7), ttl=300) for _ in range(30))
    )
    assert results == ["video 7"] * 30
    assert len(db.statements) == 1
    assert await query_optimizer.cached_query("video_7", lambda: db.title(7)) == "video 7"
    assert len(db.statements) == 1
    stats = query_optimizer.stats()
    assert stats["misses"] == 1 and stats["shared"] == 29 and stats["hits"] == 1
    # "No such row" is an answer too: cached, not asked again.
    assert await query_optimizer.cached_query("video_x", lambda: db.title(12345)) is None
    assert await query_optimizer.cached_query("video_x", lambda: db.title(12345)) is None
    assert len(db.statements) == 2


async def test_batch_query_seed_shape(pg_db: Counted) -> None:
    query_optimizer = QueryOptimizer()
    query_optimizer.register_batch("user_videos", pg_db.videos_of, key="user_id")
    query_optimizer.register_batch("video_metadata", pg_db.titles, key="video_id")
    queries = [
        {"type": "user_videos", "user_id": "user3"},
        {"type": "user_videos", "user_id": "user5"},
        {"type": "video_metadata", "video_id": 78},
        {"type": "user_videos", "user_id": "user3"},
    ]
    results = await query_optimizer.batch_query(queries)
    assert results[0] == list(range(3, 100, 10))
    assert results[1] == list(range(5, 100, 10))
    assert results[2] == "video 78"
    assert results[3] == results[0]
    assert len(pg_db.statements) == 2  # one per type, duplicates sent once
    with pytest.raises(ValueError, match="unknown query type 'nope'"):
        await query_optimizer.batch_query([{"type": "nope"}])
    with pytest.raises(ValueError, match="lacks 'user_id'"):
        await query_optimizer.batch_query([{"type": "user_videos"}])
    with pytest.raises(ValueError, match="has no 'type'"):
        await query_optimizer.batch_query([{"user_id": "x"}])


async def test_batch_function_errors_reach_every_waiter() -> None:
    async def broken(keys: list[int]) -> list[int]:
        raise RuntimeError("syntax error at or near SELEC")

    async def short(keys: list[int]) -> list[int]:
        return keys[:-1]

    async def partial(keys: list[int]) -> list[Any]:
        return [KeyError(k) if k == 2 else k * 10 for k in keys]

    results = await asyncio.gather(
        *(DataLoader(broken).load(k) for k in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)
    dl = DataLoader(short)
    results = await asyncio.gather(*(dl.load(k) for k in range(3)), return_exceptions=True)
    assert all(isinstance(r, ValueError) and "2 results for 3 keys" in str(r) for r in results)
    dl = DataLoader(partial, max_batch_size=2)
    results = await asyncio.gather(*(dl.load(k) for k in range(4)), return_exceptions=True)
    assert results[0] == 0 and results[1] == 10 and results[3] == 30
    assert isinstance(results[2], KeyError)
    assert dl.batches == 2
    with pytest.raises(ValueError, match="max_batch_size"):
        DataLoader(short, max_batch_size=0)


async def test_postgres_going_away_serves_cached_and_fails_misses_fast(
    postgres_url: str, fault_proxy: Any
) -> None:
    proxy = await fault_proxy("127.0.0.1", 5432)
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    engine = create_async_engine(url, pool_pre_ping=True)
    db = Counted(engine)
    await db.setup()
    try:
        qo = QueryOptimizer(retry_after=60)
        assert await qo.cached_query("v1", lambda: db.title(1)) == "video 1"
        proxy.cut()
        assert await qo.cached_query("v1", lambda: db.title(1)) == "video 1"  # cached
        with pytest.raises(QueryUnavailable, match="'v2' failed: the database is unreachable"):
            await qo.cached_query("v2", lambda: db.title(2))
        tried = qo.queries
        with pytest.raises(QueryUnavailable, match="not run: the database is unreachable"):
            await qo.cached_query("v3", lambda: db.title(3))
        assert qo.queries == tried  # failed fast: no connection attempt
        assert qo.stats()["fast_failures"] == 1 and qo.stats()["database_down"]
        assert await qo.cached_query("v1", lambda: db.title(1)) == "video 1"

        proxy.restore()
        qo._down_until = 0.0  # as if retry_after had passed
        assert await qo.cached_query("v3", lambda: db.title(3)) == "video 3"

        proxy.pause()  # the server hangs instead of refusing
        qo.query_timeout = 0.3
        with pytest.raises(QueryUnavailable, match=r"no answer within 0\.3 s"):
            await qo.cached_query("v4", lambda: db.title(4))
        proxy.restore()
    finally:
        proxy.restore()
        await engine.dispose()
        cleanup = create_async_engine(postgres_url)
        await drop_table(cleanup, db.name)
        await cleanup.dispose()


async def test_cached_query_on_async_cache_is_shared_between_workers(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    db = Counted(engine)
    await db.setup()
    caches = [AsyncCache(CacheConfig(namespace=namespace), redis_url=redis_url) for _ in range(2)]
    try:
        worker_1, worker_2 = (QueryOptimizer(c) for c in caches)
        results = await asyncio.gather(
            *(worker_1.cached_query("video_3", lambda: db.title(3), ttl=60) for _ in range(20))
        )
        assert results == ["video 3"] * 20
        assert len(db.statements) == 1
        # Another worker (its own memory tier) finds it in Redis: no query.
        assert await worker_2.cached_query("video_3", lambda: db.title(3)) == "video 3"
        assert len(db.statements) == 1
        assert worker_2.stats()["hits"] == 1
    finally:
        for c in caches:
            await c.clear()
            await c.close()
        await engine.dispose()


async def test_plugin_uses_an_async_cache_of_its_own() -> None:
    host = make_host(QueryPlugin, CachePlugin)
    optimizer = host.query_optimizer
    assert isinstance(optimizer.cache, AsyncCache)
    assert optimizer.cache is not host.cache  # not the HTTP cache's (response encoding)
    assert await optimizer.cached_query("rows", lambda: [{"id": 1}]) == [{"id": 1}]
    assert await optimizer.cached_query("rows", lambda: []) == [{"id": 1}]
    await host.initialize()
    await host.cleanup()


async def test_the_seed_systems_redis_client_is_used(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from overdrive import AdvancedPerformanceSystem

    client = aioredis.Redis.from_url(redis_url)
    try:
        system = AdvancedPerformanceSystem({"plugins": ["query"]}, redis_client=client)
        assert system.query_optimizer.cache.redis is not None
    finally:
        await client.aclose()


async def test_cache_failures_are_misses_not_outages() -> None:
    class BrokenCache:
        async def get(self, key: str, default: Any = None) -> Any:
            raise ConnectionError("redis down")

        async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
            raise ConnectionError("redis down")

    qo = QueryOptimizer(BrokenCache())
    assert await qo.cached_query("k", lambda: 5) == 5
    assert qo.stats()["cache_errors"] == 2


async def test_plugin_contract_and_settings() -> None:
    check_plugin(QueryPlugin)
    host = make_host(QueryPlugin, config={"query": {"default_ttl": 60}})
    assert isinstance(host.query_optimizer, QueryOptimizer)
    assert host.query_optimizer.default_ttl == 60
    assert await host.query_optimizer.cached_query("a", lambda: 1) == 1
    stats = await host.get_system_stats()
    assert stats["query"]["misses"] == 1
    with pytest.raises(ConfigError, match=r"query.query_timeout: expected > 0"):
        make_host(QueryPlugin, config={"query": {"query_timeout": 0}})
