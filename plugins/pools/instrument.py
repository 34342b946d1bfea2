"""Counting inside the libraries' pools: waits, timeouts, failures, health.

Why it exists: SQLAlchemy, redis-py and aiohttp pool connections well but do
not count how often a caller waited, how often a wait ended in a timeout, or
whether the service behind the pool is up. These small subclass hooks and
aiohttp trace callbacks count that, name the pool in the errors they raise,
and tag errors with the pool they came through (`pool_of`), so the plugin can
answer 503 naming the pool.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

logger = structlog.get_logger("overdrive.pools")

__all__ = [
    "PoolError",
    "PoolExhausted",
    "PoolFigures",
    "is_exhausted",
    "pool_of",
]

_POOL_ATTR = "overdrive_pool"  # set on exceptions raised through a pool: which pool
_EXHAUSTED_ATTR = "overdrive_pool_exhausted"  # set where the library's own error says less


class PoolError(Exception):
    """Base of the errors this module raises (always names the pool)."""


class PoolExhausted(PoolError):
    """Every connection of a pool stayed checked out for the whole wait.

    The concrete class raised also derives from the library's own error
    (``sqlalchemy.exc.TimeoutError``, ``redis.exceptions.ConnectionError``), so
    code written against the library still catches it.
    """


_EXHAUSTED: dict[type, Any] = {}


def _exhausted(base: type[BaseException], message: str, pool: str) -> BaseException:
    cls: Any = _EXHAUSTED.get(base)
    if cls is None:
        library = base.__module__.split(".")[0].title()  # Sqlalchemy, Redis
        cls = type(f"{library}PoolExhausted", (PoolExhausted, base), {})
        cls.__module__ = __name__
        _EXHAUSTED[base] = cls
    err: BaseException = cls.__new__(cls)
    Exception.__init__(err, message)
    setattr(err, _POOL_ATTR, pool)
    return err


def pool_of(error: BaseException | None) -> str | None:
    """The name of the pool an error came through (following causes), or None."""
    seen = 0
    while error is not None and seen < 8:
        name = getattr(error, _POOL_ATTR, None)
        if name is not None:
            return str(name)
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def is_exhausted(error: BaseException | None) -> bool:
    """True when `error` (or a cause) says a pool stayed exhausted for its whole wait."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, PoolExhausted) or getattr(error, _EXHAUSTED_ATTR, False):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def mark_exhausted(error: BaseException) -> None:
    """Mark a library's own timeout error as "the pool stayed exhausted"."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(error, _EXHAUSTED_ATTR, True)


def tag_error(error: BaseException | None, name: str) -> None:
    if error is not None:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(error, _POOL_ATTR, name)


@dataclass
class PoolFigures:
    """What we count for one pool beyond what the library reports."""

    waits: int = 0  # checkouts that found no free connection and had to wait
    wait_seconds: float = 0.0
    timeouts: int = 0  # waits that ended in PoolExhausted
    errors: int = 0  # connection failures (refused, reset, disconnect)
    recoveries: int = 0  # times the pool came back after being down
    healthy: bool = True
    last_error: str | None = None
    down_since: float | None = None  # wall-clock time of the first failure in a row
    extra: dict[str, Any] = field(default_factory=dict)

    def failed(self, pool: str, error: BaseException | str) -> None:
        self.errors += 1
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.last_error = text[:300]
        if self.healthy:
            self.healthy = False
            self.down_since = time.time()
            logger.warning("pool unavailable", pool=pool, error=self.last_error)

    def succeeded(self, pool: str) -> None:
        if not self.healthy:
            self.healthy = True
            self.recoveries += 1
            down = time.time() - (self.down_since or time.time())
            self.down_since = None
            logger.info("pool recovered", pool=pool, down_seconds=round(down, 3))

    def as_dict(self) -> dict[str, Any]:
        return {
            "waits": self.waits,
            "wait_seconds": round(self.wait_seconds, 6),
            "timeouts": self.timeouts,
            "errors": self.errors,
            "recoveries": self.recoveries,
            "healthy": self.healthy,
            "last_error": self.last_error,
            "down_since": self.down_since,
        }


def counted_do_get(name: str, figures: PoolFigures, timeout_error: type[BaseException]) -> Any:
    """A `_do_get` for a SQLAlchemy queue pool subclass that counts waits and timeouts."""

    def _do_get(self: Any) -> Any:
        base: Any = type(self).__mro__[1]
        must_wait = self.checkedin() == 0 and self.overflow() >= self._max_overflow
        if not must_wait:
            return base._do_get(self)
        figures.waits += 1
        t0 = time.perf_counter()
        try:
            return base._do_get(self)
        except timeout_error as exc:
            figures.timeouts += 1
            raise _exhausted(
                timeout_error,
                f"pool {name!r} exhausted: all {self.size()} connections and "
                f"{self._max_overflow} overflow stayed checked out for "
                f"{self._timeout:g} s (pool_timeout); raise pool_size/max_overflow "
                "or hold connections for less time",
                name,
            ) from exc
        finally:
            figures.wait_seconds += time.perf_counter() - t0

    return _do_get


def counted_get_connection(
    name: str, figures: PoolFigures, failures: tuple[type[BaseException], ...]
) -> Any:
    """A `get_connection` for a redis-py BlockingConnectionPool subclass."""

    async def get_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        base: Any = type(self).__mro__[1]
        must_wait = not self.can_get_connection()
        t0 = time.perf_counter()
        if must_wait:
            figures.waits += 1
        try:
            conn = await base.get_connection(self, *args, **kwargs)
        except failures as exc:
            if must_wait and str(exc) == "No connection available.":
                figures.timeouts += 1
                raise _exhausted(
                    type(exc),
                    f"pool {name!r} exhausted: all {self.max_connections} connections stayed "
                    f"in use for {self.timeout:g} s (timeout); raise max_connections or "
                    "hold connections for less time",
                    name,
                ) from exc
            figures.failed(name, exc)
            tag_error(exc, name)
            raise
        finally:
            if must_wait:
                figures.wait_seconds += time.perf_counter() - t0
        return conn

    return get_connection


def counted_execute_command(
    name: str, figures: PoolFigures, failures: tuple[type[BaseException], ...]
) -> Any:
    """An `execute_command` for a redis client subclass: failures down, successes up."""

    async def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        base: Any = type(self).__mro__[1]
        try:
            result = await base.execute_command(self, *args, **options)
        except failures as exc:
            if not isinstance(exc, PoolExhausted) and pool_of(exc) is None:
                figures.failed(name, exc)  # not yet counted by get_connection
            tag_error(exc, name)
            raise
        if not figures.healthy:
            figures.succeeded(name)
        return result

    return execute_command


def database_figures(entry: Any) -> dict[str, Any]:
    pool = entry.pool.sync_engine.pool
    if hasattr(pool, "checkedout") and hasattr(pool, "_max_overflow"):
        return {
            "size": pool.size(),
            "checked_out": pool.checkedout(),
            "idle": pool.checkedin(),
            "overflow": max(0, pool.overflow()),
            "pool_class": type(pool).__mro__[1].__name__,
        }
    # StaticPool and friends: one connection, never counted out.
    return {
        "size": entry.info["pool_size"],
        "checked_out": 0,
        "idle": 1,
        "overflow": 0,
        "pool_class": type(pool).__name__,
    }


def redis_figures(entry: Any) -> dict[str, Any]:
    pool = entry.pool.connection_pool
    in_use = len(getattr(pool, "_in_use_connections", ()))
    idle = len(getattr(pool, "_available_connections", ()))
    return {
        "size": pool.max_connections,
        "checked_out": in_use,
        "idle": idle,
        "overflow": 0,
    }


def http_figures(entry: Any) -> dict[str, Any]:
    session = entry.pool
    connector = session.connector
    in_flight = entry.info["state"]["in_flight"]
    idle = 0
    conns = getattr(connector, "_conns", None)
    if isinstance(conns, dict):
        idle = sum(len(v) for v in conns.values())
    return {
        "size": entry.info["connection_limit"],
        "checked_out": in_flight,
        "idle": idle,
        "overflow": 0,
        "closed": bool(session.closed),
    }
