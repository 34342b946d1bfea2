"""`AsyncCache`: the seed's two-level cache (memory, then Redis), usable on its own.

    cache = AsyncCache(redis_client=redis_client, config=CacheConfig(ttl=3600, max_size=1000))
    await cache.set("video_1", {"title": "..."})
    await cache.get("video_1")
    await cache.get_or_set("render_9", render, ttl=60)   # one render for concurrent callers
    cache.get_stats()["hit_rate"]

Values: bytes as they are; other objects through JSON (default) or msgpack for
Redis, never pickle. A value neither can encode (a model, a tensor) stays in
memory only. A Redis hit backfills memory. Invalidation (`delete`,
`invalidate_prefix`, `invalidate_tags`, `clear`) reaches the other workers'
memory tiers through a Redis pub/sub channel.

A worker whose listener lost its connection is deaf: invalidations published
meanwhile never reach it. Until it has subscribed again it does not trust its
memory tier while Redis answers (reads go to Redis; a Redis miss drops the
memory copy), and once it has subscribed again it drops the memory tier, since
any entry in it may have been invalidated while it was not listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog

from .codec import (
    HTTP,
    NONE,
    RAW,
    CorruptEntry,
    Serializer,
    compressor_for,
    decode_frame,
    encode_frame,
    serializer_for,
)
from .settings import CacheConfig
from .tiers import FAULT, MemoryTier, RedisTier, make_redis_client, size_of

__all__ = ["AsyncCache"]

logger = structlog.get_logger("overdrive.cache")
_MISSING: Any = object()
_FAULTED: Any = object()  # _get_redis: Redis did not answer (as opposed to a miss)


class AsyncCache:
    """Memory tier, then Redis when a client or URL is given. No Redis fault reaches a caller.

    `redis_client=` (the seed's name), `redis=` (a client or a URL) and
    `redis_url=` are accepted. `serializer` may be an object with `code`,
    `dumps` and `loads` (the HTTP plugin passes its response format).
    """

    def __init__(
        self,
        config: CacheConfig | None = None,
        redis: Any = None,
        *,
        redis_client: Any = None,
        redis_url: str | None = None,
        serializer: Serializer | None = None,
    ) -> None:
        self.config = config if config is not None else CacheConfig()
        self.memory = MemoryTier(self.config)
        client = redis_client if redis_client is not None else redis
        if isinstance(client, str):
            redis_url, client = client, None
        owns = False
        if client is None and redis_url:
            client, owns = make_redis_client(redis_url, self.config.redis_timeout), True
        self.redis: RedisTier | None = (
            RedisTier(client, self.config, owns) if client is not None else None
        )
        self._default = serializer_for(self.config.serializer)
        self._custom = serializer
        self._compression = (
            compressor_for(self.config.compression) if self.config.enable_compression else NONE
        )
        self._prefix = self.config.namespace + ":"
        self._channel = self._prefix + "invalidate"
        self._origin = uuid.uuid4().hex
        self._flights: dict[str, asyncio.Future[Any]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        # Deaf: the invalidation listener lost its subscription (see the module doc).
        # `_epoch` counts resubscriptions: a Redis read that started before one may
        # not fill memory after it.
        self._deaf = False
        self._ever_subscribed = False
        self._epoch = 0
        self._wake: asyncio.Event | None = None
        self.resyncs = 0
        self._closed = False
        self.hits = 0
        self.memory_hits = 0
        self.misses = 0
        self.sets = 0
        self.deletes = 0
        self.loader_calls = 0
        self.coalesced = 0
        self.memory_only = 0

    # -- reading ---------------------------------------------------------------------

    def get_local(self, key: str, now: float | None = None, *, count_miss: bool = True) -> Any:
        """The memory tier's value or `None`, synchronously (hot paths use this first).

        `None` too while the invalidation listener is deaf and Redis is reachable:
        the caller then asks `get`, which reads Redis.
        """
        entry = self.memory.get(key, time.time() if now is None else now)
        if entry is not None and self._deaf and self._distrust():
            return None
        if entry is None:
            if count_miss:
                self.misses += 1
            return None
        self.hits += 1
        self.memory_hits += 1
        return entry.value

    async def get(self, key: str, default: Any = None) -> Any:
        now = time.time()
        entry = self.memory.get(key, now)
        if entry is not None and not (self._deaf and self._distrust()):
            self.hits += 1
            self.memory_hits += 1
            return entry.value
        if self.redis is not None:
            value = await self._get_redis(key, now)
            if value is not _MISSING and value is not _FAULTED:
                self.hits += 1
                return value
            if entry is not None:
                if value is _FAULTED:
                    # Redis is down: nobody can invalidate through it; serve memory.
                    self.hits += 1
                    self.memory_hits += 1
                    return entry.value
                self.memory.delete(key)  # deaf, and not in Redis: maybe invalidated
        self.misses += 1
        return default

    def _distrust(self) -> bool:
        """Deaf: True while Redis is reachable (then memory is not to be trusted); the
        listener is woken so that it subscribes now rather than after its back-off."""
        redis = self.redis
        if redis is None or not redis.available:
            return False  # Redis is down: memory is all there is, and nothing can be missed
        if self._wake is not None:
            self._wake.set()
        return True

    async def get_remote(self, key: str, default: Any = None) -> Any:
        """Redis's value (memory refilled from it), past what memory holds: for a caller
        whose memory copy is too old, when another worker may have stored a newer one."""
        if self.redis is None:
            return default
        value = await self._get_redis(key, time.time())
        return default if value is _MISSING or value is _FAULTED else value

    async def _get_redis(self, key: str, now: float) -> Any:
        redis = self.redis
        assert redis is not None
        self._ensure_listener()
        epoch = self._epoch
        raw = await redis.call(redis.client.get, self._rkey(key))
        if raw is FAULT:
            redis.misses += 1
            if redis.refused_last:  # WRONGTYPE: a bad entry, not Redis down
                redis.corrupt += 1
                logger.warning("unreadable cache entry treated as a miss", key=key[:200])
                return _MISSING
            return _FAULTED
        if self._deaf and self._wake is not None:
            self._wake.set()  # Redis answers: the listener may subscribe again now
        if raw is None:
            redis.misses += 1
            return _MISSING
        try:
            code, expires_at, payload = decode_frame(raw, self.config.max_value_bytes)
            value = self._loads(code, payload)
        except Exception as exc:
            redis.corrupt += 1
            redis.misses += 1
            logger.warning("corrupt cache entry treated as a miss", key=key[:200], error=str(exc))
            return _MISSING
        if expires_at and expires_at <= now:
            redis.misses += 1
            return _MISSING
        redis.hits += 1
        if self._deaf or epoch != self._epoch:
            return value  # read while deaf: an invalidation may follow unheard; not kept
        mem_exp = expires_at
        if self.config.memory_ttl is not None:
            cap = now + self.config.memory_ttl
            mem_exp = min(mem_exp, cap) if mem_exp else cap
        self.memory.set(key, value, mem_exp, size_of(value) if code != RAW else len(payload))
        return value

    def _loads(self, code: int, payload: bytes) -> Any:
        if code == RAW:
            return payload
        if code == HTTP:
            if self._custom is None or self._custom.code != HTTP:
                raise CorruptEntry("an HTTP response entry, but this cache has no HTTP serializer")
            return self._custom.loads(payload)
        if code == self._default.code:
            return self._default.loads(payload)
        return serializer_for("msgpack" if code == 2 else "json").loads(payload)

    # -- writing ---------------------------------------------------------------------

    async def set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        *,
        tags: Iterable[str] = (),
        compress: bool = True,
        memory: bool = True,
    ) -> bool:
        """Store `value` for `ttl` seconds (the config's `ttl` when None). True when stored."""
        ttl = self.config.ttl if ttl is None else ttl
        now = time.time()
        expires_at = now + ttl if ttl else 0.0
        tag_tuple = tuple(tags)
        payload: bytes | None
        code = RAW
        if isinstance(value, (bytes, bytearray, memoryview)):
            payload = bytes(value)
        else:
            payload = None  # stays None when no serializer can encode it: memory only
            # The custom serializer (the HTTP plugin's) first, for what it knows; then the
            # default, so that the seed's `system.cache.set(key, any_json)` reaches Redis too.
            for serializer in (self._custom, self._default):
                if serializer is None:
                    continue
                try:
                    payload = serializer.dumps(value)
                except (TypeError, ValueError, OverflowError):
                    continue
                code = serializer.code
                break

        size = len(payload) if payload is not None else size_of(value)
        if size > self.config.max_value_bytes:
            return False
        self.sets += 1
        if memory:
            mem_exp = expires_at
            if self.config.memory_ttl is not None:
                cap = now + self.config.memory_ttl
                mem_exp = min(mem_exp, cap) if mem_exp else cap
            # Memory holds the object, not its encoding: count whichever is larger.
            held = size if payload is value else max(size, size_of(value))
            self.memory.set(key, value, mem_exp, held, tag_tuple)
        if self.redis is None:
            return True
        if payload is None:
            self.memory_only += 1
            return True
        frame = encode_frame(
            payload,
            code,
            expires_at,
            compression=self._compression if compress else NONE,
            threshold=self.config.compression_threshold,
        )
        await self._set_redis(key, frame, ttl, tag_tuple)
        return True

    async def _set_redis(self, key: str, frame: bytes, ttl: float | None, tags: tuple[str, ...]):
        redis = self.redis
        assert redis is not None
        self._ensure_listener()
        rkey = self._rkey(key)
        ms = int(ttl * 1000) if ttl else None
        if not tags:
            await redis.call(redis.client.set, rkey, frame, px=ms)
            return
        pipe = redis.client.pipeline(transaction=False)
        pipe.set(rkey, frame, px=ms)
        for tag in tags:
            tkey = self._tag_key(tag)
            pipe.sadd(tkey, rkey)
            pipe.expire(tkey, max(int(ttl or 86400 * 30), 1) + 60, gt=True)
            pipe.expire(tkey, max(int(ttl or 86400 * 30), 1) + 60, nx=True)
        await redis.call(pipe.execute)

    async def get_or_set(
        self, key: str, loader: Callable[[], Any | Awaitable[Any]], ttl: float | None = None
    ) -> Any:
        """The cached value, or `loader()`'s (stored): concurrent callers share one call."""
        while True:
            value = await self.get(key, _MISSING)
            if value is not _MISSING:
                return value
            flight = self._flights.get(key)
            if flight is None:
                break
            self.coalesced += 1
            try:
                return await asyncio.shield(flight)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not flight.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The loading caller was cancelled, not us: try again (maybe as the loader).
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            self.loader_calls += 1
            value = loader()
            if inspect.isawaitable(value):
                value = await value
            await self.set(key, value, ttl)
        except asyncio.CancelledError:
            flight.cancel()
            raise
        except BaseException as exc:
            flight.set_exception(exc)
            flight.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            flight.set_result(value)
            return value
        finally:
            self._flights.pop(key, None)

    # -- invalidation ----------------------------------------------------------------

    async def delete(self, key: str) -> bool:
        return await self.invalidate([key]) > 0

    async def invalidate(self, keys: Iterable[str]) -> int:
        """Delete `keys` here, in Redis and in the other workers' memory."""
        keys = list(keys)
        count = sum(self.memory.delete(k) for k in keys)
        self.deletes += len(keys)
        if self.redis is not None and keys:
            n = await self.redis.call(self.redis.client.delete, *(self._rkey(k) for k in keys))
            count = max(count, n if isinstance(n, int) else 0)
            await self._publish({"k": keys})
        return count

    async def invalidate_stored(self, keys: Iterable[str]) -> int:
        """`invalidate`, telling the other workers only when Redis held one of `keys`:
        for callers that invalidate on every request of a kind (unsafe methods), so that
        the workers are not sent a message per request for keys that were never stored."""
        keys = list(keys)
        count = sum(self.memory.delete(k) for k in keys)
        self.deletes += len(keys)
        if self.redis is not None and keys:
            n = await self.redis.call(self.redis.client.delete, *(self._rkey(k) for k in keys))
            if isinstance(n, int) and n > 0:
                count = max(count, n)
                await self._publish({"k": keys})
        return count

    async def invalidate_prefix(self, prefix: str) -> int:
        """Delete every key that starts with `prefix`, everywhere."""
        count = self.memory.delete_prefix(prefix)
        if self.redis is not None:
            pattern = self._rkey(_glob_escape(prefix)) + b"*"
            count = max(count, await self._scan_delete(pattern))
            await self._publish({"p": prefix})
        return count

    async def invalidate_tags(self, tags: Iterable[str]) -> int:
        """Delete every entry stored with one of `tags`, everywhere."""
        tags = list(tags)
        count = self.memory.delete_tags(tags)
        redis = self.redis
        keys: list[str] = []
        if redis is not None and tags:
            for tag in tags:
                tkey = self._tag_key(tag)
                members = await redis.call(redis.client.smembers, tkey)
                if members is FAULT:
                    continue
                n = await redis.call(redis.client.delete, *members, tkey)
                if isinstance(n, int):
                    count = max(count, n - 1)
                # Other workers may hold these keys without their tags (backfilled from Redis).
                cut = len(self._prefix) + 2
                keys.extend(m.decode("utf-8", "surrogatepass")[cut:] for m in members)
            await self._publish({"t": tags, "k": keys})
        return count

    async def clear(self) -> None:
        """Empty the memory tier and this namespace in Redis (other workers' memory too)."""
        self.memory.clear()
        if self.redis is not None:
            pattern = _glob_escape(self._prefix).encode("utf-8", "surrogatepass") + b"*"
            await self._scan_delete(pattern)
            await self._publish({"c": 1})

    async def _scan_delete(self, pattern: bytes) -> int:
        from overdrive.plugins.redisconn import scan_pages

        redis = self.redis
        assert redis is not None
        count = 0
        # one cursor per master on a Redis Cluster (a node's cursor means nothing to
        # another node), one page per command so each stays under redis_timeout
        for page in scan_pages(redis.client):
            cursor = 0
            while True:
                result = await redis.call(page, cursor, match=pattern, count=1000)
                if result is FAULT:
                    return count
                cursor, keys = result
                if keys:
                    n = await redis.call(redis.client.delete, *keys)
                    count += n if isinstance(n, int) else 0
                if not cursor:
                    break
        return count

    # -- other workers ----------------------------------------------------------------

    async def _publish(self, message: dict[str, Any]) -> None:
        if self.redis is None or not self.config.invalidation_channel:
            return
        message["o"] = self._origin
        await self.redis.call(self.redis.client.publish, self._channel, json.dumps(message))

    def _apply(self, data: bytes | str) -> None:
        try:
            message = json.loads(data)
            if not isinstance(message, dict) or message.get("o") == self._origin:
                return
            for key in message.get("k", ()):
                self.memory.delete(str(key))
            if isinstance(message.get("p"), str):
                self.memory.delete_prefix(message["p"])
            if isinstance(message.get("t"), list):
                self.memory.delete_tags(str(t) for t in message["t"])
            if message.get("c"):
                self.memory.clear()
        except (ValueError, TypeError, AttributeError):
            logger.warning("ignored a malformed invalidation message")

    def _on_subscribed(self) -> None:
        if self.redis is not None:
            self.redis.back()  # reachable: reads need not wait out their back-off
        if self._deaf or self._ever_subscribed:
            # Whatever memory holds may have been invalidated while we were not listening.
            self.memory.clear()
            self.resyncs += 1
            logger.info("invalidation listener back: memory tier dropped", resyncs=self.resyncs)
        self._epoch += 1
        self._deaf = False
        self._ever_subscribed = True
        self._subscribed.set()

    def _ensure_listener(self) -> None:
        if (
            self._listener is None
            and not self._closed
            and self.redis is not None
            and self.config.invalidation_channel
        ):
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        redis = self.redis
        assert redis is not None
        self._wake = wake = asyncio.Event()
        # `_closed` as well as cancellation: redis-py may swallow a cancel while connecting.
        while not self._closed:
            pubsub = None
            try:
                pubsub = redis.client.pubsub()
                await pubsub.subscribe(self._channel)
                while not self._closed:
                    message = await pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    kind = message.get("type")
                    if kind == "message":
                        self._apply(message["data"])
                    elif kind == "subscribe":
                        # Confirmed: every invalidation published from now on reaches us.
                        # (Also after a reconnect redis-py made by itself, re-subscribing.)
                        self._on_subscribed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._deaf:
                    logger.warning(
                        "invalidation listener lost: memory tier not trusted until it is back",
                        error=str(exc)[:300],
                    )
                self._deaf = True
                # Try again every `redis_retry_after` (no doubling: while deaf, the sooner
                # we hear again the sooner memory is trusted), or at once when a Redis
                # command succeeds.
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.redis_retry_after):
                        await wake.wait()
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.config.redis_timeout):
                            await pubsub.aclose()

    # -- lifecycle and figures -----------------------------------------------------------

    async def start(self) -> None:
        """Start the invalidation listener (also started lazily at the first Redis use)."""
        self._closed = False
        self._ensure_listener()
        if self._listener is not None:
            try:  # so that an invalidation published right after start() is seen
                async with asyncio.timeout(max(self.config.redis_timeout * 4, 1.0)):
                    await self._subscribed.wait()
            except TimeoutError:
                pass  # Redis is down: the listener keeps trying by itself

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=2.0)
            self._listener = None
        if self.redis is not None:
            await self.redis.close()

    def get_stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        mem = self.memory
        stats: dict[str, Any] = {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else 0.0,
            "sets": self.sets,
            "deletes": self.deletes,
            "loader_calls": self.loader_calls,
            "coalesced": self.coalesced,
            "memory": {
                "hits": self.memory_hits,
                "hit_rate": self.memory_hits / lookups if lookups else 0.0,
                "entries": len(mem),
                "bytes": mem.bytes,
                "evictions": mem.evictions,
                "expired": mem.expired,
                "max_size": self.config.max_size,
                "max_bytes": self.config.max_bytes,
                "policy": self.config.eviction_policy,
            },
            "errors": self.redis.errors if self.redis is not None else 0,
        }
        if self.redis is not None and self.config.invalidation_channel:
            stats["invalidation_listener"] = {"listening": not self._deaf, "resyncs": self.resyncs}
        if self.redis is not None:
            stats["redis"] = self.redis.stats()
            stats["redis"]["memory_only_values"] = self.memory_only
        return stats

    def _rkey(self, key: str) -> bytes:
        return (self._prefix + "v:" + key).encode("utf-8", "surrogatepass")

    def _tag_key(self, tag: str) -> bytes:
        return (self._prefix + "t:" + tag).encode("utf-8", "surrogatepass")


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so a prefix matches literally."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
