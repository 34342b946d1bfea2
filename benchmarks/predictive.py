"""Predictive prefetching: hit rate without and with prediction, on two traces.

- structured: sessions over 500 keys; after key k comes its successor s(k) with
  probability 0.8, else a random key (known transition structure).
- random: every request a uniformly random key (nothing to learn).

The cache holds 100 entries (20% of the keys); each miss calls the loader.
Between requests the client "thinks" (the event loop runs the prefetches).
Printed: hit rate without/with prediction, prefetches issued and the share of
them that was used, and the extra loader calls prediction cost.

    ./run bench predictive
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overdrive.plugins.predictive import PredictiveCache

KEYS = 500
LENGTH = 20_000
CACHE = 100


def structured_trace(rng: random.Random) -> list[str]:
    successor = list(range(KEYS))
    rng.shuffle(successor)
    out: list[str] = []
    k = rng.randrange(KEYS)
    while len(out) < LENGTH:
        if len(out) % 10 == 0:  # a new session starts somewhere
            k = rng.randrange(KEYS)
        out.append(f"page:{k}")
        k = successor[k] if rng.random() < 0.8 else rng.randrange(KEYS)
    return out


def random_trace(rng: random.Random) -> list[str]:
    return [f"page:{rng.randrange(KEYS)}" for _ in range(LENGTH)]


async def replay(trace: list[str], predict: bool) -> dict[str, float]:
    calls = 0

    async def loader(key: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return f"value of {key}"

    pc = PredictiveCache(CACHE, prefetch=predict, prefetch_per_second=1e6)
    pc.register_loader(loader, prefix="page:")
    for key in trace:
        await pc.get(key)
        for _ in range(3):  # think time: prefetches run
            await asyncio.sleep(0)
    await pc.close()
    s = pc.stats()
    return {
        "hit_rate": s["hits"] / (s["hits"] + s["misses"]),
        "loader_calls": calls,
        "issued": s["prefetch"]["issued"],
        "used": s["prefetch"]["used"],
        "precision": s["model"]["precision"] or 0.0,
    }


async def main() -> None:
    rng = random.Random(7)
    traces = {"structured": structured_trace(rng), "random": random_trace(rng)}
    print(f"{LENGTH} requests over {KEYS} keys, cache of {CACHE} entries\n")
    header = (
        f"{'trace':<11} {'hit rate off':>12} {'hit rate on':>11} {'gain':>7} "
        f"{'prefetches':>10} {'used':>7} {'wasted':>7} {'extra loads':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, trace in traces.items():
        off = await replay(trace, predict=False)
        on = await replay(trace, predict=True)
        issued = on["issued"]
        used_share = on["used"] / issued if issued else 0.0
        wasted = issued - on["used"]
        extra = on["loader_calls"] - off["loader_calls"]
        print(
            f"{name:<11} {off['hit_rate']:>12.1%} {on['hit_rate']:>11.1%} "
            f"{on['hit_rate'] - off['hit_rate']:>+7.1%} {issued:>10} {used_share:>7.1%} "
            f"{wasted / LENGTH:>7.2%} {extra:>+11}"
        )
    print(
        "\nwasted: unused prefetches per request; extra loads: loader calls with "
        "prediction minus without (a used prefetch replaces a miss's load)."
    )


if __name__ == "__main__":
    asyncio.run(main())
