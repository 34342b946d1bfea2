"""Dynamic batching: `@overdrive.batch` gathers concurrent single calls into one list call.

Decorate an async function that takes a list of items and returns a list of
results, one per item, in order (as Ray Serve's ``@serve.batch``)::

    @overdrive.batch(max_batch_size=16, max_wait_ms=5)
    async def embed(texts: list[str]) -> list[list[float]]:
        return model(texts)

    vector = await embed("one text")   # callers pass one item and get one result

When to run a batch (the rule that gives low latency at low load and full
batches at high load): at most `max_concurrency` batches run at once (one by
default: a model is busy with one batch). While a slot is free, a call starts a
batch at once; it first lets the event loop run the callers that are already
ready, so that those join it, and stops gathering when no more arrive, when
`max_batch_size` items are in, or `max_wait_ms` after it began, whichever is
first. A lone call therefore waits for nobody. While every slot is busy, calls
queue, and the next batch starts with them the moment a slot frees. So
`max_wait_ms` bounds only the time spent gathering, never a wait for company
that is not coming.

Each caller gets its own result; an exception from the batch goes to every
caller in it, and a result that is an exception instance (return it in place of
one item's result) goes to that caller only. A caller that is cancelled while
queued is dropped from its batch; once its batch started, the batch runs to its
end for the others (shielded from the cancellation) and that caller's result is
discarded. Runs under asyncio and trio alike (anyio): one queue per event loop
and bound instance.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
from anyio.lowlevel import RunVar

__all__ = ["BatchError", "Batcher", "batch"]

T = TypeVar("T")
R = TypeVar("R")

# Gathering stops after this many turns of the event loop that brought no new call:
# a request needs a few turns from the socket to the endpoint's `await f(item)`.
_IDLE_TURNS = 2

_QUEUED, _TAKEN, _DONE = 0, 1, 2


class BatchError(RuntimeError):
    """The batched function broke its contract (not a list, or the wrong length)."""


class _Call(Generic[T, R]):
    """One caller's item, its outcome, and the event that tells it to look again."""

    __slots__ = ("error", "item", "result", "state", "turn", "wake")

    def __init__(self, item: T) -> None:
        self.item = item
        self.state = _QUEUED
        self.turn = False  # handed a free slot: this caller starts the next batch
        self.result: Any = None
        self.error: BaseException | None = None
        self.wake = anyio.Event()


class Batcher(Generic[T, R]):
    """The queue behind one batched function (one per event loop and bound instance)."""

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[Sequence[R]]],
        max_batch_size: int,
        max_wait_ms: float,
        max_concurrency: int = 1,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_concurrency = max_concurrency
        self._queue: deque[_Call[T, R]] = deque()
        self._busy = 0  # slots held: gathering or running
        self.batches = 0
        self.items = 0
        self.largest = 0

    async def submit(self, item: T) -> R:
        call: _Call[T, R] = _Call(item)
        self._queue.append(call)
        if self._busy < self.max_concurrency:
            self._busy += 1
            await self._lead(call)  # shielded: a cancellation arrives below
        while call.state != _DONE:
            try:
                await call.wake.wait()
            except BaseException:
                self._leave(call)
                raise
            if call.state == _QUEUED and call.turn:
                call.turn = False
                await self._lead(call)
        await anyio.lowlevel.checkpoint_if_cancelled()  # a leader cancelled while it ran
        if call.error is not None:
            raise call.error
        return call.result

    def _leave(self, call: _Call[T, R]) -> None:
        """A cancelled caller: out of the queue if still there; a slot it held goes on."""
        if call.state == _QUEUED:
            self._queue.remove(call)
            if call.turn:
                self._busy -= 1
                self._hand_on()

    async def _lead(self, call: _Call[T, R]) -> None:
        """Holding a slot: gather, take a batch (with `call` in it, if it fits), run it."""
        try:
            if self.max_wait > 0:
                await self._gather()
            taken = [
                self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))
            ]
            for c in taken:
                c.state = _TAKEN
            with anyio.CancelScope(shield=True):  # the batch is everyone's, not the leader's
                await self._run(taken)
        finally:
            self._busy -= 1
            self._hand_on()

    async def _gather(self) -> None:
        deadline = anyio.current_time() + self.max_wait
        idle = 0
        seen = len(self._queue)
        while idle < _IDLE_TURNS and seen < self.max_batch_size:
            if anyio.current_time() >= deadline:
                break
            await anyio.lowlevel.cancel_shielded_checkpoint()
            idle = idle + 1 if len(self._queue) == seen else 0
            seen = len(self._queue)

    def _hand_on(self) -> None:
        """A slot is free: the first queued caller starts the next batch."""
        if self._queue and self._busy < self.max_concurrency:
            first = self._queue[0]
            if not first.turn:
                self._busy += 1
                first.turn = True
                first.wake.set()

    async def _run(self, calls: list[_Call[T, R]]) -> None:
        self.batches += 1
        self.items += len(calls)
        self.largest = max(self.largest, len(calls))
        name = getattr(self.fn, "__qualname__", self.fn)
        outcome: BaseException | None = BatchError(f"the batch of {name} was cancelled")
        try:
            results = await self.fn([c.item for c in calls])
            if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
                raise BatchError(
                    f"{name} returned {type(results).__name__}, "
                    f"expected a list of {len(calls)} results"
                )
            if len(results) != len(calls):
                raise BatchError(f"{name} returned {len(results)} results for {len(calls)} items")
            for c, result in zip(calls, results, strict=True):
                if isinstance(result, BaseException):
                    c.error = result
                else:
                    c.result = result
            outcome = None
        except Exception as exc:
            outcome = exc
        finally:  # also when the batch itself is cancelled (the loop shutting down)
            for c in calls:
                if outcome is not None:
                    c.error = outcome
                c.state = _DONE
                c.wake.set()


