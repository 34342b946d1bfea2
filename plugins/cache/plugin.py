"""The `cache` plugin: an RFC 9111 shared HTTP cache in front of the app, on `AsyncCache`.

A hit is answered in `cache_lookup`, before the app (or FastAPI) is entered.
A miss captures the body while it streams (`ctx.capture_response`), becomes
the leader of a single flight for its key, and `cache_store` keeps the
response if RFC 9111 allows it. See docs/plugins/cache.md for the rules.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from typing import Any

import structlog

from overdrive import hookimpl
from overdrive.context import CapturedResponse, RequestContext
from overdrive.metrics import MetricFamily as F
from overdrive.plugin import Plugin
from overdrive.redact import plain_traceback

from .asynccache import AsyncCache
from .flight import Flight, FollowerAnswer
from .http import HTTPSerializer, StoredResponse, VaryIndex, answer, vary_suffix
from .invalidation import invalidation_keys
from .settings import CacheConfig, CacheSettings
from .store import UNKEYED_KIND, Route, build_stored, duplicated, revalidate
from .validate import Revalidation, conditional_headers

__all__ = ["CachePlugin", "tag_response"]

logger = structlog.get_logger("overdrive.cache")

HIT, MISS, STALE, BYPASS = "HIT", "MISS", "STALE", "BYPASS"
_X_CACHE = {s: (b"x-cache", s.encode()) for s in (HIT, MISS, STALE, BYPASS)}
# Kinds of request header, as `Route.read` maps them (store._READ_BASE).
#: RFC 9110 9.2.1: the methods that do not change the resource (GET, HEAD looked up).
_SAFE = frozenset({"OPTIONS", "TRACE"})
_AUTH, _COOKIE, _CC, _PRAGMA, _INM, _IMS, _RANGE, _IF_RANGE, _HOST = range(9)


# Release the single-flight lock only if it is still ours (it may have expired and moved on).
_UNLOCK = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
# Extend the lock's lease only if it is still ours; 0 when another worker holds it now.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)


def tag_response(ctx: RequestContext, *tags: str) -> None:
    """Give the response being produced cache tags (for `invalidate_tags`)."""
    ctx.state.setdefault("cache_tags", set()).update(tags)


class _Miss:
    """What a leading miss carries from cache_lookup to cache_store/after_request."""

    __slots__ = ("flight", "key", "lock", "request_time", "route", "stale", "token")

    def __init__(self, key: str, route: Route, flight: Flight | None, stale: Any) -> None:
        self.key = key
        self.route = route
        self.flight = flight
        self.stale = stale
        self.lock: bytes | None = None
        self.token = b""
        self.request_time: float | None = None


class CachePlugin(Plugin):
    """HTTP response cache; `host.cache` is its `AsyncCache` (the seed's ``system.cache``)."""

    name = "cache"
    metric_families = (
        F(
            "cache_lookups",
            "counter",
            "AsyncCache lookups, by result",
            "(hits=hit|misses=miss)",
            labels=("result",),
        ),
        F("cache_stores", "counter", "Values stored in the cache", "sets"),
        F("cache_deletes", "counter", "Values deleted from the cache", "deletes"),
        F("cache_loader_calls", "counter", "Loader calls on a miss (get_or_set)", "loader_calls"),
        F(
            "cache_coalesced_lookups",
            "counter",
            "Misses that waited for another caller's load",
            "coalesced",
        ),
        F("cache_errors", "counter", "Cache backend errors (answered as misses)", "errors"),
        F("cache_memory_hits", "counter", "Lookups answered by the in-memory tier", "memory.hits"),
        F("cache_memory_entries", "gauge", "Entries in the in-memory tier", "memory.entries"),
        F(
            "cache_memory_size_bytes",
            "gauge",
            "Bytes held by the in-memory tier",
            "memory.bytes",
            unit="bytes",
        ),
        F(
            "cache_memory_max_entries",
            "gauge",
            "Entries the in-memory tier may hold",
            "memory.max_size",
        ),
        F(
            "cache_memory_max_bytes",
            "gauge",
            "Bytes the in-memory tier may hold",
            "memory.max_bytes",
            unit="bytes",
        ),
        F(
            "cache_memory_evictions",
            "counter",
            "Entries evicted from the in-memory tier",
            "memory.evictions",
        ),
        F(
            "cache_memory_expirations",
            "counter",
            "Entries dropped from the in-memory tier at expiry",
            "memory.expired",
        ),
        F(
            "cache_redis_lookups",
            "counter",
            "Redis tier lookups, by result",
            "redis.(hits=hit|misses=miss)",
            labels=("result",),
        ),
        F(
            "cache_redis_errors",
            "counter",
            "Redis tier errors (answered from memory or as misses)",
            "redis.errors",
        ),
        F(
            "cache_redis_corrupt_entries",
            "counter",
            "Redis entries that failed to decode (treated as misses)",
            "redis.corrupt",
        ),
        F("cache_redis_available", "gauge", "1 while the Redis tier answers", "redis.available"),
        F(
            "cache_http_lookups",
            "counter",
            "HTTP response cache decisions, by result",
            "http.(HIT|MISS|STALE|BYPASS)",
            labels=("result",),
        ),
        F("cache_http_stores", "counter", "Responses stored", "http.stored"),
        F(
            "cache_http_refused_stores",
            "counter",
            "Responses not stored (private, too large, no-store)",
            "http.not_stored",
        ),
        F(
            "cache_http_collapsed_requests",
            "counter",
            "Requests that waited for another request's fill",
            "http.collapsed",
        ),
        F(
            "cache_http_revalidations",
            "counter",
            "Background revalidations started",
            "http.revalidations",
        ),
        F(
            "cache_http_not_modified_responses",
            "counter",
            "304 answers from the cache",
            "http.not_modified",
        ),
        F(
            "cache_http_partial_responses",
            "counter",
            "Range answers from the cache",
            "http.partial",
        ),
        F(
            "cache_http_fills_in_flight",
            "gauge",
            "Responses being filled now",
            "http.in_flight",
            multiprocess_mode="livesum",
        ),
    )
    Settings = CacheSettings
    provides = {"cache": "cache"}  # noqa: RUF012

    def __init__(self, settings: CacheSettings | None = None) -> None:
        super().__init__(settings)
        self.cache: AsyncCache | None = None
        self.host: Any = None
        self._routes: dict[int, Route] = {}
        self._flights: dict[str, Flight] = {}
        self._refreshing: set[str] = set()
        # Hit-for-miss (Varnish's name): keys whose last response could not be shared,
        # -> until when (monotonic). Their misses go to the app at once, uncollapsed.
        self._uncacheable: OrderedDict[str, float] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        # Cross-worker locks this worker holds: lock key -> (token, renew until, lease).
        self._held: dict[bytes, tuple[bytes, float, float]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self.counts = dict.fromkeys((HIT, MISS, STALE, BYPASS, "stored", "not_stored"), 0)
        self.counts.update(collapsed=0, revalidations=0, not_modified=0, partial=0, hit_for_miss=0)
        # conditional requests sent to the app for stale entries, the 304s they got, and
        # unsafe requests (POST, PUT, DELETE...) that invalidated stored responses
        self.counts.update(validations=0, not_modified_upstream=0, invalidations=0)

    # -- lifecycle ----------------------------------------------------------------

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: CacheSettings = self.settings or CacheSettings()
        self.settings = s
        self.host = host
        config = CacheConfig(
            ttl=None,
            max_size=s.max_entries,
            max_bytes=s.max_bytes,
            enable_compression=s.compression,
            eviction_policy=s.eviction_policy,
            namespace=s.namespace,
            redis_timeout=s.redis_timeout,
            memory_ttl=s.memory_ttl,
            max_value_bytes=max(s.max_entry_bytes * 2, 1 << 20),
        )
        url = s.redis_url or getattr(host, "redis_url", None)
        client = None if url else host.state.get("redis_client")  # the seed's redis_client=
        self.cache = AsyncCache(
            config, redis_client=client, redis_url=url, serializer=HTTPSerializer()
        )

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        if self.cache is not None:
            await self.cache.start()

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cache is not None:
            await self.cache.close()

    def _route(self, s: CacheSettings) -> Route:
        route = self._routes.get(id(s))
        if route is None or route.settings is not s:
            route = self._routes[id(s)] = Route(s)
        return route

    # -- a request's life ---------------------------------------------------------

    @hookimpl
    async def cache_lookup(self, ctx: RequestContext) -> Any:
        method = ctx.method
        if method != "GET" and method != "HEAD":
            if method not in _SAFE and self.cache is not None and self.cache.redis is not None:
                await self._invalidate_target(ctx)
            return None
        s = ctx.settings("cache") or self.settings
        if not s.enabled:
            return None
        route = self._route(s)
        read = route.read
        auth = cookie = unkeyed = False
        cc = pragma = inm = ims = rng = if_range = None
        host = b""
        seen = repeated = 0
        for name, value in ctx.raw_headers:
            kind = read.get(name)
            if kind is None:
                continue
            bit = 1 << kind
            repeated |= seen & bit
            seen |= bit
            if kind == _HOST:
                host = value
            elif kind == _AUTH:
                auth = True
            elif kind == _COOKIE:
                cookie = True
            elif kind == _CC:
                cc = value
            elif kind == _PRAGMA:
                pragma = value
            elif kind == _INM:
                inm = value
            elif kind == _IMS:
                ims = value
            elif kind == _RANGE:
                rng = value
            elif kind == _IF_RANGE:
                if_range = value
            elif kind == UNKEYED_KIND:
                unkeyed = True
        if unkeyed or repeated or (auth and not route.by_auth) or (cookie and not route.by_cookie):
            # `repeated`: a header the key or this lookup reads came twice (two Host
            # lines: the key would use one, Starlette builds URLs from the other).
            ctx.cache_status = BYPASS
            self.counts[BYPASS] += 1
            return None
        no_cache = False
        max_age = None
        if cc is not None or pragma is not None:
            req = route.request_directives(cc, pragma)
            if "no-store" in req:
                ctx.cache_status = BYPASS
                self.counts[BYPASS] += 1
                return None
            no_cache = "no-cache" in req
            max_age = req.get("max-age")
        key = route.key(ctx, host)
        cache = self.cache
        assert cache is not None
        now = time.time()
        stale = None
        conditions = (inm, ims, rng, if_range)
        use_stored = not no_cache and max_age != 0
        if use_stored:
            stored = self._find_local(key, ctx, now)
            if stored is not None:
                hit = self._serve(ctx, key, route, stored, now, max_age, conditions)
                if hit is not None:
                    return hit
                stale = stored
        # Not in memory: join a request already producing this response, or lead one;
        # neither for a key whose last response could not be shared (hit-for-miss).
        uncacheable = False
        if self._uncacheable:
            until = self._uncacheable.get(key)
            if until is not None:
                if time.monotonic() < until:
                    uncacheable = True
                    self.counts["hit_for_miss"] += 1
                else:
                    del self._uncacheable[key]
        flight = None if uncacheable else self._flights.get(key)
        if flight is not None and use_stored and flight.joinable:
            self.counts["collapsed"] += 1
            cursor = await flight.wait_start(s.wait_timeout)
            if cursor is not None:
                if self._same_variant(flight, ctx):
                    ctx.cache_status = HIT
                    self.counts[HIT] += 1
                    headers = list(flight.headers)  # client_headers applied, Age added
                    return FollowerAnswer(flight, cursor, headers, method == "HEAD")
                flight.abandon(cursor)
            now = time.time()
            found = self._find_local(key, ctx, now)
            if found is not None:
                hit = self._serve(ctx, key, route, found, now, max_age, conditions)
                if hit is not None:
                    return hit
        miss = _Miss(key, route, None, stale)
        if method == "GET" and not uncacheable and key not in self._flights:
            miss.flight = self._flights[key] = Flight(s.max_entry_bytes, ctx)
        try:
            if cache.redis is not None and use_stored:
                # Also when memory's copy is stale: another worker may have renewed it.
                found = await self._find_remote(key, ctx, past_memory=stale is not None)
                if found is not None:
                    now = time.time()
                    hit = self._serve(ctx, key, route, found, now, max_age, conditions)
                    if hit is not None:
                        self._end_flight(miss, failed=False)
                        return hit
                    miss.stale = found
            if miss.stale is not None and method == "GET" and conditional_headers(miss.stale):
                # Stale but with the app's validator: ask the app whether it changed
                # (RFC 9111 4.3.1) rather than for the whole response again.
                self._end_flight(miss, failed=True)
                ctx.cache_status = MISS
                self.counts[MISS] += 1
                return Revalidation(self, ctx, key, route, miss.stale, conditions)
            if miss.flight is not None and cache.redis is not None and cache.redis.available:
                found = await self._cross_worker(miss, ctx, s)
                if found is not None:
                    self._end_flight(miss, failed=False)
                    return self._serve(ctx, key, route, found, time.time(), None, conditions)
        except BaseException:
            self._end_flight(miss, failed=True)
            raise
        ctx.cache_status = MISS
        self.counts[MISS] += 1
        if method == "HEAD":
            return None  # a HEAD response has no body to store
        miss.request_time = now
        ctx.state["cache"] = miss
        if miss.flight is not None:
            ctx.observe_body(miss.flight.feed)
            ctx.keeper = miss.flight  # followers read this response: outlive our client
        ctx.capture_response(s.max_entry_bytes)
        return None

    def _serve(
        self,
        ctx: RequestContext,
        key: str,
        route: Route,
        stored: StoredResponse,
        now: float,
        max_age: int | None,
        conditions: tuple[bytes | None, ...],
    ) -> Any:
        """A HIT or a STALE answer (starting a background refresh), or None: too old."""
        age = stored.age(now)
        if age < stored.fresh_for and (max_age is None or age <= max_age):
            return self._answer(ctx, HIT, stored, age, *conditions)
        if age < stored.fresh_for + stored.stale_while_revalidate and max_age is None:
            self._revalidate(key, ctx, route)
            return self._answer(ctx, STALE, stored, age, *conditions)
        return None

    def _find_local(self, key: str, ctx: RequestContext, now: float) -> StoredResponse | None:
        cache = self.cache
        assert cache is not None
        remote = cache.redis is not None
        value = cache.get_local(key, now, count_miss=not remote)
        if type(value) is VaryIndex:
            if duplicated(ctx.raw_headers, value.names):
                return None  # a repeated Vary header: its joined value is not what apps read
            value = cache.get_local(key + vary_suffix(value.names, ctx.headers), now)
        return value if type(value) is StoredResponse else None

    async def _find_remote(
        self, key: str, ctx: RequestContext, *, past_memory: bool = False
    ) -> StoredResponse | None:
        cache = self.cache
        assert cache is not None
        get = cache.get_remote if past_memory else cache.get
        value = await get(key)
        if type(value) is VaryIndex:
            if duplicated(ctx.raw_headers, value.names):
                return None
            value = await get(key + vary_suffix(value.names, ctx.headers))
        return value if type(value) is StoredResponse else None

    def _answer(
        self, ctx: RequestContext, status: str, stored: StoredResponse, age: float, *conditions: Any
    ) -> Any:
        ctx.cache_status = status
        self.counts[status] += 1
        inm, ims, rng, if_range = (
            c.decode("latin-1") if c is not None else None for c in conditions
        )
        result = answer(stored, age, ctx.method == "HEAD", inm, ims, rng, if_range)
        if result.status == 304:
            self.counts["not_modified"] += 1
        elif result.status == 206:
            self.counts["partial"] += 1
        return result

    def _same_variant(self, flight: Flight, ctx: RequestContext) -> bool:
        names = self._route(ctx.settings("cache") or self.settings).vary_of(flight.headers)
        if names is None or duplicated(ctx.raw_headers, names):
            return False
        if duplicated(flight.request.raw_headers, names):
            return False
        theirs, ours = flight.request.headers, ctx.headers
        return all(theirs.get(n) == ours.get(n) for n in names)

    async def _cross_worker(
        self, miss: _Miss, ctx: RequestContext, s: CacheSettings
    ) -> StoredResponse | None:
        """Take the Redis lock for the key, or wait for the worker that holds it."""
        cache = self.cache
        assert cache is not None and cache.redis is not None
        redis = cache.redis
        lock_key = cache._rkey("lock:" + miss.key)
        token = uuid.uuid4().hex.encode()
        deadline = time.monotonic() + s.wait_timeout
        delay = 0.01
        waited = False
        while True:
            # A short lease, renewed while we lead (`_renew`): if this process dies, the
            # lock lapses within a lease and exactly one waiter's SET NX takes over.
            got = await redis.call(
                redis.client.set, lock_key, token, nx=True, px=int(s.lock_lease * 1000)
            )
            if got is not None:  # True, or FAULT: Redis is down, lead locally
                if got is True:
                    miss.lock, miss.token = lock_key, token
                    self._hold(lock_key, token, s)
                    if waited:  # the holder stores before it unlocks: look once more
                        found = await self._find_remote(miss.key, ctx)
                        if found is not None and found.age(time.time()) < found.fresh_for:
                            await self._unlock(miss)
                            return found
                return None
            waited = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
            found = await self._find_remote(miss.key, ctx)
            if found is not None and found.age(time.time()) < found.fresh_for:
                return found
            if time.monotonic() >= deadline:
                return None

    def _hold(self, lock_key: bytes, token: bytes, s: CacheSettings) -> None:
        self._held[lock_key] = (token, time.monotonic() + s.lock_ttl, s.lock_lease)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())
            self._tasks.add(self._renewer)
            self._renewer.add_done_callback(self._tasks.discard)

    async def _unlock(self, miss: _Miss) -> None:
        lock = miss.lock
        if lock is None:
            return
        miss.lock = None
        self._held.pop(lock, None)
        if self.cache is not None and self.cache.redis is not None:
            redis = self.cache.redis
            await redis.call(redis.client.eval, _UNLOCK, 1, lock, miss.token)

    async def _renew(self) -> None:
        """Extend each held lock's lease every third of it, while any is held.

        A lock held past its `lock_ttl` is no longer renewed (a leader that hangs
        lets another take over), nor is one that another worker holds now.
        """
        cache = self.cache
        assert cache is not None and cache.redis is not None
        redis = cache.redis
        while self._held:
            await asyncio.sleep(min(lease for _, _, lease in self._held.values()) / 3)
            now = time.monotonic()
            for lock, (token, until, lease) in list(self._held.items()):
                if now >= until:
                    self._held.pop(lock, None)
                    continue
                px = int(lease * 1000)
                renewed = await redis.call(redis.client.eval, _RENEW, 1, lock, token, px)
                if renewed == 0 and self._held.get(lock, (b"",))[0] == token:
                    self._held.pop(lock, None)  # lapsed (a stall) and taken: not ours now

    @hookimpl
    def on_response_start(
        self, ctx: RequestContext, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        method = ctx.method
        if method != "GET" and method != "HEAD" and 200 <= status < 400:
            self._invalidate_unsafe(ctx, headers)
        state = ctx.cache_status
        s = ctx.settings("cache") or self.settings
        route = self._route(s)
        # The app's tag header is for the cache alone: stripped from every response,
        # looked up or not (a POST, a route with caching off, a bypass).
        tag = route.tag_header
        for name, _ in headers:
            if name.lower() == tag:
                headers[:] = [h for h in headers if h[0].lower() != tag]
                break
        if state is None:
            return
        if state == MISS:
            miss = ctx.state.get("cache")
            if miss is not None and miss.flight is not None:
                original = ctx.response_headers or []
                # Only a response fresh on arrival is shared with waiting requests,
                # with the Age it has (RFC 9111 4.2.3), as a stored one would be.
                age = route.fresh_age(status, original, miss.request_time)
                shared = route.client_headers(original)
                if age is not None:
                    shared.append((b"age", b"%d" % int(age)))
                miss.flight.start(status, shared, age is not None)
                if age is None:
                    self._remember_uncacheable(miss.key, s)
        headers.append(_X_CACHE[state])

    @hookimpl
    async def cache_store(self, ctx: RequestContext, response: CapturedResponse) -> None:
        if ctx.cache_status != MISS:
            return
        miss = ctx.state.get("cache")
        if miss is None:
            return
        tags = ctx.state.get("cache_tags")
        stored = await self._store(miss.route, miss.key, ctx, response, tags, miss.request_time)
        self.counts["stored" if stored is not None else "not_stored"] += 1
        if stored is not None:
            self._uncacheable.pop(miss.key, None)
        else:
            self._remember_uncacheable(miss.key, miss.route.settings)
        self._end_flight(miss, failed=False)

    async def store_captured(
        self,
        route: Route,
        key: str,
        ctx: RequestContext,
        response: CapturedResponse,
        request_time: float | None,
        tags: Any = None,
    ) -> StoredResponse | None:
        """Store `response` under `key` if RFC 9111 allows it (for `Revalidation`)."""
        stored = await self._store(route, key, ctx, response, tags, request_time)
        self.counts["stored" if stored is not None else "not_stored"] += 1
        return stored

    def hit_answer(
        self,
        ctx: RequestContext,
        stored: StoredResponse,
        age: float,
        conditions: tuple[bytes | None, ...],
    ) -> Any:
        """The answer from a stored response just renewed by a 304 (a HIT)."""
        return self._answer(ctx, HIT, stored, age, *conditions)

    def serve_stale_on_error(self, ctx: RequestContext, stale: StoredResponse) -> bool:
        """May `stale` answer instead of an error (stale-if-error, RFC 5861 4)?"""
        return stale.age(time.time()) < stale.fresh_for + stale.stale_if_error

    def stale_answer(self, ctx: RequestContext, stale: StoredResponse) -> Any:
        self.counts[MISS] -= 1
        ctx.cache_status = STALE
        self.counts[STALE] += 1
        return answer(stale, stale.age(time.time()), ctx.method == "HEAD", *(None,) * 4)

    async def _store(
        self,
        route: Route,
        key: str,
        ctx: RequestContext,
        response: CapturedResponse,
        tags: Any,
        request_time: float | None = None,
    ) -> StoredResponse | None:
        cache = self.cache
        assert cache is not None
        built = build_stored(route, response, ctx, time.time(), request_time)
        if built is None:
            return None
        stored, ttl, all_tags, compressible = built
        if stored.vary:
            if duplicated(ctx.raw_headers, stored.vary):
                return None  # the variant's key would not be what the app read
            await cache.set(key, VaryIndex(stored.vary), ttl, tags=all_tags)
            key = key + vary_suffix(stored.vary, ctx.headers)
        all_tags = (*all_tags, *(tags or ()))
        await cache.set(key, stored, ttl, tags=all_tags, compress=compressible)
        return stored

    @hookimpl
    async def on_failure(self, ctx: RequestContext, error: BaseException | None) -> Any:
        if ctx.cache_status != MISS or ctx.response_started:
            return None
        miss = ctx.state.get("cache")
        if miss is None or miss.stale is None:
            return None
        stale: StoredResponse = miss.stale
        now = time.time()
        age = stale.age(now)
        if age >= stale.fresh_for + stale.stale_if_error:
            return None
        self.counts[MISS] -= 1
        ctx.cache_status = STALE
        self.counts[STALE] += 1
        return answer(stale, age, ctx.method == "HEAD", None, None, None, None)

    async def _invalidate_target(self, ctx: RequestContext) -> None:
        """Before an unsafe request reaches the app: its target's stored responses go,
        everywhere, so that no worker answers from them once the app has changed it
        (the answer's own invalidation, at its start, reaches other workers only by
        pub/sub, which a client's next request can outrun). Dropping an entry early is
        always allowed; it costs what a request with ``Cache-Control: no-cache`` costs.
        Only with Redis: one process's memory is invalidated before the answer starts."""
        cache = self.cache
        s = ctx.settings("cache") or self.settings
        if cache is None or not s.enabled:
            return
        keys = invalidation_keys(self._route(s), ctx, [])
        await cache.invalidate_stored(keys)

    def _invalidate_unsafe(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]]) -> None:
        """RFC 9111 4.4: a non-error answer to an unsafe method invalidates the target
        URI and same-origin Location / Content-Location. This worker's memory at once
        (before the client can send its next request); Redis and the other workers in
        `after_request`, through the cross-worker invalidation."""
        cache = self.cache
        s = ctx.settings("cache") or self.settings
        if cache is None or not s.enabled:
            return
        keys = invalidation_keys(self._route(s), ctx, ctx.response_headers or headers)
        for key in keys:
            cache.memory.delete(key)
        self.counts["invalidations"] += 1
        if cache.redis is None:
            return
        # Started now, while the body is sent, so that Redis and the other workers have
        # it as early as can be (a client's next request may go to another worker);
        # after_request waits for it.
        try:
            task: Any = asyncio.get_running_loop().create_task(cache.invalidate_stored(keys))
        except RuntimeError:  # not asyncio: after_request does it
            task = keys
        ctx.state["cache_invalidate"] = task

    @hookimpl
    async def after_request(self, ctx: RequestContext) -> None:
        pending = ctx.state.pop("cache_invalidate", None)
        if pending is not None and self.cache is not None:
            if isinstance(pending, list):
                await self.cache.invalidate_stored(pending)
            else:
                await pending
        status = ctx.cache_status
        if status != MISS and status != STALE:
            return
        miss = ctx.state.get("cache")
        if miss is not None:
            self._end_flight(miss, failed=True)  # a no-op when the body completed
            await self._unlock(miss)

    def _remember_uncacheable(self, key: str, s: CacheSettings) -> None:
        """Hit-for-miss: for `uncacheable_ttl`, misses on `key` neither wait nor collapse."""
        table = self._uncacheable
        table[key] = time.monotonic() + s.uncacheable_ttl
        table.move_to_end(key)
        while len(table) > s.max_uncacheable:
            table.popitem(last=False)

    def _end_flight(self, miss: _Miss, failed: bool) -> None:
        flight = miss.flight
        if flight is None:
            return
        miss.flight = None
        flight.finish(failed=failed and not flight.done)
        if self._flights.get(miss.key) is flight:
            del self._flights[miss.key]

    # -- stale-while-revalidate ------------------------------------------------------

    def _revalidate(self, key: str, ctx: RequestContext, route: Route) -> None:
        if key in self._refreshing or self.host is None:
            return
        app = self.host.state.get("app")
        if app is None:
            return
        self._refreshing.add(key)
        self.counts["revalidations"] += 1
        headers = dict(ctx.headers)
        task = asyncio.get_running_loop().create_task(
            self._refresh(app, key, route, dict(ctx.scope), headers)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(
        self, app: Any, key: str, route: Route, scope: dict[str, Any], headers: dict[str, str]
    ) -> None:
        started = time.time()
        try:
            result = await revalidate(
                app, scope, route.settings.lock_ttl, route.settings.max_entry_bytes
            )
            if result is not None:
                ctx = RequestContext(scope, "revalidate", self._policy_for(scope), self.host)
                tags = None
                await self._store(route, key, ctx, result, tags, started)
        except Exception as exc:
            logger.error(
                "background revalidation failed", key=key[:200], traceback=plain_traceback(exc)
            )
        finally:
            self._refreshing.discard(key)

    def _policy_for(self, scope: dict[str, Any]) -> Any:
        routes = self.host.routes
        return routes.lookup("GET", scope.get("path", "/")) if routes.rules else routes.default

    # -- invalidation and figures --------------------------------------------------------

    async def invalidate_url(self, path: str, query: str = "", host: str = "") -> int:
        """Drop the stored response(s) for one URL (all its Vary variants), everywhere."""
        assert self.cache is not None
        s = self.settings
        route = self._route(s)
        base = route.base_key(path.encode("utf-8"), query.encode("latin-1"), host.encode("latin-1"))
        n = await self.cache.invalidate([base])
        return n + await self.cache.invalidate_prefix(base + "\n")

    async def invalidate_prefix(self, path_prefix: str) -> int:
        """Drop every stored response whose path starts with `path_prefix`, everywhere."""
        assert self.cache is not None
        return await self.cache.invalidate_prefix("GET " + path_prefix)

    async def invalidate_tags(self, tags: list[str]) -> int:
        assert self.cache is not None
        return await self.cache.invalidate_tags(tags)

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        stats = self.cache.get_stats() if self.cache is not None else {}
        stats["http"] = dict(
            self.counts, in_flight=len(self._flights), uncacheable_keys=len(self._uncacheable)
        )
        return stats

    @hookimpl
    def on_memory_pressure(self, host: Any, level: str) -> None:
        if self.cache is not None:
            self.cache.memory.trim(0.0 if level == "critical" else 0.5)
