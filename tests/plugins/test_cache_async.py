"""AsyncCache on its own: the seed's calls, tiers, serializers, single-flight, faults."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib
from typing import Any

import pytest
import redis.asyncio as aioredis

from overdrive import ConfigError
from overdrive.plugins import cache as cache_pkg
from overdrive.plugins.cache import AsyncCache, CacheConfig
from overdrive.plugins.cache.codec import MAGIC
from tests.support.faults import RedisServer


def test_public_names_are_pinned() -> None:
    assert cache_pkg.__all__ == sorted(cache_pkg.__all__)
    assert cache_pkg.__all__ == [
        "AsyncCache",
        "CacheConfig",
        "CachePlugin",
        "CacheSettings",
        "CorruptEntry",
        "tag_response",
    ]


async def until(predicate: Any, seconds: float = 10.0) -> bool:
    """Poll `predicate` (sync or async) until true or `seconds` pass; no timing asserted."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(0.02)
    return False


@pytest.fixture
async def client(redis_url: str) -> Any:
    c = aioredis.from_url(redis_url)
    yield c
    await c.aclose()


async def drop_namespace(client: Any, namespace: str) -> None:
    keys = [k async for k in client.scan_iter(match=namespace + ":*")]
    if keys:
        await client.delete(*keys)


# -- the seed's snippet and the memory tier ------------------------------------------


async def test_seed_snippet_with_redis_client(client: Any, namespace: str) -> None:
    config = CacheConfig(
        ttl=3600, max_size=1000, enable_compression=True, eviction_policy="lru", namespace=namespace
    )
    cache = AsyncCache(redis_client=client, config=config)
    try:
        await cache.set("video_1", {"title": "a cat", "frames": 24})
        assert await cache.get("video_1") == {"title": "a cat", "frames": 24}
        assert await cache.get("video_2") is None
        assert cache.get_stats()["hit_rate"] == 0.5
        cache.config.max_size *= 2
        assert cache.config.max_size == 2000
        # The value really is in Redis, framed, not pickled.
        raw = await client.get(f"{namespace}:v:video_1")
        assert raw.startswith(MAGIC)
    finally:
        await cache.close()
        await drop_namespace(client, namespace)


async def test_redis_accepted_as_url_or_client(redis_url: str, client: Any, namespace: str) -> None:
    for cache in (
        AsyncCache(CacheConfig(namespace=namespace), redis=redis_url),
        AsyncCache(CacheConfig(namespace=namespace), redis=client),
        AsyncCache(CacheConfig(namespace=namespace), redis_url=redis_url),
    ):
        await cache.set("k", b"v")
        cache.memory.clear()
        assert await cache.get("k") == b"v"
        assert cache.get_stats()["redis"]["hits"] == 1
        await cache.close()
    await drop_namespace(client, namespace)


async def test_memory_tier_bounded_by_entries_and_bytes() -> None:
    cache = AsyncCache(CacheConfig(max_size=10, max_bytes=10_000))
    for i in range(50):
        await cache.set(f"k{i}", b"x" * 100)
    stats = cache.get_stats()["memory"]
    assert stats["entries"] == 10
    assert stats["evictions"] == 40
    big = AsyncCache(CacheConfig(max_size=1000, max_bytes=5_000))
    for i in range(50):
        await big.set(f"k{i}", b"x" * 1000)
    assert big.memory.bytes <= 5_000
    assert len(big.memory) < 50
    # Growing max_size at run time takes effect at the next insertion.
    cache.config.max_size = 20
    for i in range(50, 70):
        await cache.set(f"k{i}", b"y")
    assert len(cache.memory) == 20


async def test_ttl_expires_and_none_means_no_expiry() -> None:
    cache = AsyncCache(CacheConfig(ttl=None))
    await cache.set("short", "v", ttl=0.05)
    await cache.set("forever", "v")
    await asyncio.sleep(0.1)
    assert await cache.get("short") is None
    assert await cache.get("forever") == "v"


