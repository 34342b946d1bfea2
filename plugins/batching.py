"""Dynamic batching: `@overdrive.batch` gathers concurrent single calls into one list call.

Decorate an async function that takes a list of items and returns a list of
results, one per item, in order (as Ray Serve's ``@serve.batch``)::

    @overdrive.batch(max_batch_size=16, max_wait_ms=5)
    async def embed(texts: list[str]) -> list[list[float]]:
        return model(texts)

    vector = await embed("one text")   # callers pass one item and get one result

A batch runs when `max_batch_size` items are waiting or `max_wait_ms` after its
first item arrived, whichever is first. Each caller gets its own result; an
exception from the batch goes to every caller in it, and a result that is an
exception instance (return it in place of one item's result) goes to that
caller only. A caller that is cancelled while waiting is dropped from the
batch if it has not started; once started, the batch runs to its end for the
others and the cancelled caller's result is discarded.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["BatchError", "Batcher", "batch"]

logger = logging.getLogger("overdrive.batching")

T = TypeVar("T")
R = TypeVar("R")


class BatchError(RuntimeError):
    """The batched function broke its contract (not a list, or the wrong length)."""


class Batcher(Generic[T, R]):
    """The queue behind one batched function (one per event loop and bound instance)."""

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[Sequence[R]]],
        max_batch_size: int,
        max_wait_ms: float,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._full: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0
        self.largest = 0

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.max_batch_size:
            self._start(self._take())
        elif self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_later())
        return await future  # cancelling this cancels `future`; the batch skips it

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        taken = self._pending[: self.max_batch_size]
        del self._pending[: self.max_batch_size]
        return taken

    def _start(self, entries: list[tuple[T, asyncio.Future[R]]]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(entries))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _flush_later(self) -> None:
        while self._pending:
            await asyncio.sleep(self.max_wait)
            if self._pending:
                self._start(self._take())

    async def _run(self, entries: list[tuple[T, asyncio.Future[R]]]) -> None:
        live = [(item, fut) for item, fut in entries if not fut.done()]
        if not live:
            return
        self.batches += 1
        self.items += len(live)
        self.largest = max(self.largest, len(live))
        try:
            results = await self.fn([item for item, _ in live])
            if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
                raise BatchError(
                    f"{getattr(self.fn, '__qualname__', self.fn)} returned "
                    f"{type(results).__name__}, expected a list of {len(live)} results"
                )
            if len(results) != len(live):
                raise BatchError(
                    f"{getattr(self.fn, '__qualname__', self.fn)} returned {len(results)} "
                    f"results for {len(live)} items"
                )
        except Exception as exc:
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(exc)
            return
        except BaseException:  # the batch itself was cancelled (loop shutting down)
            for _, fut in live:
                fut.cancel()
            raise
        for (_, fut), result in zip(live, results, strict=True):
            if fut.done():
                continue  # that caller was cancelled; the others still get theirs
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)


def batch(
    _fn: Callable[..., Awaitable[Sequence[Any]]] | None = None,
    *,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
) -> Any:
    """Decorate ``async def f(items: list) -> list`` so callers call ``await f(item)``.

    Works on functions and on methods (``self`` stays first: ``await obj.f(item)``;
    each instance has its own queue). Usable as ``@batch`` or ``@batch(...)``.
    """
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size: expected an integer >= 1, got {max_batch_size!r}")
    if not max_wait_ms >= 0:
        raise ValueError(f"max_wait_ms: expected >= 0, got {max_wait_ms!r}")

    def decorate(fn: Callable[..., Awaitable[Sequence[Any]]]) -> Any:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@batch needs an async function, got {fn!r}")
        # One batcher per (event loop, bound instance): futures belong to one loop.
        # The partial holds the instance, so its id is not reused while the loop lives.
        batchers: weakref.WeakKeyDictionary[Any, dict[int, Batcher[Any, Any]]] = (
            weakref.WeakKeyDictionary()
        )

        def batcher_for(owner: Any) -> Batcher[Any, Any]:
            loop = asyncio.get_running_loop()
            per_loop = batchers.get(loop)
            if per_loop is None:
                per_loop = batchers[loop] = {}
            b = per_loop.get(id(owner))
            if b is None:
                target = fn if owner is None else functools.partial(fn, owner)
                b = per_loop[id(owner)] = Batcher(target, max_batch_size, max_wait_ms)
            return b

        @functools.wraps(fn)
        async def wrapper(*args: Any) -> Any:
            if len(args) == 1:
                return await batcher_for(None).submit(args[0])
            if len(args) == 2:
                return await batcher_for(args[0]).submit(args[1])
            raise TypeError(f"{fn.__qualname__} takes one item per call, got {len(args)} args")

        wrapper.batchers = batchers  # type: ignore[attr-defined]
        return wrapper

    return decorate(_fn) if _fn is not None else decorate
