"""TransitionModel and PredictiveCache: learns real structure, stays quiet on noise."""

from __future__ import annotations

import asyncio
import random

import pytest

import overdrive.plugins.predictive as predictive_mod
from overdrive.plugins.predictive import PredictiveCache, Predictor, TransitionModel


def test_public_names_are_pinned() -> None:
    assert predictive_mod.__all__ == sorted(predictive_mod.__all__)
    assert predictive_mod.__all__ == [
        "PREFETCH_EXTENSION",
        "PredictiveCache",
        "PredictivePlugin",
        "PredictiveSettings",
        "Predictor",
        "TransitionModel",
        "is_prefetch",
    ]


def test_model_learns_a_transition_and_follows_a_change() -> None:
    m = TransitionModel(decay=0.8, min_support=2)
    m.observe("a", "b")
    assert m.predict("a") == []  # one observation is not evidence
    for _ in range(5):
        m.observe("a", "b")
    assert [k for k, _ in m.predict("a")] == ["b"]
    for _ in range(15):  # traffic changes: a is now followed by c
        m.observe("a", "c")
    assert [k for k, _ in m.predict("a")] == ["c"]


def test_model_says_nothing_on_a_random_trace() -> None:
    rng = random.Random(3)
    m = TransitionModel()
    keys = [f"k{i}" for i in range(50)]
    prev = keys[0]
    said = 0
    for _ in range(20_000):
        key = rng.choice(keys)
        said += bool(m.predict(prev))
        m.observe(prev, key)
        prev = key
    assert said < 200  # under 1% of requests lead to any prediction


def test_model_with_weak_structure_is_silenced_by_its_own_precision() -> None:
    # Each key is followed by one of two successors, 50/50: p sits at the threshold
    # but half the predictions are wrong; precision below 0.6 silences the model.
    rng = random.Random(5)
    m = TransitionModel(threshold=0.4, min_precision=0.6)
    prev = 0
    for _ in range(5000):
        nxt = (prev * 2 + rng.choice((1, 2))) % 40
        m.observe(prev, nxt)
        prev = nxt
    assert not m.confident
    assert m.predict(prev) == []
    assert m.precision is not None and m.precision < 0.6


def test_memory_is_bounded() -> None:
    m = TransitionModel(max_keys=10, max_successors=3)
    for i in range(100):
        for j in range(10):
            m.observe(i, j)
    assert len(m) == 10
    assert all(len(row.counts) <= 3 for row in m._rows.values())
    with pytest.raises(ValueError, match="threshold"):
        TransitionModel(threshold=0)


def test_predictor_bounds_inflight_and_rate() -> None:
    p = Predictor(max_inflight=2, per_second=3)
    assert p.admit() and p.admit()
    assert not p.admit()  # two in flight
    assert p.skipped_inflight == 1
    p.done()
    p.done()
    assert p.admit()
    p.done()
    assert not p.admit()  # three tokens spent within the same instant
    assert p.skipped_budget == 1


def test_per_client_sequences_do_not_mix() -> None:
    p = Predictor(min_support=2)
    for _ in range(5):  # two clients interleaved: alice a->b, bob x->y
        p.observe("a", client="alice")
        p.observe("x", client="bob")
        p.observe("b", client="alice")
        p.observe("y", client="bob")
    assert [k for k, _ in p.observe("a", client="alice")] == ["b"]
    assert [k for k, _ in p.observe("x", client="bob")] == ["y"]
    q = Predictor(min_support=2, per_client=True)
    for _ in range(5):
        q.observe("a", client="alice")
        q.observe("b", client="alice")
    assert q.observe("a", client="bob") == []  # bob has his own (empty) model
    assert q.stats()["client_models"] == 2


async def test_seed_usage() -> None:
    predictive_cache = PredictiveCache(max_size=1000)
    user_data = {"id": 123, "name": "Ada"}
    videos_data = [{"id": 1}, {"id": 2}]
    await predictive_cache.set("user_123", user_data)
    await predictive_cache.set("user_123_videos", videos_data)
    assert await predictive_cache.get("user_123") == user_data
    assert await predictive_cache.get("user_123_videos") == videos_data
    assert await predictive_cache.get("missing") is None
    assert await predictive_cache.get("missing", "dflt") == "dflt"
    stats = predictive_cache.stats()
    assert stats["hits"] == 2 and stats["misses"] == 2


async def test_prefetches_through_loaders_after_learning() -> None:
    calls: list[str] = []

    async def load_user(key: str) -> dict[str, str]:
        calls.append(key)
        await asyncio.sleep(0)
        return {"key": key}

    pc = PredictiveCache(max_size=100, min_support=2)
    pc.register_loader(load_user, prefix="user_")
    for _ in range(4):  # learn: user_1 is followed by user_1_videos
        await pc.get("user_1")
        await pc.get("user_1_videos")
        await pc.delete("user_1_videos")  # expired meanwhile
        await asyncio.sleep(0)
    before = len(calls)
    await pc.get("user_1")
    await asyncio.sleep(0.01)  # the prefetch runs
    assert calls[before:] == ["user_1_videos"]
    assert await pc.get("user_1_videos") == {"key": "user_1_videos"}
    assert calls[before:] == ["user_1_videos"]  # served by the prefetch, no second load
    s = pc.stats()["prefetch"]
    assert s["used"] >= 1 and s["issued"] >= 1
    await pc.close()


async def test_concurrent_misses_share_one_load_and_failures_are_not_kept() -> None:
    calls = 0
    fail = True

    async def loader(key: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if fail:
            raise ConnectionError("backend down")
        return "v"

    pc = PredictiveCache(10)
    pc.register_loader(loader)
    results = await asyncio.gather(*(pc.get("k") for _ in range(5)), return_exceptions=True)
    assert calls == 1 and all(isinstance(r, ConnectionError) for r in results)
    fail = False
    assert await pc.get("k") == "v"
    assert calls == 2


async def test_a_hanging_loader_times_out_and_frees_its_prefetch_slot() -> None:
    async def hang(key: str) -> str:
        await asyncio.Event().wait()
        return "never"

    pc = PredictiveCache(10, load_timeout=0.05, max_inflight=1, min_support=1)
    pc.register_loader(hang)
    results = await asyncio.gather(pc.get("k"), pc.get("k"), return_exceptions=True)
    assert all(isinstance(r, TimeoutError) and "'k' timed out" in str(r) for r in results)
    await pc.set("a", 1)
    for _ in range(3):  # learn a -> b, where b's loader hangs
        await pc.get("a")
        await pc.set("b", 2)
        await pc.get("b")
        await pc.delete("b")
    await pc.get("a")  # prefetch of b starts and hangs ...
    await asyncio.sleep(0.1)  # ... until the timeout frees the slot
    assert pc.predictor.inflight == 0
    assert pc.stats()["prefetch"]["failed"] >= 1
    await pc.close()


async def test_lru_bound_and_ttl() -> None:
    pc = PredictiveCache(max_size=2, ttl=60)
    for k in "abc":
        await pc.set(k, k)
    assert await pc.get("a") is None
    assert await pc.get("c") == "c"
    await pc.set("t", 1, ttl=0.01)
    await asyncio.sleep(0.02)
    assert await pc.get("t") is None
    with pytest.raises(ValueError, match="max_size"):
        PredictiveCache(0)