async def test_values_that_json_cannot_encode_stay_in_memory(client: Any, namespace: str) -> None:
    cache = AsyncCache(CacheConfig(namespace=namespace), redis=client)
    model = object()
    await cache.set("model", model)
    assert await cache.get("model") is model
    assert await client.get(f"{namespace}:v:model") is None
    assert cache.get_stats()["redis"]["memory_only_values"] == 1
    await cache.close()


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
async def test_serializers_round_trip_through_redis(
    client: Any, namespace: str, serializer: str
) -> None:
    writer = AsyncCache(CacheConfig(namespace=namespace, serializer=serializer), redis=client)
    reader = AsyncCache(CacheConfig(namespace=namespace), redis=client)
    value = {"id": 7, "tags": ["a", "b"], "score": 0.5, "nested": {"ok": True}}
    await writer.set("v", value)
    await writer.set("b", b"\x00\xffraw")
    assert await reader.get("v") == value
    assert await reader.get("b") == b"\x00\xffraw"
    await writer.close()
    await reader.close()
    await drop_namespace(client, namespace)


@pytest.mark.parametrize("method", ["zstd", "zlib"])
async def test_large_values_are_compressed_in_redis(
    client: Any, namespace: str, method: str
) -> None:
    config = CacheConfig(namespace=namespace, compression=method, compression_threshold=1024)
    cache = AsyncCache(config, redis=client)
    await cache.set("big", "frame " * 10_000)
    await cache.set("small", "frame")
    raw = await client.get(f"{namespace}:v:big")
    assert len(raw) < 5_000
    cache.memory.clear()
    assert await cache.get("big") == "frame " * 10_000
    assert await cache.get("small") == "frame"
    await cache.close()
    await drop_namespace(client, namespace)


async def test_a_redis_hit_backfills_memory(client: Any, namespace: str) -> None:
    writer = AsyncCache(CacheConfig(namespace=namespace), redis=client)
    reader = AsyncCache(CacheConfig(namespace=namespace), redis=client)
    await writer.set("k", [1, 2, 3], ttl=60)
    assert await reader.get("k") == [1, 2, 3]
    assert reader.get_local("k") == [1, 2, 3]
    stats = reader.get_stats()
    assert stats["redis"]["hits"] == 1
    assert stats["memory"]["entries"] == 1
    await writer.close()
    await reader.close()
    await drop_namespace(client, namespace)


# -- single-flight -------------------------------------------------------------------


async def test_get_or_set_1000_concurrent_callers_one_loader_call() -> None:
    cache = AsyncCache()
    calls = 0

    async def render() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {"video": "done"}

    results = await asyncio.gather(*(cache.get_or_set("render", render) for _ in range(1000)))
    assert calls == 1
    assert all(r == {"video": "done"} for r in results)
    assert cache.get_stats()["coalesced"] == 999
    assert await cache.get_or_set("render", render) == {"video": "done"}
    assert calls == 1


async def test_get_or_set_loader_error_reaches_every_caller_and_is_not_cached() -> None:
    cache = AsyncCache()
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("render failed")

    results = await asyncio.gather(
        *(cache.get_or_set("k", broken) for _ in range(10)), return_exceptions=True
    )
    assert calls == 1
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await cache.get_or_set("k", lambda: "ok") == "ok"


async def test_get_or_set_waiters_take_over_when_the_loading_caller_is_cancelled() -> None:
    cache = AsyncCache()
    started = asyncio.Event()

    async def slow() -> str:
        started.set()
        await asyncio.sleep(10)
        return "never"

    leader = asyncio.create_task(cache.get_or_set("k", slow))
    await started.wait()
    follower = asyncio.create_task(cache.get_or_set("k", lambda: "second"))
    await asyncio.sleep(0)
    leader.cancel()
    assert await follower == "second"


# -- invalidation across workers ------------------------------------------------------


async def test_invalidation_reaches_other_workers(client: Any, namespace: str) -> None:
    a = AsyncCache(CacheConfig(namespace=namespace), redis=client)
    b = AsyncCache(CacheConfig(namespace=namespace), redis=client)
    await a.start()
    await b.start()
    try:
        await a.set("video:1", "v1", tags=["user:9"])
        await a.set("video:2", "v2", tags=["user:9"])
        await a.set("list:a", "la")
        await a.set("list:b", "lb")
        await a.set("other", "o")
        for key in ("video:1", "video:2", "list:a", "list:b", "other"):
            assert await b.get(key) is not None  # now in b's memory too
        assert await a.invalidate_tags(["user:9"]) == 2
        assert await until(lambda: b.get_local("video:1") is None)
        assert await b.get("video:2") is None
        await a.invalidate_prefix("list:")
        assert await until(lambda: b.get_local("list:a") is None)
        assert await b.get("list:b") is None
        await a.delete("other")
        assert await until(lambda: b.get_local("other") is None)
        assert await b.get("other") is None
    finally:
        await a.close()
        await b.close()
        await drop_namespace(client, namespace)


