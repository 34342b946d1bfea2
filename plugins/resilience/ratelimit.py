"""The `ratelimit` plugin and its `RateLimiter`: per-client limits on the `limits` library.

`limits` is the well-kept library for this (it is what slowapi and
Flask-Limiter run on): its memory storage by default (sync, no await, a few
microseconds a hit), its Redis storage so that several workers share counts.
What it lacks, and this module adds: a fallback to local memory counts when
Redis is unreachable (requests keep flowing; stats say so), and the answer:
429 with ``Retry-After`` and the ``RateLimit-*`` headers (IETF httpapi draft).

The client key is the client address, or a header such as an API key
(``key = "header:x-api-key"``, the address when the header is missing). Each
route rule may set its own `limit` (a bucket per rule) and a `cost`: a
generation may cost 10 hits where a thumbnail costs 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from time import monotonic
from typing import Any, Literal

import limits
import limits.aio.strategies
import limits.strategies
from limits.aio.storage import RedisStorage
from limits.storage import MemoryStorage

from overdrive import Plugin, hookimpl
from overdrive.errors import ConfigError
from overdrive.metrics import MetricFamily as F
from overdrive.plugins.redisconn import is_pool_wait
from overdrive.redact import redact_url

from .common import REJECTED, reject, route_name

__all__ = ["RateLimitPlugin", "RateLimitSettings", "RateLimiter"]

log = logging.getLogger("overdrive.plugins.ratelimit")

Strategy = Literal["fixed-window", "moving-window", "sliding-window-counter"]
_SYNC: dict[str, Any] = {
    "fixed-window": limits.strategies.FixedWindowRateLimiter,
    "moving-window": limits.strategies.MovingWindowRateLimiter,
    "sliding-window-counter": limits.strategies.SlidingWindowCounterRateLimiter,
}
_ASYNC: dict[str, Any] = {
    "fixed-window": limits.aio.strategies.FixedWindowRateLimiter,
    "moving-window": limits.aio.strategies.MovingWindowRateLimiter,
    "sliding-window-counter": limits.aio.strategies.SlidingWindowCounterRateLimiter,
}


def parse_limits(text: str, key: str) -> list[limits.RateLimitItem]:
    try:
        items = limits.parse_many(text)
    except ValueError:
        items = []
    if not items:
        raise ConfigError(
            f"{key}: expected a limit such as '100/minute' or '10/second;500/hour', got {text!r}"
        )
    return items


class RateLimiter:
    """Hits against one or more limits per (bucket, client key), locally or in Redis.

    `hit` never raises for a storage fault: it counts locally instead and
    `fallback` says so until Redis answers again.
    """

    def __init__(
        self,
        strategy: Strategy = "fixed-window",
        storage_url: str | None = None,
        *,
        key_prefix: str = "overdrive:ratelimit",
        retry_interval: float = 5.0,
    ) -> None:
        self.strategy = strategy
        self.local = _SYNC[strategy](MemoryStorage())
        self.remote: Any = None
        self._pool: Any = None
        self.storage_url = storage_url
        self.key_prefix = key_prefix
        self.retry_interval = retry_interval
        self._down_until = 0.0
        self._outage = False  # warned about the current outage
        self.errors = 0
        self.pool_waits = 0  # hits counted locally because every connection was busy
        self.last_error = ""
        self._url: str | None = None
        if storage_url and not storage_url.startswith("memory://"):
            from overdrive.plugins.redisconn import redis_client

            self._url = storage_url.removeprefix("async+")
            redis_client(self._url)  # a bad URL stops startup (ValueError) before any use
            self.remote = True  # the storage itself is made in the loop that uses it

    def _connect(self) -> Any:
        from overdrive.plugins.redisconn import shared_client

        # The process's shared pool (the breakers' too): sized, and a burst waits for a
        # connection instead of failing and counting locally (a burst of 200 on
        # redis-py's 100-connection pool let 200 of 100 through). The command timeout
        # bounds a hung Redis; the connect timeout is generous, as a cold burst opens
        # connections on a busy loop.
        assert self._url is not None
        self._pool = shared_client(self._url, **REDIS_OPTIONS)
        self.remote = _ASYNC[self.strategy](_ClientStorage(self._pool, self.key_prefix))
        return self.remote

    @property
    def fallback(self) -> bool:
        return self.remote is not None and monotonic() < self._down_until

    async def hit(
        self, items: list[limits.RateLimitItem], bucket: str, key: str, cost: int = 1
    ) -> tuple[bool, limits.RateLimitItem, int, float]:
        """(allowed, the limit that decided, remaining, reset epoch seconds)."""
        remote = self.remote
        if remote is not None and monotonic() >= self._down_until:
            if remote is True:
                remote = self._connect()
            try:
                result = await self._remote_hit(remote, items, bucket, key, cost)
            except Exception as exc:  # Redis down or slow: count locally for a while
                if is_pool_wait(exc):  # every connection busy: not Redis failing
                    self.pool_waits += 1
                    return await self._local_hit(items, bucket, key, cost)
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                self._down_until = monotonic() + self.retry_interval
                if not self._outage:  # once per outage, not once per request
                    self._outage = True
                    log.warning(
                        "ratelimit: Redis at %s failed (%s); counting per process until "
                        "it answers again (each worker then allows the full limit)",
                        redact_url(self.storage_url or ""),
                        self.last_error,
                    )
            else:
                if self._outage:
                    self._outage = False
                    log.warning("ratelimit: Redis answers again; counts are shared again")
                return result
        return await self._local_hit(items, bucket, key, cost)

    async def _local_hit(
        self, items: list[limits.RateLimitItem], bucket: str, key: str, cost: int
    ) -> tuple[bool, limits.RateLimitItem, int, float]:
        local = self.local
        if self.strategy == "fixed-window":
            return _fixed(local.storage, items, bucket, key, cost)
        for item in items:
            if not local.hit(item, bucket, key, cost=cost):
                return False, item, 0, local.get_window_stats(item, bucket, key).reset_time
        stats = local.get_window_stats(items[0], bucket, key)
        return True, items[0], stats.remaining, stats.reset_time

    async def _remote_hit(
        self, remote: Any, items: list[limits.RateLimitItem], bucket: str, key: str, cost: int
    ) -> tuple[bool, limits.RateLimitItem, int, float]:
        if self.strategy == "fixed-window":
            return await _fixed_async(remote.storage, items, bucket, key, cost)
        for item in items:
            if not await remote.hit(item, bucket, key, cost=cost):
                stats = await remote.get_window_stats(item, bucket, key)
                return False, item, 0, stats.reset_time
        stats = await remote.get_window_stats(items[0], bucket, key)
        return True, items[0], stats.remaining, stats.reset_time

    async def close(self) -> None:
        client, self._pool = self._pool, None
        if client is not None:
            from overdrive.plugins.redisconn import release_shared

            with contextlib.suppress(Exception):
                await release_shared(client)

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "memory"
            if self.remote is None
            else ("local-fallback" if self.fallback else "redis"),
            "storage_errors": self.errors,
            "pool_waits": self.pool_waits,
            "last_error": self.last_error,
        }


# The shared client of the rate limiter and the breakers (overdrive.plugins.redisconn).
REDIS_OPTIONS: dict[str, Any] = {
    "max_connections": 32,
    "pool_timeout": 2.0,
    "socket_timeout": 0.5,
    "connect_timeout": 2.0,
}


class _ClientStorage(RedisStorage):
    """limits' async Redis storage on a client of ours (any of redisconn's: Redis,
    Cluster, Sentinel), instead of one it would build from a URL itself."""

    def __init__(self, client: Any, key_prefix: str) -> None:
        self._od_client = client
        super().__init__("async+redis://", implementation="redispy", key_prefix=key_prefix)

    def configure_bridge(self) -> None:
        bridge: Any = self.bridge
        bridge.storage = self._od_client
        bridge.connection_getter = lambda _readonly: self._od_client


# A fixed window through the storage's public `incr`: one call gives both the verdict and
# the remaining count (the strategy's `hit` + `get_window_stats` would take two).
def _fixed(storage: Any, items: list[Any], bucket: str, key: str, cost: int) -> Any:
    first = None
    for item in items:
        k = item.key_for(bucket, key)
        count = storage.incr(k, item.get_expiry(), amount=cost)
        if count > item.amount:
            return False, item, 0, storage.get_expiry(k)
        if first is None:
            first = (item, item.amount - count, k)
    assert first is not None
    return True, first[0], first[1], storage.get_expiry(first[2])


async def _fixed_async(storage: Any, items: list[Any], bucket: str, key: str, cost: int) -> Any:
    first = None
    for item in items:
        k = item.key_for(bucket, key)
        count = await storage.incr(k, item.get_expiry(), amount=cost)
        if count > item.amount:
            return False, item, 0, await storage.get_expiry(k)
        if first is None:
            first = (item, item.amount - count, k)
    assert first is not None
    return True, first[0], first[1], await storage.get_expiry(first[2])


@dataclass
class RateLimitSettings:
    limit: str = "100/minute"
    strategy: Strategy = "fixed-window"
    key: str = "address"
    cost: int = 1
    storage_url: str | None = None
    key_prefix: str = "overdrive:ratelimit"
    redis_retry_interval: float = 5.0
    headers: bool = True
    enabled: bool = True
    name: str | None = None

    def __post_init__(self) -> None:
        parse_limits(self.limit, "ratelimit.limit")
        if self.cost < 1:
            raise ConfigError(f"ratelimit.cost: expected >= 1, got {self.cost!r}")
        if self.key != "address" and not (
            self.key.startswith("header:") and len(self.key) > len("header:")
        ):
            raise ConfigError(
                f"ratelimit.key: expected 'address' or 'header:<name>', got {self.key!r}"
            )
        if not self.redis_retry_interval > 0:
            raise ConfigError(
                f"ratelimit.redis_retry_interval: expected > 0, got {self.redis_retry_interval!r}"
            )


class RateLimitPlugin(Plugin):
    name = "ratelimit"
    metric_families = (
        F(
            "ratelimit_requests",
            "counter",
            "Requests the limiter decided on, by decision",
            "(allowed|limited)",
            labels=("decision",),
        ),
        F(
            "ratelimit_storage_errors",
            "counter",
            "Limiter storage errors (the limiter failed open)",
            "storage_errors",
        ),
    )
    Settings = RateLimitSettings

    def __init__(self, settings: RateLimitSettings | None = None) -> None:
        super().__init__(settings)
        self.limiter: RateLimiter | None = None
        self._by_policy: dict[Any, tuple[list[limits.RateLimitItem], str, str | None] | None] = {}
        self._parsed: dict[str, list[limits.RateLimitItem]] = {}
        self.allowed = 0
        self.limited = 0

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: RateLimitSettings = self.settings
        url = s.storage_url
        if url == "redis" or url == "host":  # use the host's redis_url
            url = getattr(host, "redis_url", None)
            if not url:
                raise ConfigError(
                    f"ratelimit.storage_url: {s.storage_url!r} needs a host redis_url"
                )
        try:
            self.limiter = RateLimiter(
                s.strategy, url, key_prefix=s.key_prefix, retry_interval=s.redis_retry_interval
            )
        except ValueError as exc:  # a URL scheme redisconn does not know
            raise ConfigError(f"ratelimit.storage_url: {exc}") from None

    def _route(self, ctx: Any, s: RateLimitSettings) -> Any:
        entry = None
        if s.enabled:
            items = self._parsed.get(s.limit)
            if items is None:
                items = self._parsed[s.limit] = parse_limits(s.limit, "ratelimit.limit")
            bucket = s.name or route_name(ctx.policy, self.name) or "global"
            header = s.key[len("header:") :].lower() if s.key.startswith("header:") else None
            entry = (items, bucket, header)
        if len(self._by_policy) > 4096:
            self._by_policy.clear()
        self._by_policy[ctx.policy] = entry
        return entry

    @hookimpl
    async def before_request(self, ctx: Any) -> Any:
        if ctx.internal:
            return None  # a prefetch the framework made: not a client's request
        s: RateLimitSettings = ctx.settings(self.name)
        try:
            entry = self._by_policy[ctx.policy]
        except KeyError:
            entry = self._route(ctx, s)
        if entry is None or self.limiter is None:
            return None
        items, bucket, header = entry
        key = ctx.headers.get(header) if header is not None else None
        if not key:
            client = ctx.scope.get("client")
            key = client[0] if client else "unknown"
        allowed, item, remaining, reset_at = await self.limiter.hit(items, bucket, key, s.cost)
        reset = max(0, math.ceil(reset_at - time.time()))
        if allowed:
            self.allowed += 1
            if s.headers:
                ctx.state[self.name] = (item, remaining, reset)
            return None
        self.limited += 1
        ctx.state[REJECTED] = self.name
        return reject(429, "Too Many Requests", max(1, reset), _headers(item, 0, reset))

    @hookimpl
    def on_response_start(self, ctx: Any, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        state = ctx._state
        entry = state.get(self.name) if state else None
        if entry is not None:
            headers.extend(_headers(*entry))

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        if self.limiter is not None:
            await self.limiter.close()

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"allowed": self.allowed, "limited": self.limited}
        if self.limiter is not None:
            out.update(self.limiter.stats())
        return out


_HEAD_CACHE: dict[int, tuple[Any, bytes, bytes]] = {}


def _headers(item: limits.RateLimitItem, remaining: int, reset: int) -> list[tuple[bytes, bytes]]:
    cached = _HEAD_CACHE.get(id(item))
    if cached is None or cached[0] is not item:
        amount = item.amount
        cached = (item, str(amount).encode(), f"{amount};w={item.get_expiry()}".encode())
        if len(_HEAD_CACHE) > 1024:
            _HEAD_CACHE.clear()
        _HEAD_CACHE[id(item)] = cached
    return [
        (b"ratelimit-limit", cached[1]),
        (b"ratelimit-remaining", b"%d" % (remaining if remaining > 0 else 0)),
        (b"ratelimit-reset", b"%d" % reset),
        (b"ratelimit-policy", cached[2]),
    ]
