"""Pooled connections vs a connection per request, and what our counting costs.

    ./run bench pools [--queries 2000] [--concurrency 20]

Against the local PostgreSQL (127.0.0.1:5432, database `test`) and Redis, in one run:

- PostgreSQL: `asyncpg.connect()` per query (what "no pool" means), plain
  SQLAlchemy `create_async_engine` (the library a user would pick) without and
  with `pool_pre_ping`, and our `create_database_pool` (the same engine plus
  counting and health; pre-ping on by default, and off);
- Redis: a new client per command, plain `redis.asyncio` on a
  `BlockingConnectionPool`, and our `create_redis_pool`.

Prints queries per second and the ratio to the plain library pool.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from overdrive.plugins.pools import ConnectionPoolManager

PG = os.environ.get(
    "OVERDRIVE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS = os.environ.get("OVERDRIVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def measure(op: Callable[[], Awaitable[Any]], n: int, concurrency: int) -> float:
    """Operations per second for `n` calls of `op`, `concurrency` at a time."""
    per = n // concurrency

    async def worker() -> None:
        for _ in range(per):
            await op()

    await op()  # warm up
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return per * concurrency / (time.perf_counter() - t0)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    import asyncpg
    from redis.asyncio import BlockingConnectionPool, Redis
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    n, c = args.queries, args.concurrency
    dsn = PG.replace("postgresql+asyncpg", "postgresql")
    select = text("SELECT 1")
    rows: list[tuple[str, str, float]] = []

    async def per_request() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    plain = create_async_engine(PG, pool_size=c, max_overflow=0)

    async def plain_query() -> None:
        async with plain.connect() as conn:
            await conn.execute(select)

    pinged = create_async_engine(PG, pool_size=c, max_overflow=0, pool_pre_ping=True)

    async def pinged_query() -> None:
        async with pinged.connect() as conn:
            await conn.execute(select)

    manager = ConnectionPoolManager()
    ours = await manager.create_database_pool("db", PG, pool_size=c, max_overflow=0)
    unpinged = await manager.create_database_pool(
        "db_no_ping", PG, pool_size=c, max_overflow=0, pool_pre_ping=False
    )

    async def unpinged_query() -> None:
        async with unpinged.connect() as conn:
            await conn.execute(select)

    async def our_query() -> None:
        async with ours.connect() as conn:
            await conn.execute(select)

    rows.append(("postgres", "asyncpg.connect() per query", await measure(per_request, n // 4, c)))
    rows.append(("postgres", "SQLAlchemy engine (plain)", await measure(plain_query, n, c)))
    rows.append(("postgres", "SQLAlchemy + pool_pre_ping", await measure(pinged_query, n, c)))
    rows.append(("postgres", "create_database_pool (ours)", await measure(our_query, n, c)))
    rows.append(("postgres", "ours, pool_pre_ping=False", await measure(unpinged_query, n, c)))
    await plain.dispose()
    await pinged.dispose()

    async def redis_per_request() -> None:
        client = Redis.from_url(REDIS)
        try:
            await client.ping()
        finally:
            await client.aclose()

    plain_redis = Redis.from_pool(BlockingConnectionPool.from_url(REDIS, max_connections=c))
    our_redis = await manager.create_redis_pool("cache", REDIS, max_connections=c)
    rows.append(("redis", "new client per command", await measure(redis_per_request, n, c)))
    rows.append(("redis", "BlockingConnectionPool (plain)", await measure(plain_redis.ping, n, c)))
    rows.append(("redis", "create_redis_pool (ours)", await measure(our_redis.ping, n, c)))
    await plain_redis.aclose()
    stats = await manager.get_pool_stats("db")
    await manager.close_all()

    print(f"{n} operations, {c} at a time (connection-per-query rows: {n // 4})\n")
    head = f"{'service':<9} {'how':<32} {'ops/s':>9} {'x plain pool':>13}"
    print(head)
    print("-" * len(head))
    plain_of = {svc: ops for svc, how, ops in rows if how.endswith("(plain)")}
    for svc, how, ops in rows:
        print(f"{svc:<9} {how:<32} {ops:>9.0f} {ops / plain_of[svc]:>13.2f}")
    print(f"\nour database pool after the run: waits={stats['waits']}, size={stats['size']}")


if __name__ == "__main__":
    asyncio.run(main())