def batch(
    _fn: Callable[..., Awaitable[Sequence[Any]]] | None = None,
    *,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
    max_concurrency: int = 1,
) -> Any:
    """Decorate ``async def f(items: list) -> list`` so callers call ``await f(item)``.

    Works on functions and on methods (``self`` stays first: ``await obj.f(item)``;
    each instance has its own queue). Usable as ``@batch`` or ``@batch(...)``.
    `max_concurrency` is how many batches may run at once (raise it for a model that
    overlaps batches, such as one on several GPU streams).
    """
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size: expected an integer >= 1, got {max_batch_size!r}")
    if not (max_wait_ms >= 0 and math.isfinite(max_wait_ms)):
        raise ValueError(f"max_wait_ms: expected a finite number >= 0, got {max_wait_ms!r}")
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"max_concurrency: expected an integer >= 1, got {max_concurrency!r}")

    def decorate(fn: Callable[..., Awaitable[Sequence[Any]]]) -> Any:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@batch needs an async function, got {fn!r}")
        # One table of batchers per event loop (a RunVar: calls belong to one loop),
        # keyed by the bound instance's id; the partial holds the instance, so its
        # id is not reused while the loop lives.
        batchers: RunVar[dict[int, Batcher[Any, Any]]] = RunVar(f"batchers:{fn.__qualname__}")

        def batcher_for(owner: Any) -> Batcher[Any, Any]:
            try:
                table = batchers.get()
            except LookupError:
                table = {}
                batchers.set(table)
            b = table.get(id(owner))
            if b is None:
                target = fn if owner is None else functools.partial(fn, owner)
                b = table[id(owner)] = Batcher(target, max_batch_size, max_wait_ms, max_concurrency)
            return b

        @functools.wraps(fn)
        async def wrapper(*args: Any) -> Any:
            if len(args) == 1:
                return await batcher_for(None).submit(args[0])
            if len(args) == 2:
                return await batcher_for(args[0]).submit(args[1])
            raise TypeError(f"{fn.__qualname__} takes one item per call, got {len(args)} args")

        def current_batchers() -> dict[int, Batcher[Any, Any]]:
            """This event loop's batchers of `fn` (for figures: batches, items, largest)."""
            try:
                return batchers.get()
            except LookupError:
                return {}

        wrapper.batchers = current_batchers  # type: ignore[attr-defined]
        return wrapper

    return decorate(_fn) if _fn is not None else decorate
