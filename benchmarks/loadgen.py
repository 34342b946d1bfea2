"""`overdrive load` against wrk on the same cached endpoint, same connection count, one run.

Why: a load generator that is slower than the service measures itself. Two
targets, each one uvicorn worker in its own process, driven in turns by wrk
(Debian's `wrk`) and by `overdrive load` (contrib/load.py, its aiohttp client),
interleaved, with each run's req/s, our share of wrk's, and each client's CPU
time per request (which a busy, shared machine disturbs less than the rates):

- `video`: the reference service with every plugin on (`./run demo`'s app),
  `GET /api/videos/1/thumbnail`, a cache hit: the endpoint `./run load` drives.
  Goal: `overdrive load` at 80 % of wrk or more.
- `minimal`: a Starlette app whose only plugin is the cache, one cached
  endpoint: the cheapest answer a server can give, so the client's own cost
  shows most.

    ./run bench loadgen [--seconds S] [--connections C] [--rounds R] [--targets video,minimal]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from overdrive.contrib.load import Endpoint, Profile, run_load

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples.video_service, run from the repository

from examples.video_service.__main__ import free_port, running, service_env  # noqa: E402

TARGETS = {"video": "/api/videos/1/thumbnail", "minimal": "/cached"}


@contextlib.contextmanager
def serve(target: str) -> Iterator[str]:
    if target == "minimal":
        with running("benchmarks._loadgen_app:app", free_port(), {}, "/cached") as base:
            yield base
        return
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loadgen-")))
        stub = stack.enter_context(
            running("examples.video_service.external:app", free_port(), {}, "/control")
        )
        env = service_env(stub, f"sqlite+aiosqlite:///{tmp / 'on.db'}", "loadgen-token")
        yield stack.enter_context(
            running("examples.video_service.app:create_app", free_port(), env, "/health")
        )


def wrk(url: str, seconds: float, connections: int) -> tuple[float, float]:
    """wrk's req/s, and the CPU seconds it used (its own and the kernel's for it)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(match.group(1)), cpu


def ours(
    base: str, path: str, seconds: float, connections: int, client: str = "aiohttp"
) -> tuple[float, float]:
    profile = Profile([Endpoint("cached", path)], duration=seconds, concurrency=connections)
    transport = None
    if client == "httpx":  # the client overdrive load had before (and uses without aiohttp)
        import httpx

        transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=connections))
    t0 = time.process_time()
    result = asyncio.run(run_load(base, profile, transport=transport))
    cpu = time.process_time() - t0
    figures = result.figures()
    return float(figures["throughput"]), cpu / max(1, result.total.requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default="video,minimal")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("loadgen: wrk is not installed (Debian: apt-get install -y wrk)")
    print(
        f"{args.connections} connections, {args.seconds:g} s per run, one uvicorn worker; "
        "wrk -t1 and overdrive load interleaved"
    )
    summary = []
    for target in args.targets.split(","):
        path = TARGETS[target]
        rows = []
        with serve(target) as base:
            ours(base, path, 1.0, args.connections)  # warm-up: the first request fills the cache
            for n in range(1, args.rounds + 1):
                theirs, wrk_cpu = wrk(base + path, args.seconds, args.connections)
                mine, cpu = ours(base, path, args.seconds, args.connections)
                old, old_cpu = ours(base, path, args.seconds, args.connections, "httpx")
                rows.append((theirs, mine, old))
                wrk_us = wrk_cpu / max(1.0, theirs * args.seconds) * 1e6
                print(
                    f"{target:<8} round {n}: wrk {theirs:7.0f} req/s ({wrk_us:3.0f} us CPU/req)  "
                    f"overdrive load {mine:7.0f} req/s ({cpu * 1e6:3.0f} us, ratio "
                    f"{mine / theirs:.2f})  with httpx {old:5.0f} req/s ({old_cpu * 1e6:4.0f} us, "
                    f"ratio {old / theirs:.2f})",
                    flush=True,
                )
        ratios = [m / t for t, m, _ in rows]
        olds = [o / t for t, _, o in rows]
        summary.append(
            f"{target:<8} GET {path}: wrk median {statistics.median(t for t, _, _ in rows):.1f} "
            f"req/s, overdrive load median {statistics.median(m for _, m, _ in rows):.1f} req/s, "
            f"ratio median {statistics.median(ratios):.2f} "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}; with httpx {statistics.median(olds):.2f})"
        )
    print("\n".join(summary))
    print("goal: overdrive load >= 0.80 of wrk on the video service's cached endpoint")


if __name__ == "__main__":
    main()
