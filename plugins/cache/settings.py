"""Configuration: `CacheConfig` (the seed's, for `AsyncCache`) and the plugin's `CacheSettings`.

Both validate at construction and name the key and value in the error, so a
bad configuration fails at startup, never at the first request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from overdrive.errors import ConfigError
from overdrive.plugins.redisconn import SCHEMES
from overdrive.redact import redact_url

__all__ = ["DEFAULT_POLICY", "UNKEYED_HEADERS", "CacheConfig", "CacheSettings", "EvictionPolicy"]

_REDIS_PREFIXES = tuple(f"{scheme}://" for scheme in SCHEMES)

EvictionPolicy = Literal["s3fifo", "sieve", "lru", "ttl"]
#: Best or equal-best on every trace of `benchmarks/eviction.py` (see docs/plugins/cache.md).
DEFAULT_POLICY: EvictionPolicy = "s3fifo"
_POLICIES = ("s3fifo", "sieve", "lru", "ttl")

#: Request headers that frameworks, proxies' helpers (uvicorn's --proxy-headers,
#: Werkzeug's ProxyFix, Django's USE_X_FORWARDED_*) or apps commonly trust to build
#: URLs or pick the method, without the cache keying on them: a request that carries
#: one bypasses the cache unless `key_headers` puts it in the key (docs/security.md).
#: X-Forwarded-For is not here: every proxied request carries it.
UNKEYED_HEADERS = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-proto",
    "x-forwarded-scheme",
    "x-forwarded-server",
    "x-host",
    "x-http-method",
    "x-http-method-override",
    "x-method-override",
    "x-original-host",
    "x-original-url",
    "x-rewrite-url",
]
MAX_KEY_HEADERS = 40
#: RFC 9110 15.1: statuses cacheable by default (heuristically: stored with `ttl` /
#: `default_ttl` when the response gives no freshness), less 206 (a part is never
#: stored as the whole; Range requests are answered from a stored 200 instead). Any
#: other status but 206 and 304 is stored when the response has explicit freshness
#: (max-age, s-maxage, Expires), as RFC 9111 3 allows.
CACHEABLE_STATUSES = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501]


def _positive(where: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{where}: expected > 0, got {value!r}")


@dataclass
class CacheConfig:
    """How an `AsyncCache` behaves (the seed's ``CacheConfig(ttl, max_size, ...)``).

    `max_size` and `max_bytes` bound the memory tier and are read at each
    insertion, so ``cache.config.max_size *= 2`` takes effect at once.
    """

    ttl: float | None = 3600.0  # seconds, for set() without ttl=; None: no expiry
    max_size: int = 10_000  # memory tier: entries
    max_bytes: int = 256 * 2**20  # memory tier: bytes (values' sizes, see docs)
    enable_compression: bool = True  # for what goes to Redis
    compression: Literal["auto", "zstd", "zlib"] = "auto"  # auto: zstd when installed
    compression_threshold: int = 1024  # bytes; smaller payloads are stored as they are
    eviction_policy: EvictionPolicy = DEFAULT_POLICY
    serializer: Literal["json", "msgpack"] = "json"  # for non-bytes values (never pickle)
    namespace: str = "overdrive"  # Redis keys: "<namespace>:<key>"
    redis_timeout: float = 0.25  # seconds per Redis command; past it the command is a fault
    redis_retry_after: float = 1.0  # after a fault, Redis is skipped this long (doubles to 30 s)
    trust_dependencies: bool = False  # (route) FastAPI: hits may skip what dependencies check
    memory_ttl: float | None = None  # cap on how long a Redis value lives in memory
    max_value_bytes: int = 64 * 2**20  # refuse to store or decompress more than this
    invalidation_channel: bool = True  # pub/sub so other workers drop invalidated keys

    def __post_init__(self) -> None:
        if self.ttl is not None and self.ttl <= 0:
            raise ConfigError(f"cache.ttl: expected > 0 or None, got {self.ttl!r}")
        _positive("cache.max_size", self.max_size)
        _positive("cache.max_bytes", self.max_bytes)
        _positive("cache.redis_timeout", self.redis_timeout)
        _positive("cache.redis_retry_after", self.redis_retry_after)
        _positive("cache.memory_ttl", self.memory_ttl, allow_none=True)
        _positive("cache.max_value_bytes", self.max_value_bytes)
        if self.compression_threshold < 0:
            raise ConfigError(
                f"cache.compression_threshold: expected >= 0, got {self.compression_threshold!r}"
            )
        if self.eviction_policy not in _POLICIES:
            raise ConfigError(
                f"cache.eviction_policy: expected one of {', '.join(_POLICIES)}, "
                f"got {self.eviction_policy!r}"
            )
        if self.serializer not in ("json", "msgpack"):
            raise ConfigError(
                f"cache.serializer: expected 'json' or 'msgpack', got {self.serializer!r}"
            )
        if not self.namespace or any(c in self.namespace for c in "*?[] \r\n"):
            raise ConfigError(
                f"cache.namespace: expected a plain non-empty name, got {self.namespace!r}"
            )


@dataclass
class CacheSettings:
    """The `cache` plugin's settings. Fields marked (route) are also set by `[[routes]]`."""

    redis_url: str | None = None  # None: memory only (the host's redis_url is used if set)
    namespace: str = "overdrive:http"
    max_entries: int = 10_000
    max_bytes: int = 256 * 2**20
    max_entry_bytes: int = 8 * 2**20  # a larger body is passed through, not stored
    default_ttl: int | None = None  # for responses without caching headers; None: not cached
    eviction_policy: EvictionPolicy = DEFAULT_POLICY
    ignore_query_params: list[str] = field(default_factory=list)  # (route) left out of the key
    key_headers: list[str] = field(default_factory=list)  # (route) request headers in the key
    sort_query: bool = True  # (route) sort parameters by name (same names keep their order)
    unkeyed_headers: list[str] = field(default_factory=lambda: list(UNKEYED_HEADERS))
    cacheable_statuses: list[int] = field(
        default_factory=lambda: list(CACHEABLE_STATUSES)
    )  # stored without explicit freshness
    ttl: int | None = None  # (route) TTL for responses without caching headers
    enabled: bool = True  # (route) false: this route is never looked up nor stored
    tags: list[str] = field(default_factory=list)  # (route) tags given to stored responses
    tag_header: str = "x-cache-tags"  # response header the app sets tags with (stripped)
    stale_while_revalidate: int = 0  # (route) seconds, when the response names none
    stale_if_error: int = 0  # (route) seconds, when the response names none
    heuristic_fraction: float = 0.1  # (route) of the time since Last-Modified, when no freshness
    heuristic_max: int = 3600  # (route) seconds; the most heuristic freshness given
    keep_stale: int = 3600  # seconds a stale entry with a validator is kept to revalidate
    targeted_cache_control: list[str] = field(
        default_factory=lambda: ["cdn-cache-control"]
    )  # RFC 9213 fields obeyed over Cache-Control, first valid wins
    wait_timeout: float = 30.0  # how long concurrent misses wait for the first one
    uncacheable_ttl: float = 30.0  # a key that answered unshareable is not collapsed this long
    max_uncacheable: int = 10_000  # keys remembered as uncacheable (oldest forgotten first)
    trust_dependencies: bool = False  # (route) FastAPI: hits may skip what dependencies check
    memory_ttl: float | None = None  # cap on how long a Redis entry lives in this worker's memory
    # The cross-worker single-flight lock lives `lock_lease` unless its holder renews it
    # (every third of it, for at most `lock_ttl`): a leader that dies lets one waiting
    # worker take over within a lease.
    lock_ttl: float = 30.0  # longest a leader keeps the cross-worker lock (renewing it)
    lock_lease: float = 2.0  # seconds the cross-worker lock outlives its last renewal
    redis_timeout: float = 0.25
    compression: bool = True

    def __post_init__(self) -> None:
        _positive("cache.max_entries", self.max_entries)
        _positive("cache.max_bytes", self.max_bytes)
        _positive("cache.max_entry_bytes", self.max_entry_bytes)
        _positive("cache.wait_timeout", self.wait_timeout)
        _positive("cache.uncacheable_ttl", self.uncacheable_ttl)
        _positive("cache.max_uncacheable", self.max_uncacheable)
        _positive("cache.memory_ttl", self.memory_ttl, allow_none=True)
        _positive("cache.lock_ttl", self.lock_ttl)
        _positive("cache.lock_lease", self.lock_lease)
        if self.lock_lease < self.redis_timeout * 4:
            raise ConfigError(
                f"cache.lock_lease: expected >= 4 x redis_timeout ({self.redis_timeout * 4}) "
                f"so that renewals arrive in time, got {self.lock_lease!r}"
            )
        _positive("cache.redis_timeout", self.redis_timeout)
        for name in ("default_ttl", "ttl"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"cache.{name}: expected > 0 or none, got {value!r}")
        if not 0 <= self.heuristic_fraction <= 1:
            raise ConfigError(
                f"cache.heuristic_fraction: expected 0..1, got {self.heuristic_fraction!r}"
            )
        for name in ("stale_while_revalidate", "stale_if_error", "keep_stale", "heuristic_max"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cache.{name}: expected >= 0, got {getattr(self, name)!r}")
        if self.max_entry_bytes > self.max_bytes:
            raise ConfigError(
                f"cache.max_entry_bytes: expected <= max_bytes ({self.max_bytes}), "
                f"got {self.max_entry_bytes!r}"
            )
        if self.redis_url is not None and not self.redis_url.startswith(_REDIS_PREFIXES):
            raise ConfigError(
                "cache.redis_url: expected redis://, rediss://, unix://, redis+cluster:// or "
                f"redis+sentinel://, got {redact_url(self.redis_url)!r}"
            )
        for status in self.cacheable_statuses:
            if not 200 <= status <= 599 or status == 206:
                raise ConfigError(
                    f"cache.cacheable_statuses: expected 200..599 but 206, got {status!r}"
                )
        if not self.tag_header or not self.tag_header.isascii() or ":" in self.tag_header:
            raise ConfigError(f"cache.tag_header: expected a header name, got {self.tag_header!r}")
        for name in self.targeted_cache_control:
            if not name or not name.isascii() or ":" in name or " " in name:
                raise ConfigError(
                    f"cache.targeted_cache_control: expected header names, got {name!r}"
                )
        self.targeted_cache_control = [h.lower() for h in self.targeted_cache_control]
        # Header names are matched lower-cased, as ASGI servers deliver them.
        self.key_headers = sorted({h.lower() for h in self.key_headers})
        if len(self.key_headers) > MAX_KEY_HEADERS:
            raise ConfigError(
                f"cache.key_headers: expected at most {MAX_KEY_HEADERS} names, "
                f"got {len(self.key_headers)}"
            )
        self.unkeyed_headers = [h.lower() for h in self.unkeyed_headers]
        self.tag_header = self.tag_header.lower()
        CacheConfig(namespace=self.namespace)  # same namespace rules
