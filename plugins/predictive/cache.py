"""`PredictiveCache`: a key-value cache that learns which key follows which and
loads the likely next one before it is asked for (the seed's `PredictiveCache`).

Values live in an in-process LRU of `max_size` entries (or in a given
`AsyncCache`). Prefetches go through loaders registered with
`register_loader(loader, prefix=...)`; without a loader for a key, nothing is
prefetched for it (the cache still learns).
"""

from __future__ import annotations

import asyncio
import inspect
from collections import OrderedDict
from collections.abc import Callable, Hashable
from time import monotonic
from typing import Any

import structlog

from .predictor import Predictor

__all__ = ["PredictiveCache"]

logger = structlog.get_logger("overdrive.predictive")

Loader = Callable[[str], Any]


class PredictiveCache:
    """``await set(key, value)``, ``await get(key)``; a `get` may start prefetches.

    Figures (`stats()`): hits, misses, prefetches issued, used (a later `get`
    found them), wasted (evicted unused), late (a `get` arrived while the
    prefetch was still loading) and failed.
    """

    def __init__(
        self,
        max_size: int = 1000,
        *,
        ttl: float | None = None,
        cache: Any = None,
        threshold: float = 0.5,
        decay: float = 0.95,
        min_support: float = 3.0,
        min_precision: float = 0.5,
        max_inflight: int = 4,
        prefetch_per_second: float = 50.0,
        per_client: bool = False,
        max_clients: int = 10_000,
        max_keys: int = 10_000,
        prefetch: bool = True,
        load_timeout: float | None = 30.0,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"PredictiveCache: max_size must be >= 1, got {max_size!r}")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"PredictiveCache: ttl must be > 0 or None, got {ttl!r}")
        self.max_size = max_size
        self.ttl = ttl
        self.backend = cache
        self.prefetch = prefetch  # False: learn only (a baseline, or a dry run)
        if load_timeout is not None and load_timeout <= 0:
            raise ValueError(f"PredictiveCache: load_timeout must be > 0, got {load_timeout!r}")
        self.load_timeout = load_timeout
        self.predictor = Predictor(
            threshold=threshold,
            decay=decay,
            min_support=min_support,
            min_precision=min_precision,
            max_keys=max_keys,
            per_client=per_client,
            max_clients=max_clients,
            max_inflight=max_inflight,
            per_second=prefetch_per_second,
        )
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._loaders: list[tuple[str, Loader]] = []
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._prefetched: OrderedDict[str, None] = OrderedDict()  # prefetched, not yet used
        self._tasks: set[asyncio.Future[Any]] = set()
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.issued = 0
        self.used = 0
        self.wasted = 0
        self.late = 0
        self.failed = 0

    # -- loaders -------------------------------------------------------------------

    def register_loader(self, loader: Loader, *, prefix: str = "") -> None:
        """`loader(key)` (sync or async) loads keys starting with `prefix` (longest wins)."""
        if not callable(loader):
            raise TypeError("PredictiveCache: loader must be callable")
        self._loaders = [(p, f) for p, f in self._loaders if p != prefix]
        self._loaders.append((prefix, loader))
        self._loaders.sort(key=lambda pf: len(pf[0]), reverse=True)

    def _loader_for(self, key: str) -> Loader | None:
        for prefix, loader in self._loaders:
            if key.startswith(prefix):
                return loader
        return None

    # -- storage ---------------------------------------------------------------------

    async def _read(self, key: str) -> Any:
        if self.backend is not None:
            return await self.backend.get(key)
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires and monotonic() >= expires:
            del self._data[key]
            self._forget_prefetch(key)
            return None
        self._data.move_to_end(key)
        return value

    def _present(self, key: str) -> bool:
        if self.backend is not None:
            return key in self._prefetched
        item = self._data.get(key)
        return item is not None and not (item[0] and monotonic() >= item[0])

    async def _write(self, key: str, value: Any, ttl: float | None) -> None:
        ttl = self.ttl if ttl is None else ttl
        if self.backend is not None:
            await self.backend.set(key, value, ttl=ttl)
            return
        self._data[key] = (monotonic() + ttl if ttl else 0.0, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            old, _ = self._data.popitem(last=False)
            self._forget_prefetch(old)

    def _forget_prefetch(self, key: str) -> None:
        if key in self._prefetched:
            del self._prefetched[key]
            self.wasted += 1

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store `value` under `key` (a value you set replaces a prefetched one)."""
        self._prefetched.pop(key, None)
        await self._write(key, value, ttl)

    async def delete(self, key: str) -> None:
        self._prefetched.pop(key, None)
        if self.backend is not None:
            delete = getattr(self.backend, "delete", None)
            if delete is not None:
                await delete(key)
        else:
            self._data.pop(key, None)

    # -- reading -------------------------------------------------------------------------

    async def get(self, key: str, default: Any = None, *, client: Hashable | None = None) -> Any:
        """The value for `key` (loaded through its loader on a miss), or `default`.

        Learns that `client` (None: the one global sequence) asked for `key` and
        starts prefetches of the likely next keys.
        """
        value = await self._read(key)
        if value is not None:
            self.hits += 1
            if key in self._prefetched:
                del self._prefetched[key]
                self.used += 1
        self._prefetch_after(key, client)
        if value is not None:
            return value
        pending = self._inflight.get(key)
        if pending is not None:
            self.misses += 1
            if key in self._prefetched:
                del self._prefetched[key]
                self.used += 1
                self.late += 1
            value = await asyncio.shield(pending)
        else:
            self.misses += 1
            loader = self._loader_for(key)
            if loader is None:
                return default
            value = await self._load(key, loader, prefetch=False)
        return default if value is None else value

    def _prefetch_after(self, key: str, client: Hashable | None) -> None:
        likely = self.predictor.observe(key, client)
        if not self.prefetch:
            return
        for nxt, _p in likely:
            if not isinstance(nxt, str) or nxt in self._inflight or self._present(nxt):
                continue
            loader = self._loader_for(nxt)
            if loader is None or not self.predictor.admit():
                continue
            self.issued += 1
            self._prefetched[nxt] = None
            task = asyncio.ensure_future(self._prefetch(nxt, loader))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _prefetch(self, key: str, loader: Loader) -> None:
        try:
            if self.backend is not None and await self.backend.get(key) is not None:
                self._prefetched.pop(key, None)  # already there: nothing to load
                self.issued -= 1
                return
            await self._load(key, loader, prefetch=True)
        except Exception as exc:
            self.failed += 1
            self._prefetched.pop(key, None)
            logger.debug("prefetch failed", key=key, error=repr(exc))
        finally:
            self.predictor.done()

    async def _load(self, key: str, loader: Loader, *, prefetch: bool) -> Any:
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut = asyncio.ensure_future(self._call(key, loader))
        self._inflight[key] = fut
        try:
            value = await asyncio.shield(fut)
        finally:
            if self._inflight.get(key) is fut and fut.done():
                del self._inflight[key]
        return value

    async def _call(self, key: str, loader: Loader) -> Any:
        try:
            self.loads += 1
            value = loader(key)
            if inspect.isawaitable(value):
                if self.load_timeout is not None:
                    try:
                        async with asyncio.timeout(self.load_timeout):
                            value = await value
                    except TimeoutError:
                        raise TimeoutError(
                            f"PredictiveCache: loading {key!r} timed out "
                            f"after {self.load_timeout} s"
                        ) from None
                else:
                    value = await value
            if value is not None:
                await self._write(key, value, None)
            else:
                self._prefetched.pop(key, None)
            return value
        finally:
            self._inflight.pop(key, None)

    # -- lifecycle and figures ---------------------------------------------------------------

    async def close(self) -> None:
        """Cancel prefetches in flight."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        looked = self.hits + self.misses
        return {
            "size": len(self._data) if self.backend is None else None,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / looked, 4) if looked else None,
            "loads": self.loads,
            "prefetch": {
                "issued": self.issued,
                "used": self.used,
                "late": self.late,
                "wasted": self.wasted,
                "unused_now": len(self._prefetched),
                "failed": self.failed,
                "used_share": round(self.used / self.issued, 4) if self.issued else None,
            },
            "model": self.predictor.stats(),
        }

    get_stats = stats
