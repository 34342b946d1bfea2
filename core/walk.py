"""Walking compiled chains: the per-request calls into plugins, with fault isolation.

A coroutine costs about as much as three plain calls, and most hooks are
plain functions, so there are two ways in. `call_first`/`call_all` are
coroutines for any chain. `first`/`each` are plain functions: on a chain of
sync implementations they run it without creating a coroutine; otherwise
(or when a sync implementation returns an awaitable) they return a coroutine
that the caller awaits. The middleware uses `first`/`each`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Coroutine
from time import perf_counter
from typing import TYPE_CHECKING, Any

import structlog

from . import hookspecs
from .chains import Chain, PluginInfo
from .context import Lease
from .errors import PluginError, PluginFailure

if TYPE_CHECKING:
    from .config import HostSettings

logger = structlog.get_logger("overdrive")
_EMPTY: Chain = ()


def _record(timing: list[float], seconds: float) -> None:
    timing[0] += 1
    timing[1] += seconds
    if seconds > timing[2]:
        timing[2] = seconds


class ChainWalker:
    """The walking half of the host (`Overdrive` inherits it)."""

    chains: dict[str, Chain]
    sync_hooks: frozenset[str]
    settings: HostSettings
    #: True while the current request is one of the sampled (timed) ones.
    timed: bool

    def fault(self, info: PluginInfo, hook: str, exc: BaseException) -> None:
        raise NotImplementedError

    def _accept(self, info: PluginInfo, hook: str, result: Any) -> Any:
        """A non-None firstresult, checked; None when it is refused (and counted)."""
        if hook in hookspecs.SHORT_CIRCUIT_HOOKS and not callable(result):
            problem = f"returned {type(result).__name__}, not an ASGI callable"
            self.fault(info, hook, PluginError(info.name, hook, problem))
            return None
        if hook == "gpu_allocate" and not (isinstance(result, Lease) or callable(result)):
            problem = f"returned {type(result).__name__}, not a Lease or an ASGI callable"
            self.fault(info, hook, PluginError(info.name, hook, problem))
            return None
        if info.shadow:
            info.shadow_hits += 1
            logger.info("shadow plugin would short-circuit", plugin=info.name, hook=hook)
            return None
        return result

    async def call_first(self, hook: str, *args: Any) -> Any:
        """Run a firstresult hook; the first non-None result (awaited) wins."""
        return await self._first_from(hook, self.chains.get(hook, _EMPTY), 0, args)

    async def _first_from(
        self, hook: str, chain: Chain, start: int, args: tuple[Any, ...], pending: Any = None
    ) -> Any:
        """Walk `chain` from `start`; `pending` is an awaitable entry start-1 returned."""
        if pending is not None:
            info = chain[start - 1][2]
            try:
                result = await pending
            except Exception as exc:
                self.fault(info, hook, exc)
                result = None
            if result is not None and self._accept(info, hook, result) is not None:
                _answered(hook, args, info)
                return result
        timed = self.timed
        for fn, is_async, info, timing in chain[start:] if start else chain:
            if timed:
                t0 = perf_counter()
            try:
                result = fn(*args)
                # A sync def may return an awaitable too: awaited, so firstresult holds.
                if is_async or (result is not None and inspect.isawaitable(result)):
                    result = await result
            except Exception as exc:
                self.fault(info, hook, exc)
                continue
            if timed:
                _record(timing, perf_counter() - t0)
            if result is not None and self._accept(info, hook, result) is not None:
                _answered(hook, args, info)
                return result
        return None

    def first(self, hook: str, ctx: Any) -> Any:
        """`call_first(hook, ctx)` without a coroutine where the chain allows.

        For the request hooks, which take only the context. Returns the result,
        or a coroutine to await (an async implementation, or a sync one that
        returned an awaitable). A result is never a coroutine object (it is an
        ASGI callable or a Lease), so ``type(r) is CoroutineType`` tells them apart.
        """
        chain = self.chains.get(hook, _EMPTY)
        if hook not in self.sync_hooks:
            return self._first_from(hook, chain, 0, (ctx,))
        timed = self.timed
        for entry in chain:
            fn, _, info, timing = entry
            if timed:
                t0 = perf_counter()
            try:
                result = fn(ctx)
            except Exception as exc:
                self.fault(info, hook, exc)
                continue
            if timed:
                _record(timing, perf_counter() - t0)
            if result is None:
                continue
            if inspect.isawaitable(result):
                index = chain.index(entry) + 1
                return self._first_from(hook, chain, index, (ctx,), result)
            if self._accept(info, hook, result) is not None:
                _answered(hook, (ctx,), info)
                return result
        return None

    def _isolate(self, info: PluginInfo, hook: str, exc: BaseException, always: bool) -> None:
        """`fault`; with `always`, a fail-closed plugin's failure is counted but does not
        stop the walk (`gpu_release`, `after_request`: each must reach every plugin).
        """
        try:
            self.fault(info, hook, exc)
        except PluginFailure:
            if not always:
                raise

    async def call_all(self, hook: str, *args: Any, always: bool = False) -> list[Any]:
        """Run every implementation (async ones awaited in turn); results in order.

        With `always`, a fail-closed plugin that raises does not stop the others.
        """
        timed = self.timed
        results = []
        for fn, is_async, info, timing in self.chains.get(hook, _EMPTY):
            if timed:
                t0 = perf_counter()
            try:
                result = fn(*args)
                if is_async or (result is not None and inspect.isawaitable(result)):
                    result = await result
            except Exception as exc:
                self._isolate(info, hook, exc, always)
                continue
            if timed:
                _record(timing, perf_counter() - t0)
            results.append(result)
        return results

    def each(self, hook: str, ctx: Any, *, always: bool = False) -> Coroutine[Any, Any, Any] | None:
        """`call_all(hook, ctx)` without a coroutine where the chain allows; may return
        a coroutine to await. `always` as in `call_all`."""
        if hook not in self.sync_hooks:
            return self.call_all(hook, ctx, always=always)
        timed = self.timed
        pending: list[tuple[PluginInfo, Any]] | None = None
        for fn, _, info, timing in self.chains.get(hook, _EMPTY):
            if timed:
                t0 = perf_counter()
            try:
                result = fn(ctx)
            except Exception as exc:
                self._isolate(info, hook, exc, always)
                continue
            if timed:
                _record(timing, perf_counter() - t0)
            if result is not None and inspect.isawaitable(result):
                if pending is None:
                    pending = []
                pending.append((info, result))
        return self._settle(hook, pending, always) if pending else None

    async def _settle(
        self, hook: str, pending: list[tuple[PluginInfo, Any]], always: bool = False
    ) -> None:
        """Await what sync implementations of an all-hook returned, in order."""
        for info, awaitable in pending:
            try:
                await awaitable
            except Exception as exc:
                self._isolate(info, hook, exc, always)

    def call_sync(self, hook: str, *args: Any) -> None:
        """Run every implementation of a hook as plain calls (`on_response_start`)."""
        timed = self.timed
        for fn, _, info, timing in self.chains.get(hook, _EMPTY):
            if timed:
                t0 = perf_counter()
            try:
                result = fn(*args)
                if result is not None and inspect.isawaitable(result):
                    # Never awaited here: close it so it does not warn, and say why.
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
                    raise PluginError(info.name, hook, "returned an awaitable from a sync hook")
            except Exception as exc:
                self.fault(info, hook, exc)
                continue
            if timed:
                _record(timing, perf_counter() - t0)


def _answered(hook: str, args: tuple[Any, ...], info: PluginInfo) -> None:
    """Note on the request which plugin answered it instead of the app (a 429, a 503,
    a cache hit): ``ctx.answered_by``, for traces and logs. Only on a short-circuit."""
    if hook in hookspecs.SHORT_CIRCUIT_HOOKS and args:
        with contextlib.suppress(AttributeError):
            args[0].answered_by = info.name
