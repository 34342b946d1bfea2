"""The `pools` plugin: open the configured pools at startup, close them at shutdown.

Endpoints reach them through the host: ``host.connection_pool_manager`` (the
seed's name), ``host.state["pools"]["main_db"]``. A request that fails because
a pool's service is gone, or because a pool stayed exhausted, is answered 503
with a reason and ``Retry-After`` instead of a 500 traceback.

    [pools.databases.main_db]
    url = "postgresql+asyncpg://user:pass@db/app"
    pool_size = 20
    max_overflow = 30
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import overdrive
from overdrive import ConfigError, hookimpl
from overdrive.metrics import MetricFamily as F
from overdrive.middleware.responses import PlainResponse

from .instrument import PoolError, PoolExhausted, PoolFigures, is_exhausted, logger, pool_of
from .manager import DEFAULT_DATABASE_URL, ConnectionPoolManager

__all__ = [
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


def _check(where: str, obj: Any, minimums: dict[str, float]) -> None:
    for key, minimum in minimums.items():
        value = getattr(obj, key)
        if value < minimum:
            raise ConfigError(f"{where}.{key}: expected >= {minimum:g}, got {value!r}")


@dataclass
class DatabasePoolSettings:
    """``[pools.databases.NAME]``: one SQLAlchemy asyncio engine."""

    url: str = DEFAULT_DATABASE_URL
    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout: float = 30.0
    connect_timeout: float = 5.0
    pool_recycle: float = 1800.0
    pre_ping: bool = True  # one round trip per checkout finds dead connections first


@dataclass
class RedisPoolSettings:
    """``[pools.redis.NAME]``: one redis.asyncio client on a blocking pool."""

    url: str = "redis://127.0.0.1:6379/0"
    max_connections: int = 50
    timeout: float = 20.0
    socket_timeout: float = 5.0
    connect_timeout: float = 2.0


@dataclass
class HttpPoolSettings:
    """``[pools.http.NAME]``: one aiohttp ClientSession with a TCPConnector."""

    base_url: str | None = None
    connection_limit: int = 100
    limit_per_host: int = 30
    timeout: float = 30.0
    pool_timeout: float = 10.0


@dataclass
class PoolsSettings:
    databases: dict[str, DatabasePoolSettings] = field(default_factory=dict)
    redis: dict[str, RedisPoolSettings] = field(default_factory=dict)
    http: dict[str, HttpPoolSettings] = field(default_factory=dict)
    ping_on_startup: bool = True  # one round trip per pool; a failure is logged, not fatal
    retry_after: int = 5  # seconds, in the 503 answered when a pool's service is gone

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for kind in ("databases", "redis", "http"):
            for name in getattr(self, kind):
                if name in seen:
                    raise ConfigError(
                        f"pools.{kind}.{name}: the name is used by pools.{seen[name]} too"
                    )
                seen[name] = kind
        tiny = 0.001
        for name, d in self.databases.items():
            where = f"pools.databases.{name}"
            _check(where, d, {"pool_size": 1, "max_overflow": 0, "pool_timeout": tiny})
            _check(where, d, {"connect_timeout": tiny, "pool_recycle": -1})
            if "://" not in d.url:
                raise ConfigError(
                    f"{where}.url: expected a SQLAlchemy URL such as "
                    f"'postgresql+asyncpg://user@host/db', got {d.url!r}"
                )
        for name, r in self.redis.items():
            where = f"pools.redis.{name}"
            _check(where, r, {"max_connections": 1, "timeout": tiny, "socket_timeout": tiny})
            _check(where, r, {"connect_timeout": tiny})
            if not r.url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError(f"{where}.url: expected redis://host:port/db, got {r.url!r}")
        for name, h in self.http.items():
            where = f"pools.http.{name}"
            _check(where, h, {"connection_limit": 1, "limit_per_host": 0, "timeout": tiny})
            _check(where, h, {"pool_timeout": tiny})
        _check("pools", self, {"retry_after": 0})


class PoolsPlugin(overdrive.Plugin):
    """Owns a `ConnectionPoolManager` for the host's lifetime."""

    name = "pools"
    metric_families = (
        F(
            "pool_max_connections",
            "gauge",
            "Connections a pool keeps open at most (its size)",
            "pools.*.size",
            labels=("pool", "kind"),
        ),
        F(
            "pool_checked_out_connections",
            "gauge",
            "Connections in use now",
            "pools.*.checked_out",
            labels=("pool", "kind"),
            multiprocess_mode="livesum",
        ),
        F(
            "pool_idle_connections",
            "gauge",
            "Connections open and free now",
            "pools.*.idle",
            labels=("pool", "kind"),
            multiprocess_mode="livesum",
        ),
        F(
            "pool_overflow_connections",
            "gauge",
            "Connections open beyond the pool's size now",
            "pools.*.overflow",
            labels=("pool", "kind"),
            multiprocess_mode="livesum",
        ),
        F(
            "pool_waits",
            "counter",
            "Checkouts that found no free connection and waited",
            "pools.*.waits",
            labels=("pool", "kind"),
        ),
        F(
            "pool_wait_seconds",
            "counter",
            "Seconds checkouts spent waiting for a connection",
            "pools.*.wait_seconds",
            unit="seconds",
            labels=("pool", "kind"),
        ),
        F(
            "pool_timeouts",
            "counter",
            "Waits that ended without a connection (PoolExhausted)",
            "pools.*.timeouts",
            labels=("pool", "kind"),
        ),
        F(
            "pool_errors",
            "counter",
            "Connection failures (refused, reset, disconnect)",
            "pools.*.errors",
            labels=("pool", "kind"),
        ),
        F(
            "pool_recoveries",
            "counter",
            "Times a pool came back after being down",
            "pools.*.recoveries",
            labels=("pool", "kind"),
        ),
        F(
            "pool_healthy",
            "gauge",
            "1 while the pool's backend answers",
            "pools.*.healthy",
            labels=("pool", "kind"),
        ),
    )
    Settings = PoolsSettings
    provides: ClassVar[dict[str, str]] = {
        "connection_pool_manager": "manager",
        "pool_manager": "manager",
    }

    def __init__(self, settings: PoolsSettings | None = None) -> None:
        super().__init__(settings)
        self.manager = ConnectionPoolManager()

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        host.state["connection_pool_manager"] = self.manager
        host.state["pools"] = self.manager.pools

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        s: PoolsSettings = self.settings or PoolsSettings()
        m = self.manager
        try:
            for name, d in s.databases.items():
                await m.create_database_pool(
                    name,
                    d.url,
                    pool_size=d.pool_size,
                    max_overflow=d.max_overflow,
                    pool_timeout=d.pool_timeout,
                    connect_timeout=d.connect_timeout,
                    pool_recycle=d.pool_recycle,
                    pool_pre_ping=d.pre_ping,
                )
            for name, r in s.redis.items():
                await m.create_redis_pool(
                    name,
                    r.url,
                    max_connections=r.max_connections,
                    timeout=r.timeout,
                    socket_timeout=r.socket_timeout,
                    connect_timeout=r.connect_timeout,
                )
            for name, h in s.http.items():
                await m.create_http_pool(
                    name,
                    h.base_url,
                    connection_limit=h.connection_limit,
                    limit_per_host=h.limit_per_host,
                    timeout=h.timeout,
                    pool_timeout=h.pool_timeout,
                )
        except BaseException:
            await m.close_all()
            raise
        if s.ping_on_startup:
            for name in list(m.pools):
                if not await m.ping(name):
                    logger.warning(
                        "pool not reachable at startup; requests that need it get 503 until it is",
                        pool=name,
                    )

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        await self.manager.close_all()

    @hookimpl(trylast=True)
    def on_failure(self, ctx: Any, error: BaseException | None) -> Any:
        """A request that broke on a pool (service gone, pool exhausted) gets a 503."""
        if error is None:
            # A 5xx start: Starlette's ServerErrorMiddleware sends its 500 from inside
            # its `except` block, so the exception being handled is the cause.
            error = sys.exc_info()[1]
            if error is None:
                return None
        name = pool_of(error)
        if name is None or name not in self.manager:
            return None
        s: PoolsSettings = self.settings or PoolsSettings()
        reason = f"pool {name!r} {'exhausted' if is_exhausted(error) else 'unavailable'}"
        body = json.dumps(
            {"error": reason, "detail": f"{type(error).__name__}: {error}"[:300]}
        ).encode()
        return PlainResponse(503, body, content_type=b"application/json", retry_after=s.retry_after)

    @hookimpl
    async def collect_stats(self, host: Any) -> dict[str, Any]:
        pools = await self.manager.get_all_stats()
        return {
            "pools": pools,
            "count": len(pools),
            "healthy": all(p["healthy"] for p in pools.values()),
        }
