"""What building a host (and so an `OverdriveMiddleware`) costs, first and later in a process.

Prints milliseconds per build for: no plugins, the observability set, and every
built-in plugin (the entry points of the `overdrive` distribution), as the first
build in the process (it reads the installed-package metadata and imports the
plugins) and the median and range of the builds after it. Beside them, the
same builds with the discovery cache dropped before each one
(`overdrive.discovery.forget()`): what every build cost before it was cached.
Times are this thread's CPU time (`time.thread_time`), which a shared, busy
machine inflates far less than wall time; the wall-time median is printed too.

    ./run bench host_build [--builds N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

from overdrive import Overdrive
from overdrive.discovery import discover, forget

OBSERVABILITY = ["access_log", "profiler", "prometheus", "stats"]


WALL: list[float] = []


def build(plugins: list[str]) -> float:
    w0 = time.perf_counter()
    t0 = time.thread_time()
    Overdrive({"plugins": plugins}, env={})
    cpu = (time.thread_time() - t0) * 1e3
    WALL.append((time.perf_counter() - w0) * 1e3)
    return cpu


def row(label: str, first: float, later: list[float]) -> str:
    wall = statistics.median(WALL[-len(later) :])
    return (
        f"{label:<34} {first:>9.2f} {statistics.median(later):>9.2f} "
        f"{min(later):>7.2f}-{max(later):<7.2f} {wall:>9.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=50)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # stats warns that it has no token, once per build

    t0 = time.perf_counter()
    builtin = sorted(n for n, d in discover().items() if d.distribution == "overdrive")
    first_discover = (time.perf_counter() - t0) * 1e3
    sets: list[tuple[str, list[str]]] = [
        ("no plugins", []),
        (f"observability ({len(OBSERVABILITY)})", OBSERVABILITY),
        (f"every built-in plugin ({len(builtin)})", builtin),
    ]
    print(f"host build, CPU ms ({args.builds} builds after the first; median, range)")
    print(f"first discover() in the process: {first_discover:.2f} ms")
    print(f"{'':<34} {'first':>9} {'median':>9} {'range':>15} {'wall med':>9}")
    results: dict[str, Any] = {}
    for label, plugins in sets:
        first = build(plugins)
        later = [build(plugins) for _ in range(args.builds)]
        results[label] = statistics.median(later)
        print(row(label, first, later))
    print("without the discovery cache (forget() before each build):")
    for label, plugins in sets:
        uncached = []
        for _ in range(max(5, args.builds // 5)):
            forget()
            uncached.append(build(plugins))
        print(row(label, uncached[0], uncached))
    every = results[sets[-1][0]]
    print(f"every built-in plugin, after the first: {every:.2f} ms (goal: under 2 ms)")


if __name__ == "__main__":
    main()
