"""The two tiers of `AsyncCache`: memory (bounded by entries and bytes) and Redis.

`MemoryTier` keeps live Python objects (no serialization on a memory hit) in
an eviction-policy store and a tag index. `RedisTier` wraps a
`redis.asyncio` client so that no fault reaches a caller: every command runs
under a deadline; a fault (refused, reset, timed out, SIGSTOPped server) is
counted and logged once, and Redis is skipped for a back-off period that
doubles up to 16x `redis_retry_after`; the next command after it is the probe
(redis-py reconnects by itself), and a success resets the back-off.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any

import structlog

from .policies import make_store
from .settings import CacheConfig

__all__ = ["ENTRY_OVERHEAD", "FAULT", "Entry", "MemoryTier", "RedisTier", "make_redis_client"]

logger = structlog.get_logger("overdrive.cache")
FAULT: Any = object()  # what RedisTier.call returns instead of raising


class Entry:
    __slots__ = ("expires_at", "size", "tags", "value")

    def __init__(self, value: Any, expires_at: float, size: int, tags: tuple[str, ...]) -> None:
        self.value = value
        self.expires_at = expires_at  # epoch seconds; 0: never
        self.size = size
        self.tags = tags


#: Bytes the memory tier spends per entry besides the key and the value, measured with
#: tracemalloc (benchmarks/cache_memory.py): the `Entry`, its expiry float, the
#: policy's bookkeeping (S3-FIFO: the key dict, the frequency dict, its queue's node
#: and at most one ghost; the other policies spend less) and dict growth slack.
ENTRY_OVERHEAD = 400
TAG_OVERHEAD = 80  # per tag of an entry: its slot in the tag index's set


def key_size(key: Hashable) -> int:
    """What a key costs: a str is counted by length (49 bytes of object header)."""
    if isinstance(key, str):
        return len(key) + 49 if key.isascii() else sys.getsizeof(key)
    if isinstance(key, bytes):
        return len(key) + 33
    return sys.getsizeof(key)


def size_of(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return len(value) + 64
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return sys.getsizeof(value)


class MemoryTier:
    """Bounded by `config.max_size` entries and `config.max_bytes`, read at each insertion."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.store = make_store(config.eviction_policy)
        self.bytes = 0
        self.evictions = 0
        self.expired = 0
        self._tags: dict[str, set[Hashable]] = {}

    def __len__(self) -> int:
        return len(self.store)

    def get(self, key: Hashable, now: float) -> Entry | None:
        entry: Entry | None = self.store.get(key)
        if entry is not None and entry.expires_at and now >= entry.expires_at:
            self.delete(key)
            self.expired += 1
            return None
        return entry

    def set(
        self,
        key: Hashable,
        value: Any,
        expires_at: float,
        size: int,
        tags: tuple[str, ...] = (),
    ) -> bool:
        config = self.config
        # `max_bytes` bounds what the process holds: the key and the per-entry
        # objects count, not the value alone.
        size += key_size(key) + ENTRY_OVERHEAD + TAG_OVERHEAD * len(tags)
        if size > config.max_bytes:
            self.delete(key)
            return False
        self.delete(key)
        self.store.set(key, Entry(value, expires_at, size, tags), expires_at)
        self.bytes += size
        for tag in tags:
            self._tags.setdefault(tag, set()).add(key)
        while len(self.store) > config.max_size or self.bytes > config.max_bytes:
            victim = self.store.evict()
            if victim is None:
                break
            self._forget(victim[0], victim[1])
            self.evictions += 1
        return True

    def _forget(self, key: Hashable, entry: Entry) -> None:
        self.bytes -= entry.size
        for tag in entry.tags:
            keys = self._tags.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tags[tag]

    def delete(self, key: Hashable) -> bool:
        entry = self.store.pop(key)
        if entry is None:
            return False
        self._forget(key, entry)
        return True

    def delete_prefix(self, prefix: str) -> int:
        doomed = [k for k in self.store.key_list() if isinstance(k, str) and k.startswith(prefix)]
        for key in doomed:
            self.delete(key)
        return len(doomed)

    def delete_tags(self, tags: Iterable[str]) -> int:
        count = 0
        for tag in tags:
            for key in list(self._tags.get(tag, ())):
                count += self.delete(key)
        return count

    def trim(self, keep: float) -> int:
        """Evict until at most `keep` (a fraction) of the entries and bytes remain."""
        target_n = int(len(self.store) * keep)
        target_b = int(self.bytes * keep)
        evicted = 0
        while len(self.store) > target_n or self.bytes > target_b:
            victim = self.store.evict()
            if victim is None:
                break
            self._forget(victim[0], victim[1])
            evicted += 1
        self.evictions += evicted
        return evicted

    def clear(self) -> None:
        self.store.clear()
        self._tags.clear()
        self.bytes = 0


