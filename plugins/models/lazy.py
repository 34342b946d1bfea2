"""`LazyLoader` and `LazyDict`: load an expensive thing once, on first use, for every caller.

Why it exists: a model or an index is too slow to load at import time and too
big to load twice. Concurrent first callers must share one load (not start N),
a failed or timed-out load must leave nothing behind so that the next call
tries again, and the time the load took is worth knowing.

A sync loader (``torch.load``, a file read) runs in a worker thread so the
event loop keeps serving; an async loader (or a sync one returning an
awaitable) is awaited on the loop.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from time import perf_counter
from typing import Any, Generic, TypeVar

__all__ = ["LazyDict", "LazyLoader", "LoadError"]

T = TypeVar("T")


class LoadError(RuntimeError):
    """A loader returned something unusable (wrong type); the value was not kept."""


async def call_loader(loader: Callable[[], Any], in_thread: bool | None) -> Any:
    """Run `loader`: sync callables in a thread (unless told not to), awaitables awaited."""
    if in_thread is None:
        in_thread = not inspect.iscoroutinefunction(loader)
    result = await asyncio.to_thread(loader) if in_thread else loader()
    if inspect.isawaitable(result):
        result = await result
    return result


class LazyLoader(Generic[T]):
    """``await lazy.get()`` returns the loaded value, loading it at the first call only.

    - Concurrent callers share one load; a caller that is cancelled does not
      cancel the load for the others.
    - A load that raises, times out (`timeout` seconds) or returns a value that
      is not an instance of `expect` is not kept: every waiter gets the error
      and the next `get` loads again.
    - `reset()` forgets the value; a load in flight at that moment is not kept.
    - `load_time` is the duration of the last successful load, in seconds.
    """

    def __init__(
        self,
        loader: Callable[[], Any],
        *,
        name: str = "",
        timeout: float | None = None,
        expect: type | tuple[type, ...] | None = None,
        in_thread: bool | None = None,
    ) -> None:
        if not callable(loader):
            raise TypeError(f"LazyLoader: loader must be callable, got {type(loader).__name__}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"LazyLoader: timeout must be > 0, got {timeout!r}")
        self.loader = loader
        self.name = name or getattr(loader, "__name__", "loader")
        self.timeout = timeout
        self.expect = expect
        self.in_thread = in_thread
        self._value: T | None = None
        self._loaded = False
        self._task: asyncio.Task[T] | None = None
        self._generation = 0
        self.load_time: float | None = None
        self.loads = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def loading(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def value(self) -> T:
        """The loaded value; `LookupError` when nothing is loaded (use ``await get()``)."""
        if not self._loaded:
            raise LookupError(f"{self.name}: not loaded")
        return self._value  # type: ignore[return-value]

    async def get(self) -> T:
        """The value, loaded now if needed (one load shared by concurrent callers)."""
        if self._loaded:
            return self._value  # type: ignore[return-value]
        task = self._task
        if task is None or task.done():
            task = self._task = asyncio.ensure_future(self._load(self._generation))
            task.add_done_callback(_retrieve)
        # shield: a cancelled caller must not cancel the load the others wait for.
        return await asyncio.shield(task)

    async def _load(self, generation: int) -> T:
        t0 = perf_counter()
        try:
            if self.timeout is not None:
                async with asyncio.timeout(self.timeout):
                    value = await call_loader(self.loader, self.in_thread)
            else:
                value = await call_loader(self.loader, self.in_thread)
            if self.expect is not None and not isinstance(value, self.expect):
                raise LoadError(
                    f"{self.name}: loader returned {type(value).__name__}, expected "
                    f"{_type_names(self.expect)}"
                )
        except TimeoutError:
            self._failed(generation, f"TimeoutError: no result after {self.timeout} s")
            raise TimeoutError(f"{self.name}: load timed out after {self.timeout} s") from None
        except BaseException as exc:
            self._failed(generation, f"{type(exc).__name__}: {exc}")
            raise
        if generation == self._generation:
            self._value = value
            self._loaded = True
            self.load_time = perf_counter() - t0
            self.loads += 1
            self._task = None
        return value

    def _failed(self, generation: int, error: str) -> None:
        self.failures += 1
        self.last_error = error[:500]
        if generation == self._generation:
            self._task = None

    def reset(self) -> None:
        """Forget the value (and any load in flight); the next `get` loads again."""
        self._generation += 1
        self._value = None
        self._loaded = False
        self._task = None

    def stats(self) -> dict[str, Any]:
        return {
            "loaded": self._loaded,
            "loading": self.loading,
            "load_seconds": self.load_time,
            "loads": self.loads,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class LazyDict:
    """Named lazy values: ``register_loader(name, loader)``, then ``await get(name)``."""

    def __init__(self, *, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._loaders: dict[str, LazyLoader[Any]] = {}

    def register_loader(
        self,
        name: str,
        loader: Callable[[], Any],
        *,
        timeout: float | None = None,
        expect: type | tuple[type, ...] | None = None,
        in_thread: bool | None = None,
    ) -> None:
        """Register (or replace, forgetting the old value) the loader for `name`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"LazyDict: name must be a non-empty string, got {name!r}")
        self._loaders[name] = LazyLoader(
            loader,
            name=name,
            timeout=timeout if timeout is not None else self.timeout,
            expect=expect,
            in_thread=in_thread,
        )

    def _entry(self, name: str) -> LazyLoader[Any]:
        try:
            return self._loaders[name]
        except KeyError:
            known = ", ".join(sorted(self._loaders)) or "none"
            raise KeyError(
                f"LazyDict: no loader registered for {name!r} (known: {known})"
            ) from None

    async def get(self, name: str) -> Any:
        """The value for `name`, loaded on first use. `KeyError` for an unknown name."""
        return await self._entry(name).get()

    def __contains__(self, name: object) -> bool:
        return name in self._loaders

    def __len__(self) -> int:
        return len(self._loaders)

    def is_loaded(self, name: str) -> bool:
        return self._entry(name).loaded

    def loaded(self) -> list[str]:
        """Names whose value is loaded now."""
        return [name for name, lazy in self._loaders.items() if lazy.loaded]

    def reset(self, name: str | None = None) -> None:
        """Forget one value, or all of them; loaders stay registered."""
        if name is not None:
            self._entry(name).reset()
            return
        for lazy in self._loaders.values():
            lazy.reset()

    def load_time(self, name: str) -> float | None:
        return self._entry(name).load_time

    def stats(self) -> dict[str, Any]:
        return {name: lazy.stats() for name, lazy in self._loaders.items()}


def _retrieve(task: asyncio.Future[Any]) -> None:
    # Every waiter may have been cancelled: fetch the error so asyncio does not log it.
    if not task.cancelled():
        task.exception()


def _type_names(expect: type | tuple[type, ...]) -> str:
    if isinstance(expect, tuple):
        return " or ".join(t.__name__ for t in expect)
    return expect.__name__
