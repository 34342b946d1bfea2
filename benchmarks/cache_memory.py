"""What the cache's memory bounds cost in resident memory, measured (issue 15).

    ./run bench cache_memory          (BENCH_URLS=100000 by default)

1. Byte budget: 100,000 unique URLs through the middleware with the cache
   plugin, `max_bytes` = 16 MiB, `max_entries` out of the way; the process's
   RSS growth beside what the tier reports (`memory.bytes`), at 40-byte and
   1.8 KB URLs. Each length runs in a fresh interpreter; RSS is read after a
   warm-up of 2,000 requests (so the interpreter's own growth is not counted)
   and at the end, after a garbage collection. The goal: growth within 1.5x
   of `max_bytes`.
2. Single-flight memory: a 32 MiB streamed response (64 KiB chunks) with
   `max_entry_bytes` = 1 MiB, a leader and 4 followers, one of which reads
   slowly: the most bytes the flight held at once, and RSS growth. Followers
   that would make it hold more than the bound are cut loose (see
   docs/plugins/cache.md, single-flight).

The bare app holds nothing, so its own growth is the baseline row. The
figures are RSS, so the allocator's slack counts too; run on a quiet machine
for tight numbers (ranges over runs are in docs/plugins/cache.md).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from typing import Any

N = int(os.environ.get("BENCH_URLS", "100000"))
MAX_BYTES = 16 * 2**20
BODY = b"x" * 200


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"cache-control", b"max-age=3600"), (b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


async def get(entry: Any, path: str) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench.example"), (b"accept", b"*/*")],
        "server": ("bench.example", 80),
        "client": ("127.0.0.1", 1234),
    }
    await entry(scope, receive, send)


async def budget(url_len: int, cached: bool) -> dict[str, Any]:
    from overdrive.middleware import OverdriveMiddleware

    config: dict[str, Any] = {"plugins": ["cache"] if cached else []}
    config["cache"] = {"max_bytes": MAX_BYTES, "max_entries": 10_000_000}
    entry = OverdriveMiddleware(app, config=config)
    await entry.host.initialize()

    def path(i: int) -> str:
        head = f"/v/{i:09d}/"
        return head + "a" * max(url_len - len(head), 0)

    for i in range(2000):
        await get(entry, path(10_000_000 + i))
    gc.collect()
    before = rss()
    for i in range(N):
        await get(entry, path(i))
    gc.collect()
    grown = rss() - before
    out: dict[str, Any] = {"url_len": url_len, "cached": cached, "rss_growth": grown}
    plugin = entry.host.get_plugin("cache")
    if plugin is not None:
        mem = plugin.cache.memory
        out.update(tier_bytes=mem.bytes, entries=len(mem))
    await entry.host.cleanup()
    return out


async def flight_memory() -> dict[str, Any]:
    from overdrive.middleware import OverdriveMiddleware
    from overdrive.plugins.cache import flight as flight_module

    size = 65536
    chunks = 32 * 2**20 // size
    release = asyncio.Event()
    peak = {"held": 0, "cut": 0}

    async def big(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"cache-control", b"max-age=60")],
            }
        )
        await release.wait()
        for _ in range(chunks):
            body = b"y" * size  # a new object each time, as a real app's chunks are
            await send({"type": "http.response.body", "body": body, "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})

    original = flight_module.Flight.feed

    def feed(self: Any, body: bytes, more: bool) -> None:
        original(self, body, more)
        peak["held"] = max(peak["held"], sum(map(len, self.chunks)))
        peak["cut"] = getattr(self, "cut_loose", 0)

    flight_module.Flight.feed = feed  # type: ignore[method-assign]
    config = {"plugins": ["cache"], "cache": {"max_entry_bytes": 2**20}}
    entry = OverdriveMiddleware(big, config=config)
    await entry.host.initialize()
    received = [0] * 5

    async def client(n: int, slow: bool) -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                received[n] += len(message.get("body", b""))
                if slow:
                    await asyncio.sleep(0.002)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/big",
            "raw_path": b"/big",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"bench.example")],
            "server": ("bench.example", 80),
            "client": ("127.0.0.1", 1234),
        }
        await entry(scope, receive, send)

    gc.collect()
    before = rss()
    top = {"rss": before}

    async def sample() -> None:
        while True:
            top["rss"] = max(top["rss"], rss())
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    tasks = [asyncio.ensure_future(client(0, False))]
    await asyncio.sleep(0.05)
    tasks += [asyncio.ensure_future(client(n, n == 4)) for n in range(1, 5)]
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    sampler.cancel()
    await entry.host.cleanup()
    return {
        "body": chunks * size,
        "max_entry_bytes": 2**20,
        "peak_held": peak["held"],
        "peak_rss_growth": top["rss"] - before,
        "received": received,
        "cut_loose": peak["cut"],
    }


def child(kind: str, arg: str) -> None:
    if kind == "budget":
        length, cached = arg.split(",")
        result = asyncio.run(budget(int(length), cached == "1"))
    else:
        result = asyncio.run(flight_memory())
    print(json.dumps(result))


def run(kind: str, arg: str = "") -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, arg],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def mib(n: int) -> str:
    return f"{n / 2**20:7.1f} MiB"


def main() -> None:
    print(f"byte budget: {N:,} unique URLs, max_bytes = {mib(MAX_BYTES).strip()}")
    print(f"{'URL':>6}  {'config':<14}{'RSS growth':>12}{'tier reports':>14}{'entries':>9}  ratio")
    for length in (40, 1800):
        bare = run("budget", f"{length},0")
        print(f"{length:>6}  {'bare app':<14}{mib(bare['rss_growth']):>12}")
        got = run("budget", f"{length},1")
        ratio = got["rss_growth"] / MAX_BYTES
        print(
            f"{length:>6}  {'cache plugin':<14}{mib(got['rss_growth']):>12}"
            f"{mib(got['tier_bytes']):>14}{got['entries']:>9,}  {ratio:.2f}x max_bytes"
        )
    f = run("flight")
    print()
    print(
        f"single-flight: {mib(f['body']).strip()} streamed, max_entry_bytes "
        f"{mib(f['max_entry_bytes']).strip()}, 1 leader + 4 followers (1 slow)"
    )
    print(f"  most bytes the flight held at once: {mib(f['peak_held']).strip()}")
    print(f"  peak RSS growth: {mib(f['peak_rss_growth']).strip()}")
    print(f"  bytes each client received: {f['received']} (cut loose: {f['cut_loose']})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
    else:
        main()
