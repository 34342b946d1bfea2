"""Batched loads: 1,000 concurrent loads of 100 distinct keys, as database round trips.

Compared in one run, on SQLite (aiosqlite, always) and PostgreSQL (asyncpg, when
127.0.0.1:5432 answers): the naive loop (one SELECT per load), our
`QueryOptimizer.loader` (one tick's loads in one ``WHERE id IN (...)``), and
`aiodataloader` (the library a user would otherwise pick). Statements are
counted with SQLAlchemy's ``before_cursor_execute`` event.

    ./run bench query
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import bindparam, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from overdrive.plugins.query import QueryOptimizer

LOADS = 1000
KEYS = 100
PG_URL = os.environ.get(
    "OVERDRIVE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


async def prepare(engine: AsyncEngine, table: str) -> list[str]:
    statements: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if table in statement and statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, title TEXT)"))
        await conn.execute(
            text(f"INSERT INTO {table} (id, title) VALUES (:id, :t)"),
            [{"id": i, "t": f"video {i}"} for i in range(KEYS)],
        )
    return statements


async def run_backend(label: str, engine: AsyncEngine) -> list[tuple[str, int, float]]:
    table = f"odbench_{uuid.uuid4().hex[:8]}"
    statements = await prepare(engine, table)
    one = text(f"SELECT title FROM {table} WHERE id = :id")
    many = text(f"SELECT id, title FROM {table} WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )

    async def naive(key: int) -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(one, {"id": key})).scalar()

    async def batch_map(keys: list[int]) -> dict[int, str]:
        async with engine.connect() as conn:
            return {r.id: r.title for r in (await conn.execute(many, {"ids": keys})).all()}

    async def batch_list(keys: list[int]) -> list[str | None]:
        found = await batch_map(keys)
        return [found.get(k) for k in keys]

    keys = [i % KEYS for i in range(LOADS)]
    rows = []

    async def measure(name: str, load: Any) -> None:
        statements.clear()
        t0 = perf_counter()
        results = await asyncio.gather(*(load(k) for k in keys))
        dt = perf_counter() - t0
        assert results[7] == "video 7" and results[KEYS + 7] == "video 7", name
        rows.append((name, len(statements), dt))

    try:
        await measure("naive loop", naive)
        await measure("ours (QueryOptimizer.loader)", QueryOptimizer().loader(batch_map).load)
        try:
            from aiodataloader import DataLoader
        except ImportError:
            rows.append(("aiodataloader (not installed)", -1, 0.0))
        else:
            await measure("aiodataloader", DataLoader(batch_list).load)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        await engine.dispose()
    return [(f"{label}: {n}", c, t) for n, c, t in rows]


def pg_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False


async def main() -> None:
    print(f"{LOADS} concurrent loads of {KEYS} distinct keys\n")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp}/bench.db")
        results += await run_backend("sqlite", engine)
    if pg_up():
        results += await run_backend("postgres", create_async_engine(PG_URL))
    else:
        print("(PostgreSQL not reachable on 127.0.0.1:5432: skipped)\n")
    header = f"{'variant':<40} {'round trips':>11} {'vs naive':>9} {'wall ms':>9} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    base: tuple[int, float] = (1, 1.0)
    for name, count, dt in results:
        if "naive" in name:
            base = (count, dt)
        if count < 0:
            print(f"{name:<40} {'-':>11}")
            continue
        print(
            f"{name:<40} {count:>11} {count / base[0]:>9.3f} {dt * 1000:>9.1f} "
            f"{base[1] / dt:>8.1f}x"
        )


if __name__ == "__main__":
    asyncio.run(main())
