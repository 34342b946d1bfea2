"""What a `/metrics` scrape costs at 1,000 and 10,000 series, before and after (issue 17).

For each size, the profiler is filled with per-route series (each one is
about 31 exposed series: 19 buckets, count, sum, four counters, six phases)
until the scrape holds at least that many lines, and then:

- render: one uncached scrape through the exporter (`render()`), median of runs;
- loop blocked: the longest the event loop went without running another
  task during that scrape (a 1 ms ticker runs beside it);
- cached: a scrape inside `cache_seconds` of another (after only).

"before" is the exporter as it was on main before this change, imported from
a `git archive` of ``--before`` (default: the commit named below) with the
same script; "after" is this checkout. Both in the same run, on the same
machine (the shared development machine: compare rows of one run).

    ./run bench metrics_scrape [--sizes 1000 10000] [--repeats 5] [--before REF]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BEFORE = "81917ee"  # main just before the declared families and the scrape cache
ROOT = Path(__file__).resolve().parent.parent
LINES_PER_SERIES = 31


async def _ticker(state: dict[str, Any]) -> None:
    """Sleeps 1 ms at a time and keeps the longest overshoot: how long the loop was blocked."""
    while not state["done"]:
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        state["lag"] = max(state["lag"], time.perf_counter() - t0 - 0.001)


async def measure(size: int, repeats: int) -> dict[str, Any]:
    from overdrive import Overdrive

    host = Overdrive(
        {
            "plugins": ["profiler", "prometheus"],
            "profiler": {"max_series": size},
            "prometheus": {"include_default_registry": False},
        }
    )
    await host.initialize()
    try:
        metrics = host.get_plugin("profiler").metrics
        statuses = (200, 404, 500, 302)
        i = 0
        while len(metrics.series) * LINES_PER_SERIES < size:
            series = metrics.get(f"/r{i // 8}/{{id}}", ("GET", "POST")[i % 2], statuses[i % 4])
            for k in range(20):
                series.histogram.record(0.0005 * (1 + (i * 7 + k) % 2000))
                series.count += 1
            i += 1
        exporter = host.get_plugin("prometheus").exporter
        cache = getattr(exporter, "cache", None)
        renders, blocked = [], []
        for _ in range(repeats):
            if cache is not None:
                cache.clear()
            state = {"lag": 0.0, "done": False}
            tick = asyncio.create_task(_ticker(state))
            await asyncio.sleep(0.005)
            state["lag"] = 0.0
            t0 = time.perf_counter()
            body, _ = await exporter.render()
            renders.append(time.perf_counter() - t0)
            state["done"] = True
            await tick
            blocked.append(state["lag"])
        lines = sum(1 for line in body.decode().splitlines() if line and line[0] != "#")
        cached = None
        if cache is not None:
            await exporter.render()
            t0 = time.perf_counter()
            for _ in range(100):
                await exporter.render()
            cached = (time.perf_counter() - t0) / 100
        return {
            "size": size,
            "lines": lines,
            "render_ms": statistics.median(renders) * 1e3,
            "render_min_ms": min(renders) * 1e3,
            "render_max_ms": max(renders) * 1e3,
            "blocked_ms": statistics.median(blocked) * 1e3,
            "cached_ms": cached * 1e3 if cached is not None else None,
        }
    finally:
        await host.cleanup()


def run_before(ref: str, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """This script against a `git archive` of `ref`, laid out as the installed package."""
    tmp = Path(tempfile.mkdtemp(prefix="overdrive-before-"))
    tree = tmp / "tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    pkg = tmp / "site" / "overdrive"
    pkg.mkdir(parents=True)
    for f in (tree / "core").iterdir():
        (pkg / f.name).symlink_to(f)
    for d in ("middleware", "plugins", "contrib"):
        (pkg / d).symlink_to(tree / d)
    env = {**os.environ, "PYTHONPATH": str(tmp / "site")}
    args = [
        sys.executable,
        __file__,
        "--json",
        "--repeats",
        str(repeats),
        "--sizes",
        *map(str, sizes),
    ]
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp)
    if out.returncode:
        raise RuntimeError(f"the before run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    after = [asyncio.run(measure(size, args.repeats)) for size in args.sizes]
    if args.json:
        print(json.dumps(after))
        return
    before = run_before(args.before, args.sizes, args.repeats)
    print(f"/metrics scrape cost (median of {args.repeats}; before = {args.before})")
    head = f"{'series':>8} {'lines':>7}  {'variant':<7} {'render ms':>10}"
    print(f"{head} {'loop blocked ms':>16} {'cached ms':>10}")
    for b, a in zip(before, after, strict=True):
        for name, row in (("before", b), ("after", a)):
            cached = f"{row['cached_ms']:.3f}" if row["cached_ms"] is not None else "-"
            print(
                f"{row['size']:>8} {row['lines']:>7}  {name:<7} {row['render_ms']:>10.2f} "
                f"{row['blocked_ms']:>16.2f} {cached:>10}"
            )
        print(
            f"{'':>8} {'':>7}  ratio   render {b['render_ms'] / a['render_ms']:.1f}x cheaper, "
            f"loop blocked {b['blocked_ms'] / max(a['blocked_ms'], 1e-6):.1f}x less, "
            f"cached scrape {b['render_ms'] / a['cached_ms']:.0f}x cheaper"
        )


if __name__ == "__main__":
    main()