async def test_clear_empties_this_namespace_only(client: Any, namespace: str) -> None:
    mine = AsyncCache(CacheConfig(namespace=namespace), redis=client)
    theirs = AsyncCache(CacheConfig(namespace=namespace + "x"), redis=client)
    await mine.set("k", "v")
    await theirs.set("k", "v")
    await mine.clear()
    assert await mine.get("k") is None
    theirs.memory.clear()
    assert await theirs.get("k") == "v"
    await mine.close()
    await theirs.close()
    await drop_namespace(client, namespace + "x")


# -- bad data under our keys -------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"not ours at all",
        b"\x80\x04\x95pickle-looking bytes",
        MAGIC + b"\x01" + struct.pack(">d", 0.0) + b"{not json",
        MAGIC + b"\x11" + struct.pack(">d", 0.0) + b"\x78\x9c\x00broken zlib",
        MAGIC + b"\x0f" + struct.pack(">d", 0.0) + b"unknown serializer",
        MAGIC + b"\x11" + struct.pack(">d", 0.0) + zlib.compress(b"0" * (70 * 2**20)),
    ],
    ids=["foreign", "pickle", "bad-json", "bad-zlib", "bad-code", "zlib-bomb"],
)
async def test_corrupt_entries_are_misses(client: Any, namespace: str, garbage: bytes) -> None:
    cache = AsyncCache(CacheConfig(namespace=namespace), redis=client)
    await client.set(f"{namespace}:v:k", garbage)
    assert await cache.get("k") is None
    assert await cache.get_or_set("k", lambda: "fresh") == "fresh"
    assert cache.get_stats()["redis"]["corrupt"] == 2
    assert (await client.get(f"{namespace}:v:k")).startswith(MAGIC)
    await cache.close()
    await drop_namespace(client, namespace)


# -- Redis faults --------------------------------------------------------------------------


async def test_redis_killed_then_back_without_restarting_us(private_redis: RedisServer) -> None:
    config = CacheConfig(namespace="odtest", redis_timeout=0.2, redis_retry_after=0.05)
    cache = AsyncCache(config, redis=private_redis.url)
    await cache.set("kept", "v")
    private_redis.kill()
    # Nothing raises; memory keeps serving; errors are counted.
    assert await cache.get("kept") == "v"
    assert await cache.get("absent") is None
    assert await cache.set("new", "n") is True
    assert await cache.get_or_set("loaded", lambda: 42) == 42
    assert await cache.invalidate_tags(["t"]) == 0
    await cache.invalidate_prefix("x")
    await cache.clear()
    assert cache.get_stats()["errors"] >= 1
    private_redis.start()  # same port, a fresh empty server

    async def written() -> bool:
        await cache.set("after", "a")
        raw = aioredis.from_url(private_redis.url)
        try:
            return await raw.get("odtest:v:after") is not None
        finally:
            await raw.aclose()

    assert await until(written)
    assert cache.get_stats()["redis"]["available"]
    await cache.close()


async def test_redis_paused_does_not_hang_callers(private_redis: RedisServer) -> None:
    config = CacheConfig(namespace="odtest", redis_timeout=0.1, redis_retry_after=0.05)
    cache = AsyncCache(config, redis=private_redis.url)
    await cache.set("kept", "v")
    private_redis.stop()
    try:
        async with asyncio.timeout(5):  # a generous bound, not a timing assertion
            assert await cache.get("kept") == "v"
            assert await cache.get("absent") is None
            await cache.set("other", "o")
    finally:
        private_redis.cont()
    assert cache.get_stats()["errors"] >= 1

    async def round_trip() -> bool:
        await cache.set("after", "a")
        cache.memory.clear()
        return await cache.get("after") == "a"

    assert await until(round_trip)
    await cache.close()


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_size": 0}, "cache.max_size: expected > 0, got 0"),
        ({"max_bytes": -1}, "cache.max_bytes: expected > 0, got -1"),
        ({"ttl": -5}, "cache.ttl"),
        ({"eviction_policy": "random"}, "cache.eviction_policy"),
        ({"serializer": "pickle"}, "cache.serializer"),
        ({"namespace": "a*b"}, "cache.namespace"),
    ],
)
def test_bad_config_names_key_and_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        CacheConfig(**kwargs)


def test_json_is_the_default_serializer_never_pickle() -> None:
    cache = AsyncCache()
    assert cache.config.serializer == "json"
    assert json.loads(cache._default.dumps({"a": 1})) == {"a": 1}
