"""`AsyncIOOptimizer`: the seed's helpers for bounded concurrency, timeouts and retries.

    optimizer = AsyncIOOptimizer(max_concurrent=10)
    results = await optimizer.batch_process_async(video_ids, process_single)
    result = await optimizer.process_with_timeout(expensive_operation, timeout=30.0)
    result = await optimizer.retry_with_backoff(lambda: call(), max_retries=3, base_delay=1.0)

Thin on purpose: asyncio's Semaphore, TaskGroup and timeout do the work, and
`retry_with_backoff` is a `RetryPolicy` (full jitter, tenacity's strategies).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from overdrive.errors import ConfigError

from .retry import RetryPolicy

__all__ = ["AsyncIOOptimizer", "BatchResults"]


class BatchResults(list[Any]):
    """Results in input order; a failed item holds its exception, also listed in `errors`."""

    errors: list[tuple[int, BaseException]]

    def __init__(self, values: Iterable[Any] = ()) -> None:
        super().__init__(values)
        self.errors = [(i, v) for i, v in enumerate(self) if isinstance(v, BaseException)]

    @property
    def ok(self) -> bool:
        return not self.errors


class AsyncIOOptimizer:
    """Bounded concurrency (`max_concurrent` calls at once), timeouts and retries."""

    def __init__(self, max_concurrent: int = 10) -> None:
        if max_concurrent < 1:
            raise ConfigError(f"max_concurrent: expected >= 1, got {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        self._semaphore = asyncio.Semaphore(max_concurrent)
        self.processed = 0
        self.failed = 0
        self.timeouts = 0
        self.retries = 0

    async def _one(self, fn: Callable[[Any], Awaitable[Any]], item: Any) -> Any:
        async with self._semaphore:
            try:
                result = fn(item)
                if hasattr(result, "__await__"):
                    result = await result
            except Exception as exc:
                self.failed += 1
                return exc
            self.processed += 1
            return result

    async def batch_process_async(
        self, items: Iterable[Any], fn: Callable[[Any], Awaitable[Any]]
    ) -> BatchResults:
        """``fn(item)`` for every item, at most `max_concurrent` at once.

        Returns the results in input order; an item whose call raised holds the
        exception (also in ``.errors``). Cancelling the batch cancels every call.
        """
        items = list(items)
        if not items:
            return BatchResults()
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._one(fn, item)) for item in items]
        return BatchResults(task.result() for task in tasks)

    async def process_with_timeout(
        self, fn: Callable[..., Any] | Awaitable[Any], *args: Any, timeout: float = 30.0
    ) -> Any:
        """Await ``fn(*args)`` (or an awaitable), raising `TimeoutError` after `timeout` s;
        the call is cancelled then."""
        if not timeout > 0:
            raise ValueError(f"timeout: expected > 0, got {timeout!r}")
        awaitable = fn(*args) if callable(fn) else fn
        try:
            async with asyncio.timeout(timeout):
                if hasattr(awaitable, "__await__"):
                    return await awaitable
                return awaitable
        except TimeoutError:
            self.timeouts += 1
            raise

    async def retry_with_backoff(
        self,
        fn: Callable[..., Any],
        max_retries: int = 3,
        base_delay: float = 1.0,
        *,
        max_delay: float = 60.0,
        on: tuple[type[BaseException], ...] | type[BaseException] = Exception,
        timeout: float | None = None,
    ) -> Any:
        """Call `fn()` until it succeeds, at most ``max_retries`` more times, waiting a
        random time in [0, base_delay * 2**n] (capped at `max_delay`) before retry n+1.

        Only exceptions in `on` are retried (all ordinary ones by default, as the
        seed expects); cancellation never is. The last error is raised.
        """
        if max_retries < 0:
            raise ValueError(f"max_retries: expected >= 0, got {max_retries!r}")
        policy = RetryPolicy(
            attempts=max_retries + 1,
            timeout=timeout,
            wait_initial=base_delay,
            wait_max=max(max_delay, base_delay),
            on=on,
            where="retry_with_backoff",
        )
        try:
            return await policy.call(fn)
        finally:
            self.retries += policy.retries

    def get_stats(self) -> dict[str, Any]:
        return {
            "max_concurrent": self.max_concurrent,
            "processed": self.processed,
            "failed": self.failed,
            "timeouts": self.timeouts,
            "retries": self.retries,
        }
