"""Eviction policies: each keeps its bound and evicts what its paper says."""

from __future__ import annotations

import pytest

from overdrive.plugins.cache.policies import POLICIES, S3FIFOStore, SieveStore, make_store
from overdrive.plugins.cache.settings import DEFAULT_POLICY


def fill(policy: str, trace: list[int], capacity: int) -> tuple[int, object]:
    store = POLICIES[policy]()
    hits = 0
    for key in trace:
        if store.get(key) is not None:
            hits += 1
            continue
        if len(store) >= capacity:
            assert store.evict() is not None
        store.set(key, key)
    assert len(store) <= capacity
    return hits, store


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_is_a_consistent_store(policy: str) -> None:
    store = make_store(policy)
    for i in range(100):
        store.set(i, str(i), expires_at=1000.0 + i)
    assert len(store) == 100
    assert store.peek(5) == "5"
    assert store.pop(5) == "5"
    assert store.pop(5) is None
    assert 5 not in store
    store.set(7, "seven")  # overwrite keeps one entry
    assert len(store) == 99
    evicted = set()
    while (victim := store.evict()) is not None:
        key, value = victim
        assert key not in evicted
        assert value == ("seven" if key == 7 else str(key))
        evicted.add(key)
    assert len(store) == 0
    assert evicted == set(range(100)) - {5}
    store.set("again", 1)
    assert store.get("again") == 1
    store.clear()
    assert len(store) == 0 and store.evict() is None


def test_lru_evicts_the_least_recently_used() -> None:
    store = make_store("lru")
    for key in "abc":
        store.set(key, key)
    store.get("a")
    assert store.evict() == ("b", "b")


def test_ttl_evicts_the_soonest_to_expire() -> None:
    store = make_store("ttl")
    store.set("late", 1, expires_at=300.0)
    store.set("soon", 2, expires_at=100.0)
    store.set("never", 3)
    assert store.evict() == ("soon", 2)
    assert store.evict() == ("late", 1)
    assert store.evict() == ("never", 3)


def test_sieve_keeps_visited_objects_in_place() -> None:
    store = SieveStore()
    for key in "abcd":
        store.set(key, key)
    store.get("a")
    store.get("b")
    assert store.evict() == ("c", "c")  # a and b were visited: the hand passes them
    store.set("e", "e")
    assert store.evict() == ("d", "d")


def test_s3fifo_one_hit_wonders_leave_through_the_small_queue() -> None:
    store = S3FIFOStore()
    hot = list(range(10))
    for key in hot:
        store.set(key, key)
        store.get(key)
    # A long scan of keys seen once: none of the hot keys, seen again, may go.
    for i in range(1000, 1500):
        if len(store) >= 20:
            store.evict()
        store.set(i, i)
        for key in hot:
            assert store.get(key) == key


def test_scan_resistance_beats_lru() -> None:
    hot = [i % 50 for i in range(2000)]
    trace: list[int] = []
    for start in range(0, 2000, 100):
        trace.extend(hot[start : start + 100])
        trace.extend(range(10_000 + start * 10, 10_000 + start * 10 + 80))  # a scan
    lru_hits, _ = fill("lru", trace, 60)
    for policy in ("s3fifo", "sieve"):
        hits, _ = fill(policy, trace, 60)
        assert hits > lru_hits, policy


def test_the_default_is_s3fifo_and_unknown_policies_are_refused() -> None:
    assert DEFAULT_POLICY == "s3fifo"
    with pytest.raises(ValueError, match="unknown eviction policy 'arc'"):
        make_store("arc")


def test_sieve_compaction_keeps_every_key_reachable() -> None:
    store = SieveStore()
    for i in range(1000):
        store.set(i, i)
    for i in range(0, 1000, 2):
        store.pop(i)
    for i in range(1, 1000, 2):
        assert store.get(i) == i
    remaining = set()
    while (victim := store.evict()) is not None:
        remaining.add(victim[0])
    assert remaining == set(range(1, 1000, 2))
