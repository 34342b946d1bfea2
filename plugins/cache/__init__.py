"""Caching: the seed's `AsyncCache` / `CacheConfig` and the `cache` HTTP plugin.

    from overdrive.plugins.cache import AsyncCache, CacheConfig
    cache = AsyncCache(redis_client=redis_client, config=CacheConfig(ttl=3600, max_size=1000))

Modules: `settings` (CacheConfig, CacheSettings), `policies` (eviction),
`codec` (the Redis frame), `tiers` (memory and Redis), `asynccache`
(AsyncCache), `http` and `store` (RFC 9111), `flight` (single-flight with
streaming), `plugin` (the hooks). See docs/plugins/cache.md.
"""

from __future__ import annotations

from .asynccache import AsyncCache
from .codec import CorruptEntry
from .plugin import CachePlugin, tag_response
from .settings import CacheConfig, CacheSettings

__all__ = [
    "AsyncCache",
    "CacheConfig",
    "CachePlugin",
    "CacheSettings",
    "CorruptEntry",
    "tag_response",
]
