"""One Redis URL, the right redis-py client: plain, TLS, Cluster or Sentinel.

Why it exists: every Redis-backed plugin (cache, rate limiter, breaker, GPU
ledger, durable tasks) used to build its own client from its own URL, each
with redis-py's defaults: a 100-connection pool that fails a command outright
(``MaxConnectionsError``) when a burst finds it busy, and no way to reach a
Redis Cluster. Here a URL picks the client and every plugin gets the same
pool discipline:

- ``redis://host:port/db``, ``rediss://...`` (TLS), ``unix:///path``: a
  `redis.asyncio.Redis` on a `BlockingConnectionPool`: at most
  `max_connections` sockets, and a command that finds them all busy *waits*
  (up to `pool_timeout`) instead of failing;
- ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS):
  a `redis.asyncio.RedisCluster` that discovers the other nodes from any one of
  them. redis-py's cluster client has no waiting pool (past its per-node
  `max_connections` it raises), so commands pass a semaphore of the same size
  first: at most `max_connections` commands in flight per client, so no node
  pool can run out;
- ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``: the
  current master of `service`, as the Sentinels name it (redis-py's
  `Sentinel.master_for`, which follows a failover by itself).

`is_pool_wait` tells a caller that an error was the pool (every connection
busy for `pool_timeout`), not Redis: callers never count that as Redis being
down. `scan_keys` iterates SCAN on every master of a cluster (per-node
cursors) or on the one server otherwise. `hash_tag` makes keys that a Lua
script touches together live in one cluster slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "CLUSTER_SCHEMES",
    "PLAIN_SCHEMES",
    "SCHEMES",
    "SENTINEL_SCHEMES",
    "PoolWaitTimeout",
    "close_client",
    "hash_tag",
    "is_cluster",
    "is_pool_wait",
    "redis_client",
    "release_shared",
    "scan_keys",
    "scan_pages",
    "shared_client",
]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
PLAIN_SCHEMES = ("redis", "rediss", "unix")
SCHEMES = (*PLAIN_SCHEMES, *CLUSTER_SCHEMES, *SENTINEL_SCHEMES)  # every URL redis_client takes


class PoolWaitTimeout(Exception):
    """Every connection (or in-flight slot) of the client stayed busy for `pool_timeout`."""


def hash_tag(prefix: str) -> str:
    """`prefix` as a cluster hash tag (``{prefix}``) unless it already holds one."""
    if "{" in prefix and "}" in prefix.split("{", 1)[1]:
        return prefix
    return "{" + prefix + "}"


def is_cluster(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def is_pool_wait(exc: BaseException) -> bool:
    """True when `exc` means "no free connection here", not "Redis is unwell"."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import MaxConnectionsError

    if isinstance(exc, (PoolWaitTimeout, MaxConnectionsError)):
        return True
    # BlockingConnectionPool's own words when its wait for a connection times out
    return isinstance(exc, RedisConnectionError) and "No connection available" in str(exc)


def _hosts(netloc: str, default_port: int = 6379) -> tuple[str | None, str | None, list[Any]]:
    """(username, password, [(host, port), ...]) from ``user:pw@h1:p1,h2:p2``."""
    auth, _, hosts = netloc.rpartition("@")
    username = password = None
    if auth:
        user, sep, pw = auth.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    out: list[Any] = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":") if part.count(":") == 1 else (part, "", "")
        if not sep:
            host, port = part, str(default_port)
        out.append((host.strip("[]"), int(port)))
    return username, password, out


