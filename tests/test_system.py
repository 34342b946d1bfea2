"""The seed's all-in-one system works as the seed's guide writes it."""

from __future__ import annotations

import pytest

from overdrive import AdvancedPerformanceSystem, PerformanceOptimizationSystem
from overdrive.system import seed_plugins


@pytest.fixture(autouse=True)
def no_config_file(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    monkeypatch.delenv("OVERDRIVE_CONFIG", raising=False)


async def test_the_seeds_integration_snippet() -> None:
    system = AdvancedPerformanceSystem()
    assert list(system.plugins) == seed_plugins()
    await system.initialize()
    try:
        system.profiler.start_profiling("video_processing")

        async def call_external_service(video_id: str) -> dict[str, str]:
            return {"video": video_id}

        result = await system.optimized_operation(
            "external_api", lambda: call_external_service("v1")
        )
        system.profiler.stop_profiling("video_processing")
        assert result == {"video": "v1"}
        report = system.profiler.get_profile_report("video_processing")
        assert report["count"] == 1 and report["avg_time"] >= 0
        stats = await system.get_system_stats()
        assert stats["auto_scaler"]["current_workers"] >= 1
        assert "video_processing" in stats["profiles"]
        assert stats["circuit_breakers"] == stats["breaker"]
        assert "op:external_api" in stats["circuit_breakers"]  # operations get a breaker

        assert 0.0 <= stats["cache_hit_rate"] <= 1.0
        assert len(system.connection_pool_manager.pools) == 0
        gpu_info = await system.gpu_optimizer.get_gpu_info()
        assert gpu_info["count"] >= 0
    finally:
        await system.cleanup()


def test_an_explicit_config_wins() -> None:
    system = PerformanceOptimizationSystem({"plugins": ["profiler"]})
    assert list(system.plugins) == ["profiler"]


async def test_the_basic_systems_cache_uses_the_given_redis_client(
    redis_url: str, namespace: str
) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    basic_system = PerformanceOptimizationSystem(redis_client=client)
    await basic_system.initialize()
    try:
        await basic_system.cache.set(f"{namespace}:video_1", {"frames": 24})
        assert await basic_system.cache.get(f"{namespace}:video_1") == {"frames": 24}
        assert await client.keys(f"*{namespace}:video_1*")  # it went to Redis too
    finally:
        await basic_system.cleanup()
        for key in await client.keys(f"*{namespace}*"):
            await client.delete(key)
        await client.aclose()
