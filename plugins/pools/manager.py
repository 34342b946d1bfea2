"""`ConnectionPoolManager`: named database, Redis and HTTP pools, and their figures.

Why it exists: an endpoint must never open a connection per request. The pools
themselves are the libraries' own (SQLAlchemy's `AsyncAdaptedQueuePool`,
redis-py's `BlockingConnectionPool`, aiohttp's `TCPConnector`); this module
creates them with safe defaults (pre-ping, bounded waits, connect timeouts) and,
through `instrument`, counts what the libraries do not (waits, timeouts,
failures, health) and turns "pool exhausted" and "service gone" into errors
that name the pool.

The drivers are optional extras, so each is imported only when a pool of its
kind is created.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from overdrive.redact import redact_url as redact

from .instrument import (
    PoolFigures,
    counted_do_get,
    counted_execute_command,
    counted_get_connection,
    database_figures,
    http_figures,
    logger,
    mark_exhausted,
    redis_figures,
    tag_error,
)

__all__ = ["DEFAULT_DATABASE_URL", "ConnectionPoolManager"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///:memory:"


@dataclass
class _Entry:
    name: str
    kind: str  # "database" | "redis" | "http"
    pool: Any  # what create_* returned: AsyncEngine, Redis client, ClientSession
    figures: PoolFigures
    info: dict[str, Any]


class ConnectionPoolManager:
    """Named pools of three kinds; ``pools`` maps each name to what `create_*` returned.

    ::

        manager = ConnectionPoolManager()
        engine = await manager.create_database_pool("main_db", url, pool_size=20)
        redis = await manager.create_redis_pool("cache", "redis://localhost:6379")
        http = await manager.create_http_pool("api", "https://api.example.com")
        stats = await manager.get_pool_stats("main_db")
        await manager.close_all()
    """

    def __init__(self) -> None:
        self.pools: dict[str, Any] = {}
        self._entries: dict[str, _Entry] = {}

    def __getitem__(self, name: str) -> Any:
        return self.pools[name]

    def __contains__(self, name: object) -> bool:
        return name in self.pools

    def get(self, name: str) -> Any:
        """The pool called `name`; KeyError naming the known pools otherwise."""
        try:
            return self.pools[name]
        except KeyError:
            raise KeyError(
                f"no pool named {name!r}; known: {', '.join(sorted(self.pools)) or '(none)'}"
            ) from None

    def _claim(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"pool name: expected a non-empty string, got {name!r}")
        if name in self.pools:
            raise ValueError(f"a pool named {name!r} exists already; close it first")

    @staticmethod
    def _positive(what: str, value: Any, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{what}: expected an integer >= {minimum}, got {value!r}")

    # -- databases ---------------------------------------------------------------

    async def create_database_pool(
        self,
        name: str,
        url: str = DEFAULT_DATABASE_URL,
        pool_size: int = 5,
        max_overflow: int = 10,
        *,
        pool_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        pool_recycle: float = 1800.0,
        **engine_kwargs: Any,
    ) -> Any:
        """A SQLAlchemy `AsyncEngine` with a counted queue pool and ``pool_pre_ping``.

        `url` is ``postgresql+asyncpg://...`` in production; the default is an
        in-memory SQLite (aiosqlite) database, which SQLAlchemy serves from one
        shared connection (a pool of one). A checkout that waits longer than
        `pool_timeout` raises `PoolExhausted`; a connection attempt is bounded
        by `connect_timeout`.
        """
        from sqlalchemy import event
        from sqlalchemy import exc as sa_exc
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool

        self._claim(name)
        self._positive(f"pool {name!r}: pool_size", pool_size)
        self._positive(f"pool {name!r}: max_overflow", max_overflow, 0)
        if pool_timeout <= 0 or connect_timeout <= 0:
            raise ValueError(f"pool {name!r}: pool_timeout and connect_timeout must be > 0")
        figures = PoolFigures()
        kwargs: dict[str, Any] = {"pool_pre_ping": True, **engine_kwargs}
        memory_sqlite = url.startswith("sqlite") and (":memory:" in url or url.endswith("://"))
        connect_args = dict(kwargs.pop("connect_args", {}) or {})
        if url.startswith("postgresql+asyncpg") or url.startswith("sqlite"):
            connect_args.setdefault("timeout", connect_timeout)
        if connect_args:
            kwargs["connect_args"] = connect_args
        if memory_sqlite:
            # Every connection to :memory: is a new empty database: share one.
            kwargs.setdefault("poolclass", StaticPool)
            size, overflow = 1, 0
        else:
            counted: Any = type(
                "CountedQueuePool",
                (AsyncAdaptedQueuePool,),
                {"_do_get": counted_do_get(name, figures, sa_exc.TimeoutError)},
            )
            kwargs.setdefault("poolclass", counted)
            kwargs.update(
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_timeout=pool_timeout,
                pool_recycle=pool_recycle,
            )
            size, overflow = pool_size, max_overflow
        engine = create_async_engine(url, **kwargs)
        sync_engine = engine.sync_engine

        @event.listens_for(sync_engine, "handle_error")
        def _on_error(context: Any) -> None:
            if context.is_disconnect or context.connection is None:
                figures.failed(name, context.original_exception)
            tag_error(context.sqlalchemy_exception, name)
            tag_error(context.original_exception, name)

        @event.listens_for(sync_engine, "do_connect")
        def _connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
            # Connect errors (refused, reset) reach the caller unwrapped by SQLAlchemy
            # and skip handle_error; count and tag them here.
            try:
                return dialect.connect(*cargs, **cparams)
            except Exception as exc:
                figures.failed(name, exc)
                tag_error(exc, name)
                raise

        @event.listens_for(sync_engine.pool, "connect")
        def _on_connect(dbapi_connection: Any, record: Any) -> None:
            figures.succeeded(name)

        self.pools[name] = engine
        self._entries[name] = _Entry(
            name,
            "database",
            engine,
            figures,
            {"url": redact(url), "pool_size": size, "max_overflow": overflow},
        )
        return engine

    # -- Redis ---------------------------------------------------------------------

    async def create_redis_pool(
        self,
        name: str,
        url: str = "redis://127.0.0.1:6379/0",
        max_connections: int = 50,
        *,
        timeout: float = 20.0,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        **client_kwargs: Any,
    ) -> Any:
        """A `redis.asyncio.Redis` client on a counted `BlockingConnectionPool`.

        At most `max_connections` connections; a command that finds them all
        busy waits up to `timeout` seconds, then raises `PoolExhausted`.
        """
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self._claim(name)
        self._positive(f"pool {name!r}: max_connections", max_connections)
        if timeout is not None and timeout <= 0:
            raise ValueError(f"pool {name!r}: timeout must be > 0 (or None to wait forever)")
        figures = PoolFigures()
        pool_cls: Any = type(
            "CountedBlockingConnectionPool",
            (BlockingConnectionPool,),
            {
                "get_connection": counted_get_connection(
                    name, figures, (RedisConnectionError, RedisTimeoutError, OSError)
                )
            },
        )
        client_kwargs.setdefault("retry", Retry(NoBackoff(), 1))
        pool = pool_cls.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            **client_kwargs,
        )
        counted_redis: Any = type(
            "CountedRedis",
            (Redis,),
            {
                "execute_command": counted_execute_command(
                    name, figures, (RedisConnectionError, RedisTimeoutError, OSError)
                )
            },
        )
        client = counted_redis.from_pool(pool)
        self.pools[name] = client
        self._entries[name] = _Entry(
            name,
            "redis",
            client,
            figures,
            {"url": redact(url), "max_connections": max_connections, "timeout": timeout},
        )
        return client

    # -- HTTP ----------------------------------------------------------------------

    async def create_http_pool(
        self,
        name: str,
        base_url: str | None = None,
        connection_limit: int = 100,
        limit_per_host: int = 30,
        *,
        timeout: float = 30.0,
        pool_timeout: float = 10.0,
        **session_kwargs: Any,
    ) -> Any:
        """An `aiohttp.ClientSession` on a `TCPConnector(limit, limit_per_host)`.

        Relative paths resolve against `base_url`. Waiting for a free connection
        and connecting together are bounded by `pool_timeout` (aiohttp's
        ``connect`` timeout); the whole request by `timeout`.
        """
        import aiohttp

        self._claim(name)
        self._positive(f"pool {name!r}: connection_limit", connection_limit)
        self._positive(f"pool {name!r}: limit_per_host", limit_per_host, 0)
        figures = PoolFigures()
        state = {"in_flight": 0}
        trace = aiohttp.TraceConfig()

        async def queued_start(session: Any, trace_ctx: Any, params: Any) -> None:
            figures.waits += 1
            trace_ctx.queued_at = time.perf_counter()

        async def queued_end(session: Any, trace_ctx: Any, params: Any) -> None:
            figures.wait_seconds += time.perf_counter() - trace_ctx.queued_at
            trace_ctx.queued_at = None

        async def request_start(session: Any, trace_ctx: Any, params: Any) -> None:
            trace_ctx.queued_at = None
            trace_ctx.acquired = False

        async def acquired(session: Any, trace_ctx: Any, params: Any) -> None:
            if not getattr(trace_ctx, "acquired", True):
                trace_ctx.acquired = True
                state["in_flight"] += 1

        def release(trace_ctx: Any) -> None:
            if getattr(trace_ctx, "acquired", False):
                trace_ctx.acquired = False
                state["in_flight"] -= 1

        async def request_end(session: Any, trace_ctx: Any, params: Any) -> None:
            release(trace_ctx)
            figures.succeeded(name)

        async def request_exception(session: Any, trace_ctx: Any, params: Any) -> None:
            release(trace_ctx)
            error = params.exception
            tag_error(error, name)
            queued_at = getattr(trace_ctx, "queued_at", None)
            if queued_at is not None:
                figures.wait_seconds += time.perf_counter() - queued_at
                figures.timeouts += 1
                mark_exhausted(error)
            elif isinstance(error, aiohttp.ClientConnectionError | OSError):
                figures.failed(name, error)

        trace.on_connection_queued_start.append(queued_start)
        trace.on_connection_queued_end.append(queued_end)
        trace.on_request_start.append(request_start)
        trace.on_connection_create_end.append(acquired)
        trace.on_connection_reuseconn.append(acquired)
        trace.on_request_end.append(request_end)
        trace.on_request_exception.append(request_exception)
        connector = aiohttp.TCPConnector(limit=connection_limit, limit_per_host=limit_per_host)
        session_kwargs.setdefault(
            "timeout", aiohttp.ClientTimeout(total=timeout, connect=pool_timeout)
        )
        session = aiohttp.ClientSession(
            base_url=base_url,
            connector=connector,
            trace_configs=[trace, *session_kwargs.pop("trace_configs", [])],
            **session_kwargs,
        )
        self.pools[name] = session
        self._entries[name] = _Entry(
            name,
            "http",
            session,
            figures,
            {
                "base_url": redact(base_url) if base_url else base_url,
                "connection_limit": connection_limit,
                "limit_per_host": limit_per_host,
                "state": state,
            },
        )
        return session

    # -- figures, health, closing --------------------------------------------------

    async def get_pool_stats(self, name: str) -> dict[str, Any]:
        """Figures of one pool.

        ``size`` is the pool's configured size (``pool_size``, ``max_connections``,
        ``connection_limit``); ``checked_out`` the connections in use now;
        ``free_size`` how many more can be handed out before the pool overflows
        or makes callers wait (``size - checked_out``, never below 0), so
        ``size == free_size`` means nothing is in use and ``free_size == 0`` that
        the pool is at its size. ``idle`` counts open connections in the pool,
        ``overflow`` those beyond ``size`` (databases only). ``waits``,
        ``timeouts``, ``errors``, ``healthy`` and ``last_error`` come from our
        counting.
        """
        entry = self._entries.get(name)
        if entry is None:
            self.get(name)  # raises the KeyError that lists the known pools
            raise KeyError(name)  # pragma: no cover
        stats: dict[str, Any] = {"name": name, "kind": entry.kind}
        if entry.kind == "database":
            stats.update(database_figures(entry))
        elif entry.kind == "redis":
            stats.update(redis_figures(entry))
        else:
            stats.update(http_figures(entry))
        stats["free_size"] = max(0, stats["size"] - stats["checked_out"])
        stats.update(entry.figures.as_dict())
        stats.update({k: v for k, v in entry.info.items() if k != "state"})
        return stats

    async def get_all_stats(self) -> dict[str, dict[str, Any]]:
        return {name: await self.get_pool_stats(name) for name in list(self._entries)}

    async def ping(self, name: str, timeout: float = 5.0) -> bool:
        """One round trip through the pool; True when it worked. Never raises."""
        import asyncio

        entry = self._entries[name]
        try:
            async with asyncio.timeout(timeout):
                if entry.kind == "database":
                    from sqlalchemy import text

                    async with entry.pool.connect() as conn:
                        await conn.execute(text("SELECT 1"))
                elif entry.kind == "redis":
                    await entry.pool.ping()
                else:
                    return True  # an HTTP pool has no server of its own to ping
        except Exception as exc:
            entry.figures.failed(name, exc)
            return False
        entry.figures.succeeded(name)
        return True

    async def close(self, name: str) -> None:
        """Close one pool and forget it."""
        entry = self._entries.pop(name, None)
        self.pools.pop(name, None)
        if entry is None:
            return
        try:
            if entry.kind == "database":
                await entry.pool.dispose()
            elif entry.kind == "redis":
                await entry.pool.aclose()
                await entry.pool.connection_pool.disconnect()
            else:
                await entry.pool.close()
        except Exception as exc:  # closing must go on for the other pools
            logger.warning("pool close failed", pool=name, error=f"{type(exc).__name__}: {exc}")

    async def close_all(self) -> None:
        """Close every pool (in reverse order of creation)."""
        for name in reversed(list(self._entries)):
            await self.close(name)
