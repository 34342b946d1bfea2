"""A cold worker whose first traffic is a burst (for test_ratelimit_scaleout; not a test).

    python -m tests.plugins.resilience.ratelimit_burst URL PREFIX HITS GO_FILE

Waits until GO_FILE exists (so that every process bursts at once), sends HITS
concurrent hits against "100/minute" and prints how many were allowed.
"""

from __future__ import annotations

import asyncio
import os
import sys

import limits

from overdrive.plugins.resilience import RateLimiter


async def main(url: str, prefix: str, hits: int, go: str) -> None:
    limiter = RateLimiter("fixed-window", url, key_prefix=prefix)
    items = limits.parse_many("100/minute")
    while not os.path.exists(go):
        await asyncio.sleep(0.005)
    results = await asyncio.gather(*(limiter.hit(items, "b", "client") for _ in range(hits)))
    print(sum(1 for r in results if r[0]), limiter.errors, flush=True)
    await limiter.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