def redis_client(
    url: str,
    *,
    max_connections: int = 64,
    pool_timeout: float | None = 5.0,
    socket_timeout: float | None = None,
    connect_timeout: float | None = 2.0,
    retries: int = 0,
    **kwargs: Any,
) -> Any:
    """The redis-py asyncio client for `url` (see the module docstring for the schemes).

    `max_connections` bounds the sockets (per node on a cluster); a command
    waits up to `pool_timeout` seconds for one, then raises an error for which
    `is_pool_wait` is true. `retries`: redis-py's own retries on a connection
    error (0: fail fast, the caller's back-off decides).
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff, NoBackoff

    if max_connections < 1:
        raise ValueError(f"max_connections: expected >= 1, got {max_connections!r}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05) if retries else NoBackoff(), retries)
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": retry,
        **kwargs,
    }
    if scheme in PLAIN_SCHEMES:
        from redis.asyncio import BlockingConnectionPool, Redis

        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout, **common
        )
        # not Redis.from_pool: with a pool it owns, a blocked XREADGROUP cancelled at
        # shutdown never returned (redis-py 8.2); close_client() disconnects the pool
        return Redis(connection_pool=pool)
    if scheme in CLUSTER_SCHEMES:
        return _cluster(url, scheme, max_connections, pool_timeout, common)
    if scheme in SENTINEL_SCHEMES:
        return _sentinel(url, scheme, max_connections, pool_timeout, common)
    raise ValueError(
        f"expected a redis://, rediss://, unix://, redis+cluster:// or redis+sentinel:// URL, "
        f"got {url.split('://', 1)[0] + '://' if '://' in url else url!r}"
    )


def _cluster(
    url: str, scheme: str, max_connections: int, pool_timeout: float | None, common: dict[str, Any]
) -> Any:
    from redis.asyncio.cluster import ClusterNode

    parts = urlsplit(url.replace(scheme, "redis", 1))
    username, password, hosts = _hosts(parts.netloc)
    if not hosts:
        raise ValueError(f"{scheme}:// needs at least one host:port")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    options: dict[str, Any] = dict(common)
    if scheme.startswith("rediss"):
        options["ssl"] = True
        if "ssl_cert_reqs" in query:
            options["ssl_cert_reqs"] = query["ssl_cert_reqs"]
    client = _BoundedCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in hosts],
        username=username,
        password=password,
        max_connections=max_connections,
        **options,
    )
    client._od_slots_max = max_connections
    client._od_pool_timeout = pool_timeout
    return client


def _sentinel(
    url: str, scheme: str, max_connections: int, pool_timeout: float | None, common: dict[str, Any]
) -> Any:
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    # defined here, not at module level: without the redis extra, importing this module
    # must still work for the plugins that only use it when a URL is configured
    class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
        """redis-py's Sentinel pool (asks for the master, follows a failover) that waits
        up to `timeout` for a free connection, as our plain pools do. redis-py's own
        raised MaxConnectionsError past the pool, which the rate limiter counted as a
        Redis outage."""

    parts = urlsplit(url.replace(scheme, "redis", 1))
    username, password, hosts = _hosts(parts.netloc, 26379)
    path = [p for p in parts.path.split("/") if p]
    if not hosts or not path:
        raise ValueError(f"{scheme}:// needs host:port[,host:port...]/service_name[/db]")
    service, db = path[0], int(path[1]) if len(path) > 1 else 0
    auth: dict[str, Any] = {"username": username, "password": password}
    sentinel = Sentinel(
        hosts,
        sentinel_kwargs={**auth, "socket_connect_timeout": common.get("socket_connect_timeout")},
        ssl=scheme.startswith("rediss"),
        **auth,
        **common,
    )
    return sentinel.master_for(
        service,
        connection_pool_class=BlockingSentinelPool,
        db=db,
        max_connections=max_connections,
        timeout=pool_timeout,
    )


try:
    from redis.asyncio.cluster import RedisCluster as _RedisCluster
except ImportError:  # pragma: no cover - redis is a core dependency
    _RedisCluster = object  # type: ignore[assignment,misc]


class _BoundedCluster(_RedisCluster):
    """A RedisCluster whose commands wait for an in-flight slot instead of failing.

    The semaphore is created in the loop that first uses the client (redis-py's
    connections are bound to it as well).
    """

    _od_slots: asyncio.Semaphore | None = None
    _od_slots_max = 64
    _od_pool_timeout: float | None = 5.0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        slots = self._od_slots
        if slots is None:
            slots = self._od_slots = asyncio.Semaphore(self._od_slots_max)
        try:
            async with asyncio.timeout(self._od_pool_timeout):
                await slots.acquire()
        except TimeoutError:
            raise PoolWaitTimeout(
                f"all {self._od_slots_max} Redis Cluster command slots busy for "
                f"{self._od_pool_timeout:g}s"
            ) from None
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            slots.release()


# One client per (event loop, URL, options) per process for the plugins that share state on the
# request path (rate limiter, breakers): one deliberately sized pool, not one per
# plugin or per breaker. Reference-counted: the last `release_shared` closes it.
_SHARED: dict[tuple[Any, ...], list[Any]] = {}


def shared_client(url: str, **options: Any) -> Any:
    """The process's shared client for `url` and `options` (see `redis_client`)."""
    try:  # a client's connections belong to the loop that opened them
        loop: int | None = id(asyncio.get_running_loop())
    except RuntimeError:
        loop = None
    key = (loop, url, *sorted(options.items()))
    entry = _SHARED.get(key)
    if entry is None:
        entry = _SHARED[key] = [redis_client(url, **options), 0]
    entry[1] += 1
    return entry[0]


async def release_shared(client: Any) -> None:
    """Give back a `shared_client`; the last user's release closes it."""
    for key, entry in list(_SHARED.items()):
        if entry[0] is client:
            entry[1] -= 1
            if entry[1] <= 0:
                del _SHARED[key]
                await close_client(client)
            return
    await close_client(client)


async def close_client(client: Any) -> None:
    """Close `client` and every connection of its pool (or of each cluster node, or
    the Sentinels' own connections behind a Sentinel pool)."""
    try:
        await client.aclose()
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            await pool.disconnect()
            manager = getattr(pool, "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", ()):
                await sentinel.aclose()
    except Exception:  # closing a dead connection may fail; nothing left to do
        pass


def scan_pages(client: Any) -> list[Callable[..., Awaitable[tuple[int, list[Any]]]]]:
    """One SCAN page function per server to walk: ``await page(cursor, match=, count=)``
    gives ``(next cursor, keys)``. A cluster has one per master, each with its own
    cursor (a cursor from one node means nothing to another); otherwise one."""
    if not is_cluster(client):

        async def plain(cursor: int, **kwargs: Any) -> tuple[int, list[Any]]:
            cur, keys = await client.scan(cursor, **kwargs)
            return int(cur), list(keys)

        return [plain]

    def node_page(node: Any) -> Callable[..., Awaitable[tuple[int, list[Any]]]]:
        async def page(cursor: int, **kwargs: Any) -> tuple[int, list[Any]]:
            cursors, keys = await client.scan(cursor, target_nodes=node, **kwargs)
            cur = next(iter(cursors.values())) if isinstance(cursors, dict) else cursors
            return int(cur), list(keys)

        return page

    return [node_page(node) for node in client.get_primaries()]


async def scan_keys(client: Any, match: str | bytes, count: int = 1000) -> AsyncIterator[Any]:
    """Every key matching `match`: SCAN with a cursor per master on a cluster."""
    if is_cluster(client):
        # redis-py's cluster scan_iter keeps one cursor per node and SCANs the primaries
        async for key in client.scan_iter(match=match, count=count, target_nodes=client.PRIMARIES):
            yield key
        return
    cursor = 0
    while True:
        cursor, keys = await client.scan(cursor, match=match, count=count)
        for key in keys:
            yield key
        if not cursor:
            return
