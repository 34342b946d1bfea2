"""Per-call cost of circuit breakers and retry policies, and time to reject while open.

    ./run bench resilience            (or: .venv/bin/python benchmarks/resilience.py)

Same process, same coroutine, same loop: a bare ``await fn()`` against our
`CircuitBreaker` and `RetryPolicy`, and the libraries a user would otherwise
pick (pybreaker, purgatory, aiobreaker; tenacity, stamina). Peers are skipped
with a note when not installed (``pip install -e .[bench]``). Best of 5 runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from overdrive.plugins.resilience import (
    CircuitBreaker,
    CircuitBreakerConfig,
    RetryPolicy,
)


async def work() -> int:
    return 1


def sync_work() -> int:
    return 1


async def down() -> None:
    raise ConnectionError("down")


async def measure(step: Callable[[], Awaitable[Any]], n: int, repeat: int = 5) -> float:
    """Best microseconds per call of ``await step()`` over `repeat` runs of `n` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = perf_counter()
        for _ in range(n):
            await step()
        best = min(best, (perf_counter() - t0) / n)
    return best * 1e6


async def rejecting(call: Callable[[], Awaitable[Any]]) -> None:
    with contextlib.suppress(Exception):
        await call()


def peers_breakers() -> dict[str, tuple[Callable[[], Awaitable[Any]], Any]]:
    """name -> (successful call, a function that opens the breaker and returns a call)."""
    out: dict[str, Any] = {}
    try:
        import pybreaker

        pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)

        async def pb_call() -> Any:
            return pb.call(sync_work)  # its async path (call_async) needs tornado

        async def pb_open() -> Callable[[], Awaitable[Any]]:
            opened = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=60)
            with contextlib.suppress(Exception):
                opened.call(lambda: 1 / 0)

            async def call() -> Any:
                return opened.call(sync_work)

            return call

        out["pybreaker 1.x (sync call)"] = (pb_call, pb_open)
    except ImportError:
        print("# pybreaker not installed")
    try:
        from purgatory import AsyncCircuitBreakerFactory

        factory = AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)

        async def pg_call() -> Any:
            async with await factory.get_breaker("bench"):
                return await work()

        async def pg_open() -> Callable[[], Awaitable[Any]]:
            f2 = AsyncCircuitBreakerFactory(default_threshold=1, default_ttl=60)
            with contextlib.suppress(Exception):
                async with await f2.get_breaker("open"):
                    await down()

            async def call() -> Any:
                async with await f2.get_breaker("open"):
                    return await work()

            return call

        out["purgatory"] = (pg_call, pg_open)
    except ImportError:
        print("# purgatory not installed")
    try:
        import aiobreaker

        ab = aiobreaker.CircuitBreaker(fail_max=5)

        async def ab_call() -> Any:
            return await ab.call_async(work)

        async def ab_open() -> Callable[[], Awaitable[Any]]:
            b2 = aiobreaker.CircuitBreaker(fail_max=1)
            with contextlib.suppress(Exception):
                await b2.call_async(down)

            async def call() -> Any:
                return await b2.call_async(work)

            return call

        out["aiobreaker"] = (ab_call, ab_open)
    except ImportError:
        print("# aiobreaker not installed")
    return out


def peers_retries() -> dict[str, Callable[[], Awaitable[Any]]]:
    out: dict[str, Any] = {}
    try:
        import tenacity

        @tenacity.retry(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_random_exponential()
        )
        async def tn() -> int:
            return await work()

        out["tenacity"] = tn
    except ImportError:
        print("# tenacity not installed")
    try:
        import stamina

        @stamina.retry(on=ConnectionError, attempts=3)
        async def st() -> int:
            return await work()

        out["stamina"] = st
    except ImportError:
        print("# stamina not installed")
    return out


async def main(n: int) -> None:
    bare = await measure(work, n)
    ours = CircuitBreaker("bench", CircuitBreakerConfig(failure_threshold=5))
    rows: list[tuple[str, float, float | None]] = [("bare await", bare, None)]
    rows.append(("overdrive CircuitBreaker", await measure(lambda: ours.call(work), n), None))
    slow_cfg = CircuitBreakerConfig(
        failure_rate_threshold=50, sliding_window_type="time", slow_call_duration=1.0
    )
    timed = CircuitBreaker("bench-time", slow_cfg)
    rows.append(
        (
            "overdrive CircuitBreaker (time window, slow calls)",
            await measure(lambda: timed.call(work), n),
            None,
        )
    )
    opened = CircuitBreaker("open", CircuitBreakerConfig(failure_threshold=1))
    with contextlib.suppress(ConnectionError):
        await opened.call(down)
    reject_ours = await measure(lambda: rejecting(lambda: opened.call(work)), n)
    rows[1] = (rows[1][0], rows[1][1], reject_ours)
    for name, (call, opener) in peers_breakers().items():
        open_call = await opener()
        rows.append(
            (name, await measure(call, n), await measure(lambda c=open_call: rejecting(c), n))
        )

    print(f"\n## Circuit breakers: one successful call (n={n}, best of 5)\n")
    print("| breaker | us per call | x bare | us to reject while open |")
    print("|---|---:|---:|---:|")
    for name, us, rej in rows:
        rej_text = f"{rej:.2f}" if rej is not None else "-"
        print(f"| {name} | {us:.2f} | {us / bare:.1f} | {rej_text} |")

    policy = RetryPolicy(attempts=3)
    retry_rows = [
        ("bare await", bare),
        ("overdrive RetryPolicy.call", await measure(lambda: policy.call(work), n)),
    ]
    for name, fn in peers_retries().items():
        retry_rows.append((name, await measure(fn, n)))
    print(f"\n## Retry policies: one successful call (n={n}, best of 5)\n")
    print("| retry | us per call | x bare |")
    print("|---|---:|---:|")
    for name, us in retry_rows:
        print(f"| {name} | {us:.2f} | {us / bare:.1f} |")

    fail_policy = RetryPolicy(attempts=2, wait_initial=0, wait_max=0)
    error = ConnectionError()
    t0 = perf_counter()
    for _ in range(n // 10):
        fail_policy.next_delay(error, 1, 0.0)
    decide = (perf_counter() - t0) / (n // 10) * 1e6
    print(f"\nOn a failure, our policy's decision (tenacity's strategies) costs {decide:.1f} us.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20000, help="calls per run")
    asyncio.run(main(parser.parse_args().n))
