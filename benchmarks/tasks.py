"""A burst of background jobs: time to drain and workers over time, auto-scaler vs fixed pools.

    ./run bench tasks [--jobs 400] [--job-ms 20]

Each job awaits `job_ms` (an I/O-bound call: a render request to a GPU
service, an upload). A burst of `jobs` arrives at t=0, then nothing for a few
seconds, then a small second burst. Compared, in one run:

- bare asyncio: `asyncio.gather` under a semaphore of max_workers (what one
  writes without a processor: fast, but unbounded queue, nothing counted)
- BackgroundTaskProcessor fixed at min_workers
- BackgroundTaskProcessor fixed at max_workers
- BackgroundTaskProcessor sized by AutoScaler between min and max

"worker-s" is the integral of the worker count over the whole run (what the
pool holds: connections, memory, GPU slots); the auto-scaler aims at the
drain time of the max pool for far fewer worker-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import structlog

from overdrive.plugins.tasks import AutoScaler, BackgroundTaskProcessor, ScalingConfig

MIN, MAX = 2, 16
SAMPLE = 0.1


async def job(seconds: float, done: list[float]) -> None:
    await asyncio.sleep(seconds)
    done.append(time.perf_counter())


async def sample(get_workers: Any, samples: list[tuple[float, int]], t0: float) -> None:
    while True:
        samples.append((time.perf_counter() - t0, get_workers()))
        await asyncio.sleep(SAMPLE)


def worker_seconds(samples: list[tuple[float, int]]) -> float:
    return sum(n * SAMPLE for _, n in samples)


async def run_processor(
    kind: str, jobs: int, job_s: float, idle_s: float, second: int
) -> dict[str, Any]:
    if kind.startswith("auto"):
        processor = BackgroundTaskProcessor(max_workers=MIN, queue_size=jobs * 2)
        config = ScalingConfig(
            min_workers=MIN,
            max_workers=MAX,
            check_interval=0.1,
            scale_up_cooldown=0.2,
            scale_down_cooldown=0.5,
            scale_down_step=1 if kind == "auto" else None,
        )
        scaler: AutoScaler | None = AutoScaler(config, processor)
        await scaler.start()
    else:
        n = MIN if kind == "min" else MAX
        processor = BackgroundTaskProcessor(max_workers=n, queue_size=jobs * 2)
        scaler = None
        await processor.start()
    done: list[float] = []
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    sampler = asyncio.ensure_future(sample(lambda: processor.workers, samples, t0))
    for _ in range(jobs):
        await processor.add_task(job, job_s, done)
    await processor.join()
    drain = time.perf_counter() - t0
    await asyncio.sleep(idle_s)
    t1 = time.perf_counter()
    for _ in range(second):
        await processor.add_task(job, job_s, done)
    await processor.join()
    drain2 = time.perf_counter() - t1
    await asyncio.sleep(1.0)
    sampler.cancel()
    if scaler is not None:
        await scaler.stop()
    await processor.stop()
    assert len(done) == jobs + second
    return {
        "drain": drain,
        "drain2": drain2,
        "worker_s": worker_seconds(samples),
        "peak": max(n for _, n in samples),
        "samples": samples,
    }


async def run_bare(jobs: int, job_s: float, idle_s: float, second: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(MAX)
    done: list[float] = []

    async def limited() -> None:
        async with sem:
            await job(job_s, done)

    t0 = time.perf_counter()
    await asyncio.gather(*(limited() for _ in range(jobs)))
    drain = time.perf_counter() - t0
    await asyncio.sleep(idle_s)
    t1 = time.perf_counter()
    await asyncio.gather(*(limited() for _ in range(second)))
    drain2 = time.perf_counter() - t1
    total = drain + idle_s + drain2 + 1.0
    return {"drain": drain, "drain2": drain2, "worker_s": MAX * total, "peak": MAX, "samples": []}


def timeline(samples: list[tuple[float, int]], every: float = 0.5) -> str:
    out, next_t = [], 0.0
    for t, n in samples:
        if t >= next_t:
            out.append(f"{n:>2}")
            next_t += every
    return " ".join(out)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--job-ms", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--second", type=int, default=40)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    job_s = args.job_ms / 1000
    print(
        f"burst of {args.jobs} jobs of {args.job_ms:g} ms, {args.idle:g} s idle, then "
        f"{args.second} more; min_workers={MIN}, max_workers={MAX}\n"
    )
    results = {
        "bare asyncio (gather + semaphore, max)": await run_bare(
            args.jobs, job_s, args.idle, args.second
        ),
        f"processor fixed at min ({MIN})": await run_processor(
            "min", args.jobs, job_s, args.idle, args.second
        ),
        f"processor fixed at max ({MAX})": await run_processor(
            "max", args.jobs, job_s, args.idle, args.second
        ),
        f"AutoScaler ({MIN}..{MAX}), down 1 at a time": await run_processor(
            "auto", args.jobs, job_s, args.idle, args.second
        ),
        f"AutoScaler ({MIN}..{MAX}), down by HPA rule": await run_processor(
            "auto-hpa", args.jobs, job_s, args.idle, args.second
        ),
    }
    ref = results[f"processor fixed at max ({MAX})"]
    head = (
        f"{'pool':<40} {'drain s':>8} {'x max':>6} {'2nd s':>7} {'peak':>5} "
        f"{'worker-s':>9} {'x max':>6}"
    )
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        print(
            f"{name:<40} {r['drain']:>8.3f} {r['drain'] / ref['drain']:>6.2f} "
            f"{r['drain2']:>7.3f} {r['peak']:>5} {r['worker_s']:>9.1f} "
            f"{r['worker_s'] / ref['worker_s']:>6.2f}"
        )
    print("\nworkers over time (one sample every 0.5 s from the first job):")
    for name, r in results.items():
        if r["samples"]:
            print(f"{name:<40} {timeline(r['samples'])}")


if __name__ == "__main__":
    asyncio.run(main())