def _is_reply_error(exc: BaseException) -> bool:
    """An error reply from a live server (redis-py's ResponseError and its subclasses),
    as opposed to a connection fault or a timeout."""
    try:
        from redis.exceptions import ResponseError
    except ImportError:  # pragma: no cover - redis is a dependency of the Redis tier
        return False
    return isinstance(exc, ResponseError)


def make_redis_client(url: str, timeout: float, max_connections: int = 512) -> Any:
    """A `redis.asyncio` client that fails fast (our back-off, not redis-py's retries)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from overdrive.plugins.redisconn import CLUSTER_SCHEMES, SENTINEL_SCHEMES, redis_client

    if url.split("://", 1)[0].lower() in CLUSTER_SCHEMES + SENTINEL_SCHEMES:
        # Redis Cluster / Sentinel: the shared helper's client (its own slot-aware pools)
        return redis_client(
            url, max_connections=max_connections, pool_timeout=timeout, connect_timeout=timeout
        )

    # No socket_timeout: redis-py would wrap every send in asyncio.wait_for (a task per
    # command); RedisTier.call bounds each command with a cheaper asyncio.timeout.
    # A plain pool (a blocking one costs a lock and a timer per command); past
    # max_connections a command fails fast and counts as a fault. Single-flight keeps
    # Redis traffic to one command per key in flight, so bursts stay far below it.
    pool = aioredis.ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return aioredis.Redis(connection_pool=pool)


class RedisTier:
    """Every command through `call`: it returns the result, or `FAULT` and never raises.

    Each command runs under an `asyncio.timeout` of `redis_timeout` (whoever
    made the client); on a timeout redis-py drops that connection.
    """

    def __init__(self, client: Any, config: CacheConfig, owns_client: bool) -> None:
        self.client = client
        self.config = config
        self.owns_client = owns_client
        self.errors = 0
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.refused = 0  # commands Redis answered with an error reply (it is up)
        self.refused_last = False  # the last command got an error reply, not a fault
        self.down_until = 0.0
        self._backoff = config.redis_retry_after
        self.last_error = ""

    @property
    def available(self) -> bool:
        return not self.down_until or time.monotonic() >= self.down_until

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if self.down_until and time.monotonic() < self.down_until:
            return FAULT
        try:
            async with asyncio.timeout(self.config.redis_timeout):
                result = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _is_reply_error(exc):
                # Redis answered, with an error about this command (WRONGTYPE on one
                # key, OOM while full, READONLY replica): Redis is up. The caller
                # gets FAULT for this command only; nothing else is switched off.
                self.refused += 1
                self.refused_last = True
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                return FAULT
            self.fault(exc)
            return FAULT
        self.refused_last = False
        if self.down_until:
            self.back()
        return result

    def back(self) -> None:
        """Redis answered (a command, or the invalidation listener subscribing): no back-off."""
        if self.down_until:
            logger.info("redis is back", after_errors=self.errors)
            self.down_until = 0.0
            self._backoff = self.config.redis_retry_after

    def fault(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if not self.down_until:
            logger.warning(
                "redis unavailable: serving from memory",
                error=self.last_error,
                retry_in=self._backoff,
            )
        self.down_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.config.redis_retry_after * 16)

    async def close(self) -> None:
        if self.owns_client:
            from overdrive.plugins.redisconn import close_client

            await close_client(self.client)  # also the Sentinels' connections, for a Sentinel URL

    def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else 0.0,
            "errors": self.errors,
            "corrupt": self.corrupt,
            "refused": self.refused,
            "available": self.available,
            "last_error": self.last_error,
        }
