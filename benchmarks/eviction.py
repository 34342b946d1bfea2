"""Hit rates of the memory tier's eviction policies on real and synthetic traces.

    ./run bench eviction            (about half a minute on 2 cores)

Replays the CloudPhysics block I/O trace (shared/traces/cloudPhysicsIO.txt,
from libCacheSim) and synthetic traces (Zipf at several skews, a scan-heavy
mix, a loop slightly larger than the cache) at several cache sizes (a share of
the distinct objects), and prints, in one run, the hit rate of each of our
policies beside `cachetools.LRUCache` and Belady's offline optimum (MIN), which
is the limit any policy can reach on that trace. All objects count as size 1.
"""

from __future__ import annotations

import heapq
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from overdrive.plugins.cache.policies import POLICIES

ROOT = Path(__file__).resolve().parent.parent
TRACE_CANDIDATES = [
    ROOT / "shared/traces/cloudPhysicsIO.txt",
    ROOT.parent / "shared/traces/cloudPhysicsIO.txt",
]
TRACE_CANDIDATES.append(Path("/work/shared/traces/cloudPhysicsIO.txt"))
SIZES = (0.01, 0.05, 0.10, 0.25)
LOOP_SIZES = (0.25, 0.5, 0.8, 0.95)
ORDER = ("lru", "ttl", "sieve", "s3fifo")


def load_real() -> list[int] | None:
    for path in TRACE_CANDIDATES:
        if path.exists():
            return [int(line) for line in path.read_text().split()]
    return None


def zipf(n_objects: int, n_requests: int, alpha: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (i**alpha) for i in range(1, n_objects + 1)]
    ids = list(range(n_objects))
    rng.shuffle(ids)  # popularity is not correlated with the id
    return rng.choices(ids, weights=weights, k=n_requests)


def scan_mix(n_requests: int, seed: int) -> list[int]:
    """A Zipf(0.9) working set interrupted by long one-time scans (a crawler, a backup)."""
    rng = random.Random(seed)
    hot = zipf(5_000, n_requests, 0.9, seed)
    out: list[int] = []
    next_scan_id = 1_000_000
    i = 0
    while len(out) < n_requests:
        if rng.random() < 0.002:  # a scan of 2,000 never-again objects
            out.extend(range(next_scan_id, next_scan_id + 2_000))
            next_scan_id += 2_000
        else:
            out.append(hot[i % len(hot)])
            i += 1
    return out[:n_requests]


def loop(n_objects: int, n_requests: int) -> list[int]:
    return [i % n_objects for i in range(n_requests)]


def replay(policy: str, trace: list[int], capacity: int) -> float:
    store = POLICIES[policy]()
    get, put, evict = store.get, store.set, store.evict
    hits = 0
    for key in trace:
        if get(key) is not None:
            hits += 1
            continue
        if len(store) >= capacity:
            evict()
        put(key, True)
    return hits / len(trace)


def replay_cachetools(trace: list[int], capacity: int) -> float:
    from cachetools import LRUCache

    cache: LRUCache[int, bool] = LRUCache(maxsize=capacity)
    hits = 0
    for key in trace:
        if cache.get(key) is not None:
            hits += 1
        else:
            cache[key] = True
    return hits / len(trace)


def belady(trace: list[int], capacity: int) -> float:
    """Belady's MIN: evict the object whose next use is farthest in the future."""
    n = len(trace)
    next_use = [0] * n
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(trace[i], n + i)
        last[trace[i]] = i
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), lazily invalidated
    hits = 0
    for i, key in enumerate(trace):
        nxt = next_use[i]
        if key in cached:
            hits += 1
        elif len(cached) >= capacity:
            while True:
                neg, victim = heapq.heappop(heap)
                if cached.get(victim) == -neg:
                    del cached[victim]
                    break
        cached[key] = nxt
        heapq.heappush(heap, (-nxt, key))
    return hits / n


def main() -> None:
    try:
        import cachetools  # noqa: F401
    except ImportError:
        sys.exit("needs the bench extra: ./run bench eviction installs it")
    traces: list[tuple[str, list[int], tuple[float, ...]]] = []
    real = load_real()
    if real is not None:
        traces.append(("cloudPhysics", real, SIZES))
    else:
        print("(shared/traces/cloudPhysicsIO.txt not found: real trace skipped)")
    for alpha in (0.6, 0.8, 1.0, 1.2):
        traces.append((f"zipf a={alpha}", zipf(20_000, 100_000, alpha, seed=7), SIZES))
    traces.append(("scan-heavy", scan_mix(100_000, seed=11), SIZES))
    # A loop only rewards a cache close to its length: sizes near the loop's.
    traces.append(("loop", loop(6_000, 60_000), LOOP_SIZES))

    columns: list[tuple[str, Callable[[list[int], int], float]]] = [
        *((p, lambda t, c, p=p: replay(p, t, c)) for p in ORDER),
        ("cachetools", replay_cachetools),
        ("belady", belady),
    ]
    header = f"{'trace':<14}{'size':>6}{'objs':>7} " + "".join(f"{n:>11}" for n, _ in columns)
    print("hit rate (higher is better); size = share of distinct objects")
    print(header + f"{'best-lru':>10}{'gap-belady':>11}")
    print("-" * (len(header) + 21))
    t0 = time.perf_counter()
    wins = {p: 0 for p in ORDER}
    rows = 0
    for name, trace, sizes in traces:
        distinct = len(set(trace))
        for share in sizes:
            capacity = max(2, int(distinct * share))
            results = {n: fn(trace, capacity) for n, fn in columns}
            ours = {p: results[p] for p in ORDER}
            best = max(ours.values())
            for p in ORDER:
                wins[p] += ours[p] >= results["lru"] - 1e-9
            rows += 1
            default = results["s3fifo"]
            cells = "".join(f"{results[n]:>11.4f}" for n, _ in columns)
            print(
                f"{name:<14}{share:>6.0%}{capacity:>7} {cells}"
                f"{best - results['lru']:>+10.4f}{results['belady'] - default:>11.4f}"
            )
    print("-" * (len(header) + 21))
    print(
        "rows where the policy is at or above LRU: "
        + ", ".join(f"{p} {wins[p]}/{rows}" for p in ORDER)
    )
    print("gap-belady = Belady's hit rate minus s3fifo's (the default's)")
    if real is not None:
        distinct = len(set(real))
        cap = int(distinct * 0.10)
        print(
            "check vs libCacheSim (cloudPhysics, 10%): miss ratio "
            f"lru {1 - replay('lru', real, cap):.3f} (published 0.805), "
            f"s3fifo {1 - replay('s3fifo', real, cap):.3f} (0.755), "
            f"belady {1 - belady(real, cap):.3f} (0.629)"
        )
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
