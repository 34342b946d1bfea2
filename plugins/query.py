"""The `query` plugin: `QueryOptimizer` (cached, single-flight and batched database reads).

Why it exists: the same read is asked for by many concurrent requests (N
identical queries where one would do), and many different reads arrive in the
same instant (N round trips where one ``WHERE id = ANY(...)`` would do).

- `cached_query(key, fn, ttl=)`: read through an `AsyncCache` (memory, and
  Redis when configured); concurrent misses of one key share one call of `fn`.
- `loader(batch_fn)`: a DataLoader (the pattern of graphql/dataloader): the
  loads requested in one event-loop tick are gathered into one `batch_fn(keys)`
  call, with duplicate keys sent once.
- `batch_query(queries)`: the seed's list of ``{"type": ..., "<id>": ...}``
  queries, run through the loader registered for each type.

When the database goes away, cached results are still served; misses fail
fast with `QueryUnavailable` for `retry_after` seconds instead of each waiting
for its own connection timeout.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any, ClassVar

import structlog

from overdrive import ConfigError, Plugin, hookimpl
from overdrive.metrics import MetricFamily as F
from overdrive.plugins.cache import AsyncCache, CacheConfig

__all__ = [
    "DataLoader",
    "QueryOptimizer",
    "QueryPlugin",
    "QueryUnavailable",
    "is_connection_error",
]

logger = structlog.get_logger("overdrive.query")

_MISS: Any = object()
BatchFn = Callable[[list[Any]], Awaitable[Sequence[Any] | Mapping[Any, Any]]]


class QueryUnavailable(ConnectionError):
    """The database cannot be reached; raised at once for misses while it stays down."""


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) says the database is unreachable, not that the
    query was wrong: OS/connection errors, timeouts, SQLAlchemy's invalidated connections.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (OSError, ConnectionError, TimeoutError)):
            return True
        if getattr(e, "connection_invalidated", False):
            return True
        name = type(e).__name__
        if name in ("ConnectionDoesNotExistError", "InterfaceError", "InternalClientError"):
            return True
        orig = getattr(e, "orig", None)
        e = orig if isinstance(orig, BaseException) else (e.__cause__ or e.__context__)
    return False


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class DataLoader:
    """Gathers the `load(key)` calls of one event-loop tick into one `batch_fn(keys)`.

    `batch_fn` gets the distinct keys (in first-asked order) and returns either a
    sequence of results aligned with them (an `Exception` item fails that key
    only) or a mapping key -> result (a missing key gives None). Concurrent loads
    of a key already in a batch in flight share its result. `batch_window`
    seconds (0: the next tick) widens the gathering window; `max_batch_size`
    splits large batches.
    """

    def __init__(
        self,
        batch_fn: BatchFn,
        *,
        max_batch_size: int | None = None,
        batch_window: float = 0.0,
        name: str = "",
    ) -> None:
        if not callable(batch_fn):
            raise TypeError("DataLoader: batch_fn must be callable")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"DataLoader: max_batch_size must be >= 1, got {max_batch_size!r}")
        if batch_window < 0:
            raise ValueError(f"DataLoader: batch_window must be >= 0, got {batch_window!r}")
        self.batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.name = name or getattr(batch_fn, "__name__", "loader")
        self._queue: dict[Hashable, asyncio.Future[Any]] = {}
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}
        self._scheduled = False
        self.loads = 0
        self.batches = 0
        self.keys_sent = 0

    def load(self, key: Hashable) -> asyncio.Future[Any]:
        """A future for `key`'s result (await it)."""
        self.loads += 1
        fut = self._queue.get(key) or self._inflight.get(key)
        if fut is not None:
            return fut
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue[key] = fut
        if not self._scheduled:
            self._scheduled = True
            if self.batch_window:
                loop.call_later(self.batch_window, self._dispatch)
            else:
                loop.call_soon(self._dispatch)
        return fut

    async def load_many(self, keys: Sequence[Hashable]) -> list[Any]:
        return list(await asyncio.gather(*(self.load(k) for k in keys)))

    def _dispatch(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, {}
        items = list(queue.items())
        size = self.max_batch_size or len(items) or 1
        for i in range(0, len(items), size):
            chunk = dict(items[i : i + size])
            self._inflight.update(chunk)
            task = asyncio.ensure_future(self._run(chunk))
            task.add_done_callback(_retrieve)

    async def _run(self, chunk: dict[Hashable, asyncio.Future[Any]]) -> None:
        keys = list(chunk)
        self.batches += 1
        self.keys_sent += len(keys)
        try:
            results = await _call(self.batch_fn, keys)
            if isinstance(results, Mapping):
                values = [results.get(k) for k in keys]
            else:
                values = list(results)
                if len(values) != len(keys):
                    raise ValueError(
                        f"DataLoader {self.name}: batch_fn returned {len(values)} results "
                        f"for {len(keys)} keys"
                    )
        except BaseException as exc:
            for key, fut in chunk.items():
                self._inflight.pop(key, None)
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for key, value in zip(keys, values, strict=True):
            fut = chunk[key]
            self._inflight.pop(key, None)
            if fut.done():
                continue
            if isinstance(value, Exception):
                fut.set_exception(value)
            else:
                fut.set_result(value)

    def stats(self) -> dict[str, Any]:
        return {"loads": self.loads, "batches": self.batches, "keys_sent": self.keys_sent}


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass
class _Batch:
    loader: DataLoader
    key: str


class QueryOptimizer:
    """The seed's `QueryOptimizer(cache)`: `cached_query`, `batch_query`, `loader`.

    `cache` is an `AsyncCache` (anything with ``await get(key, default)`` and
    ``await set(key, value, ttl=)``); None uses a memory-only `AsyncCache`.
    Results go through the cache's serializer (JSON by default in `AsyncCache`):
    return rows as dicts or lists, not ORM objects. None ("no such row") is
    cached like any other result.
    `query_timeout` bounds each query (None: unbounded); after a connection
    failure misses raise `QueryUnavailable` at once for `retry_after` seconds.
    """

    def __init__(
        self,
        cache: Any = None,
        *,
        default_ttl: float | None = 300.0,
        query_timeout: float | None = 30.0,
        retry_after: float = 2.0,
    ) -> None:
        if cache is None:
            cache = AsyncCache(CacheConfig(ttl=default_ttl, namespace="overdrive:query"))
        self.cache = cache
        self.default_ttl = default_ttl
        self.query_timeout = query_timeout
        self.retry_after = retry_after
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._batches: dict[str, _Batch] = {}
        self._down_until = 0.0
        self._down_reason = ""
        self.hits = 0
        self.misses = 0
        self.queries = 0
        self.shared = 0
        self.failures = 0
        self.fast_failures = 0
        self.cache_errors = 0

    # -- cached, single-flight reads ---------------------------------------------------

    async def cached_query(self, key: str, fn: Callable[[], Any], ttl: float | None = None) -> Any:
        """`fn()`'s result for `key`, from the cache when there; concurrent misses share
        one call. Raises `QueryUnavailable` quickly while the database is unreachable.
        """
        try:
            value = await self.cache.get(key, _MISS)
        except Exception as exc:  # the cache's own failure is a miss, not an outage
            self.cache_errors += 1
            logger.warning("query cache read failed", key=key, error=repr(exc))
            value = _MISS
        if value is not _MISS:
            self.hits += 1
            return value
        fut = self._inflight.get(key)
        if fut is not None:
            self.shared += 1
            return await asyncio.shield(fut)
        self.misses += 1
        task = asyncio.ensure_future(self._miss(key, fn, self.default_ttl if ttl is None else ttl))
        task.add_done_callback(_retrieve)
        self._inflight[key] = task
        return await asyncio.shield(task)

    async def _miss(self, key: str, fn: Callable[[], Any], ttl: float | None) -> Any:
        try:
            value = await self.run(key, fn)
            try:
                await self.cache.set(key, value, ttl=ttl)
            except Exception as exc:
                self.cache_errors += 1
                logger.warning("query cache write failed", key=key, error=repr(exc))
            return value
        finally:
            self._inflight.pop(key, None)

    async def run(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one query with the timeout and the fail-fast rule (no cache)."""
        now = monotonic()
        if now < self._down_until:
            self.fast_failures += 1
            raise QueryUnavailable(
                f"query {what!r} not run: the database is unreachable ({self._down_reason}); "
                f"next try in {self._down_until - now:.1f} s; cached results are still served"
            )
        self.queries += 1
        try:
            if self.query_timeout is not None:
                async with asyncio.timeout(self.query_timeout):
                    return await _call(fn, *args)
            return await _call(fn, *args)
        except Exception as exc:
            self.failures += 1
            if not is_connection_error(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}"[:200]
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self.query_timeout} s"
            self._down_until = monotonic() + self.retry_after
            self._down_reason = reason
            logger.warning("database unreachable", query=what, error=reason)
            raise QueryUnavailable(
                f"query {what!r} failed: the database is unreachable ({reason})"
            ) from exc

    async def invalidate(self, key: str) -> None:
        delete = getattr(self.cache, "delete", None)
        if delete is not None:
            await delete(key)

    # -- batching ------------------------------------------------------------------------

    def loader(
        self,
        batch_fn: BatchFn,
        *,
        max_batch_size: int | None = None,
        batch_window: float = 0.0,
        name: str = "",
    ) -> DataLoader:
        """A `DataLoader` whose batches go through `run` (timeout and fail-fast)."""

        async def guarded(keys: list[Any]) -> Any:
            return await self.run(name or getattr(batch_fn, "__name__", "batch"), batch_fn, keys)

        return DataLoader(
            guarded, max_batch_size=max_batch_size, batch_window=batch_window, name=name
        )

    def register_batch(
        self,
        query_type: str,
        batch_fn: BatchFn,
        *,
        key: str,
        max_batch_size: int | None = None,
    ) -> DataLoader:
        """Make `batch_query` answer ``{"type": query_type, key: value}`` queries with
        `batch_fn(list_of_values)` (aligned results or a mapping value -> result).
        """
        dl = self.loader(batch_fn, max_batch_size=max_batch_size, name=query_type)
        self._batches[query_type] = _Batch(dl, key)
        return dl

    async def batch_query(self, queries: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Results aligned with `queries`; one `batch_fn` call per type (duplicates once).

        A query whose type has no registered batch function, or that lacks the
        key field, raises `ValueError` before anything runs.
        """
        futures = []
        plan = []
        for i, q in enumerate(queries):
            if not isinstance(q, Mapping) or "type" not in q:
                raise ValueError(f"batch_query: query {i} has no 'type': {q!r}")
            batch = self._batches.get(q["type"])
            if batch is None:
                known = ", ".join(sorted(self._batches)) or "none registered"
                raise ValueError(f"batch_query: unknown query type {q['type']!r} ({known})")
            if batch.key not in q:
                raise ValueError(f"batch_query: query {i} ({q['type']}) lacks {batch.key!r}")
            plan.append((batch.loader, q[batch.key]))
        for dl, value in plan:
            futures.append(dl.load(value))
        return list(await asyncio.gather(*futures))

    def stats(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "shared": self.shared,
            "queries": self.queries,
            "failures": self.failures,
            "fast_failures": self.fast_failures,
            "cache_errors": self.cache_errors,
            "database_down": monotonic() < self._down_until,
            "batches": {name: b.loader.stats() for name, b in self._batches.items()},
        }


@dataclass
class QuerySettings:
    default_ttl: float | None = 300.0  # seconds a cached_query result lives; None: the cache's
    query_timeout: float | None = 30.0  # seconds one query or batch may take; None: no limit
    retry_after: float = 2.0  # seconds misses fail fast after the database was unreachable
    max_entries: int = 10_000  # results kept in process memory
    use_redis: bool = True  # share results through Redis when the host has a redis_url

    def __post_init__(self) -> None:
        for key in ("default_ttl", "query_timeout"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"query.{key}: expected > 0 or none, got {value!r}")
        if self.retry_after < 0:
            raise ConfigError(f"query.retry_after: expected >= 0, got {self.retry_after!r}")
        if self.max_entries < 1:
            raise ConfigError(f"query.max_entries: expected >= 1, got {self.max_entries!r}")


def make_cache(s: QuerySettings, redis_url: str | None, redis_client: Any = None) -> AsyncCache:
    """An `AsyncCache` of the query plugin's own (memory, plus Redis when given).

    Not the HTTP cache plugin's instance: query results must not share the
    HTTP responses' key space (or their eviction).
    """
    config = CacheConfig(ttl=s.default_ttl, max_size=s.max_entries, namespace="overdrive:query")
    if not s.use_redis:
        return AsyncCache(config)
    return AsyncCache(config, redis_url=redis_url, redis_client=redis_client)


class QueryPlugin(Plugin):
    """`host.query_optimizer`: a `QueryOptimizer` on an `AsyncCache` of its own."""

    name = "query"
    metric_families = (
        F(
            "query_lookups",
            "counter",
            "cached_query calls, by result",
            "(hits=hit|misses=miss|shared=shared)",
            labels=("result",),
        ),
        F("query_executions", "counter", "Queries run against the database", "queries"),
        F("query_failures", "counter", "Queries that failed", "failures"),
        F(
            "query_fast_failures",
            "counter",
            "Queries refused at once while the database is down",
            "fast_failures",
        ),
        F("query_cache_errors", "counter", "Query cache read or write errors", "cache_errors"),
        F(
            "query_database_down",
            "gauge",
            "1 while the database is considered down",
            "database_down",
        ),
    )
    Settings = QuerySettings
    provides: ClassVar[dict[str, str]] = {"query_optimizer": "optimizer"}

    def __init__(self, settings: QuerySettings | None = None) -> None:
        super().__init__(settings)
        self.optimizer: QueryOptimizer | None = None

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: QuerySettings = self.settings
        url = getattr(host, "redis_url", None)
        client = None if url else host.state.get("redis_client")  # the seed's redis_client=
        self.optimizer = QueryOptimizer(
            make_cache(s, url, client),
            default_ttl=s.default_ttl,
            query_timeout=s.query_timeout,
            retry_after=s.retry_after,
        )

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        close = getattr(self.optimizer.cache, "close", None) if self.optimizer else None
        if close is not None:
            await close()

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any] | None:
        return self.optimizer.stats() if self.optimizer is not None else None
