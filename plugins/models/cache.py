"""`ModelCache`: models loaded on first use, kept under a byte budget, evicted LRU.

Why it exists: a GPU service holds a few large models and more are asked for
than fit. The budget is in bytes (host RAM, and memory per accelerator) rather
than a count of models, because models differ in size by orders of magnitude.
Least-recently-used unpinned models make room; a model evicted from an
accelerator is parked in host memory when the host budget allows, so that
bringing it back costs a copy, not a load from disk.

Sizes come from the model's torch tensors (parameters and buffers) unless
`size_bytes` is given; a model whose size cannot be measured counts 0 bytes and
is flagged in the stats (give `size_bytes` for such models).
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal

import structlog

from .lazy import LoadError, _retrieve, _type_names, call_loader

__all__ = ["ModelCache", "ModelCacheFull", "measure_bytes"]

logger = structlog.get_logger("overdrive.models")

HOST = "cpu"
State = Literal["unloaded", "loaded", "parked"]


class ModelCacheFull(MemoryError):
    """A model does not fit in its budget even after evicting every unpinned model."""


@dataclass(eq=False)
class _Entry:
    name: str
    loader: Callable[[], Any]
    declared_bytes: int | None
    device: str | None  # where the model runs: None (host) or "cuda:0", ...
    pinned: bool
    timeout: float | None
    expect: type | tuple[type, ...] | None
    value: Any = None
    state: State = "unloaded"
    where: str = HOST  # the budget its bytes are charged to while loaded or parked
    nbytes: int = 0
    size_known: bool = True
    last_used: int = 0
    task: asyncio.Task[Any] | None = None
    generation: int = 0
    load_seconds: float | None = None
    park_seconds: float | None = None
    restore_seconds: float | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("loads", "hits", "evictions", "parks", "restores", "failures"), 0
        )
    )
    last_error: str | None = None

    @property
    def home(self) -> str:
        return self.device or HOST


def measure_bytes(obj: Any) -> int | None:
    """Bytes held by the torch tensors in `obj` (a module, a tensor, or containers of
    them, or an object whose attributes are modules such as a diffusers pipeline).
    None when torch is not imported or nothing in `obj` is a tensor.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    seen: set[int] = set()
    total = 0
    found = False

    def tensor_bytes(t: Any) -> int:
        try:
            key = t.untyped_storage().data_ptr()
            size = int(t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # meta or sparse tensors
            return int(t.nelement() * t.element_size())
        if key and key in seen:
            return 0
        seen.add(key)
        return size

    def walk(o: Any, depth: int) -> None:
        nonlocal total, found
        if isinstance(o, torch.Tensor):
            found = True
            total += tensor_bytes(o)
        elif isinstance(o, torch.nn.Module):
            found = True
            for t in (*o.parameters(), *o.buffers()):
                total += tensor_bytes(t)
        elif depth < 2 and isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif depth < 2 and isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)
        elif depth < 1 and hasattr(o, "__dict__"):
            for v in vars(o).values():
                walk(v, depth + 1)

    walk(obj, 0)
    return total if found else None


def _move(value: Any, device: str) -> Any:
    """`value.to(device)` for torch modules and tensors (others are left where they are)."""
    to = getattr(value, "to", None)
    if to is None:
        return value
    moved = to(device)
    if device != HOST:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()
    return moved if moved is not None else value


def _empty_device_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelCache:
    """Named models, loaded on first `get_model`, kept under byte budgets.

    ``ModelCache(cache)`` takes the seed's `AsyncCache` as its first argument for
    compatibility; models are never written to it (a model is not bytes, and
    nothing read back from a shared store is unpickled here).

    Budgets: `max_host_bytes` for models in host RAM (including parked ones),
    `max_gpu_bytes` for each accelerator device; None means unlimited.
    """

    def __init__(
        self,
        cache: Any = None,
        *,
        max_host_bytes: int | None = None,
        max_gpu_bytes: int | None = None,
        park_on_evict: bool = True,
        load_timeout: float | None = None,
    ) -> None:
        for key, value in (("max_host_bytes", max_host_bytes), ("max_gpu_bytes", max_gpu_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"ModelCache: {key} must be > 0 or None, got {value!r}")
        self.cache = cache
        self.max_host_bytes = max_host_bytes
        self.max_gpu_bytes = max_gpu_bytes
        self.park_on_evict = park_on_evict
        self.load_timeout = load_timeout
        self._models: dict[str, _Entry] = {}
        self._used: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._clock = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.pressure_unloads = 0

    # -- registration ---------------------------------------------------------------

    def register_model(
        self,
        name: str,
        loader: Callable[[], Any],
        *,
        size_bytes: int | None = None,
        device: str | None = None,
        pinned: bool = False,
        timeout: float | None = None,
        expect: type | tuple[type, ...] | None = None,
    ) -> None:
        """Register `loader` (sync: run in a thread; or async) under `name`.

        `device` is where the model runs (``"cuda:0"``; None or ``"cpu"`` for the
        host); after loading, the cache moves it there with ``.to(device)``.
        `size_bytes` overrides the size measured from the model's tensors.
        A pinned model is never evicted (`unload_model` still unloads it).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"ModelCache: name must be a non-empty string, got {name!r}")
        if not callable(loader):
            raise TypeError(f"ModelCache: loader for {name!r} must be callable")
        if size_bytes is not None and (not isinstance(size_bytes, int) or size_bytes < 0):
            raise ValueError(
                f"ModelCache: size_bytes for {name!r} must be >= 0, got {size_bytes!r}"
            )
        if name in self._models and self._models[name].state != "unloaded":
            raise ValueError(f"ModelCache: {name!r} is loaded; unload_model it before replacing")
        dev = None if device in (None, HOST) else str(device)
        self._models[name] = _Entry(
            name,
            loader,
            size_bytes,
            dev,
            pinned,
            timeout if timeout is not None else self.load_timeout,
            expect,
        )

    def _entry(self, name: str) -> _Entry:
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "none"
            raise KeyError(
                f"ModelCache: no model registered as {name!r} (known: {known})"
            ) from None

    def pin(self, name: str) -> None:
        self._entry(name).pinned = True

    def unpin(self, name: str) -> None:
        self._entry(name).pinned = False

    def loaded(self) -> list[str]:
        """Names of the models ready on their device, least recently used first."""
        ready = [e for e in self._models.values() if e.state == "loaded"]
        return [e.name for e in sorted(ready, key=lambda e: e.last_used)]

    def parked(self) -> list[str]:
        """Names of models evicted from an accelerator and kept in host memory."""
        return [e.name for e in self._models.values() if e.state == "parked"]

    def used_bytes(self, where: str = HOST) -> int:
        return self._used.get(where, 0)

    def _budget(self, where: str) -> int | None:
        return self.max_host_bytes if where == HOST else self.max_gpu_bytes

    # -- getting -------------------------------------------------------------------

    async def get_model(self, name: str) -> Any:
        """The model, loaded (or copied back from host memory) if needed.

        Concurrent callers share one load. A load that fails, times out or returns
        the wrong type leaves nothing behind; the next call loads again.
        """
        entry = self._entry(name)
        if entry.state == "loaded":
            self._clock += 1
            entry.last_used = self._clock
            entry.counts["hits"] += 1
            self.hits += 1
            return entry.value
        task = entry.task
        if task is None or task.done():
            self.misses += 1
            task = entry.task = asyncio.ensure_future(self._bring(entry, entry.generation))
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _bring(self, entry: _Entry, generation: int) -> Any:
        try:
            if entry.state == "parked":
                return await self._restore(entry, generation)
            return await self._load(entry, generation)
        except BaseException as exc:
            entry.counts["failures"] += 1
            entry.last_error = f"{type(exc).__name__}: {exc}"[:500]
            raise
        finally:
            if entry.generation == generation:
                entry.task = None

    async def _load(self, entry: _Entry, generation: int) -> Any:
        reserved = 0
        where = entry.home
        if entry.declared_bytes is not None:  # make room before the loader allocates
            async with self._lock:
                await self._make_room(where, entry.declared_bytes, entry)
                reserved = entry.declared_bytes
                self._charge(where, reserved)
        t0 = perf_counter()
        try:
            try:
                if entry.timeout is not None:
                    async with asyncio.timeout(entry.timeout):
                        value = await call_loader(entry.loader, None)
                else:
                    value = await call_loader(entry.loader, None)
            except TimeoutError:
                raise TimeoutError(
                    f"ModelCache: loading {entry.name!r} timed out after {entry.timeout} s"
                ) from None
            if value is None or (entry.expect is not None and not isinstance(value, entry.expect)):
                wanted = _type_names(entry.expect) if entry.expect is not None else "a model"
                raise LoadError(
                    f"ModelCache: loader for {entry.name!r} returned {type(value).__name__}, "
                    f"expected {wanted}"
                )
            if entry.device is not None:
                value = await asyncio.to_thread(_move, value, entry.device)
            load_seconds = perf_counter() - t0
            if entry.declared_bytes is not None:
                nbytes, known = entry.declared_bytes, True
            else:
                measured = measure_bytes(value)
                nbytes, known = (measured, True) if measured is not None else (0, False)
            async with self._lock:
                self._charge(where, -reserved)
                reserved = 0
                if generation != entry.generation:  # unloaded while loading: not kept
                    return value
                await self._make_room(where, nbytes, entry)
                self._charge(where, nbytes)
                entry.value, entry.nbytes, entry.size_known = value, nbytes, known
                entry.where = where
                entry.state = "loaded"
                entry.load_seconds = load_seconds
                entry.counts["loads"] += 1
                self._clock += 1
                entry.last_used = self._clock
            if not known:
                logger.warning("model size unknown; pass size_bytes", model=entry.name)
            return value
        finally:
            if reserved:
                self._charge(where, -reserved)

    async def _restore(self, entry: _Entry, generation: int) -> Any:
        async with self._lock:
            if generation == entry.generation and entry.state == "parked":
                device = entry.home
                await self._make_room(device, entry.nbytes, entry)
                t0 = perf_counter()
                entry.value = await asyncio.to_thread(_move, entry.value, device)
                entry.restore_seconds = perf_counter() - t0
                self._charge(HOST, -entry.nbytes)
                self._charge(device, entry.nbytes)
                entry.where = device
                entry.state = "loaded"
                entry.counts["restores"] += 1
                self._clock += 1
                entry.last_used = self._clock
                return entry.value
        # The parked copy was dropped while we waited: load from scratch.
        return await self._load(entry, generation)

    # -- making room ----------------------------------------------------------------

    def _charge(self, where: str, nbytes: int) -> None:
        self._used[where] = self._used.get(where, 0) + nbytes

    async def _make_room(self, where: str, nbytes: int, incoming: _Entry) -> None:
        """Evict LRU unpinned models at `where` until `nbytes` more fit. Lock held."""
        budget = self._budget(where)
        if budget is None:
            return
        if nbytes > budget:
            raise ModelCacheFull(
                f"ModelCache: {incoming.name!r} needs {nbytes} bytes on {where}, "
                f"more than the whole budget of {budget} bytes"
            )
        while self._used.get(where, 0) + nbytes > budget:
            victims = [
                e
                for e in self._models.values()
                if e is not incoming and e.where == where and e.state != "unloaded" and not e.pinned
            ]
            if not victims:
                raise ModelCacheFull(
                    f"ModelCache: {incoming.name!r} needs {nbytes} bytes on {where}; "
                    f"{self._used.get(where, 0)} of {budget} are held by pinned or loading models"
                )
            # Parked copies go first (they are the coldest), then LRU.
            victim = min(victims, key=lambda e: (e.state == "loaded", e.last_used))
            await self._evict(victim, incoming)

    async def _evict(self, victim: _Entry, incoming: _Entry) -> None:
        self.evictions += 1
        victim.counts["evictions"] += 1
        if victim.state == "loaded" and victim.where != HOST and self.park_on_evict:
            try:
                await self._make_room(HOST, victim.nbytes, incoming)
            except ModelCacheFull:
                pass
            else:
                t0 = perf_counter()
                victim.value = await asyncio.to_thread(_move, victim.value, HOST)
                victim.park_seconds = perf_counter() - t0
                self._charge(victim.where, -victim.nbytes)
                self._charge(HOST, victim.nbytes)
                victim.where = HOST
                victim.state = "parked"
                victim.counts["parks"] += 1
                _empty_device_cache()
                logger.info("model parked in host memory", model=victim.name)
                return
        self._drop(victim)
        logger.info("model evicted", model=victim.name)

    def _drop(self, entry: _Entry) -> bool:
        """Forget the model's value and give its bytes back. Lock held (or no awaits)."""
        entry.generation += 1
        entry.task = None
        if entry.state == "unloaded":
            return False
        self._charge(entry.where, -entry.nbytes)
        was_device = entry.where != HOST
        entry.value = None
        entry.state = "unloaded"
        entry.where = HOST
        entry.nbytes = 0
        if was_device:
            _empty_device_cache()
        return True

    # -- unloading ------------------------------------------------------------------

    async def unload_model(self, name: str) -> bool:
        """Unload `name` (also if pinned, also a parked copy); a load in flight is not kept.

        Returns whether anything was unloaded. Memory comes back once callers drop
        their own references to the model.
        """
        entry = self._entry(name)
        async with self._lock:
            dropped = self._drop(entry)
        if dropped:
            gc.collect()
        return dropped

    async def unload_all(self, *, keep_pinned: bool = False) -> int:
        async with self._lock:
            n = sum(
                self._drop(e) for e in list(self._models.values()) if not (keep_pinned and e.pinned)
            )
        if n:
            gc.collect()
        return n

    async def on_memory_pressure(self, level: str) -> int:
        """`warning`: drop parked copies and the least recently used half of the unpinned
        models; `critical`: every unpinned model. Returns how many were unloaded.
        """
        async with self._lock:
            unpinned = [e for e in self._models.values() if e.state != "unloaded" and not e.pinned]
            if level == "critical":
                victims = unpinned
            else:
                parked = [e for e in unpinned if e.state == "parked"]
                ready = [e for e in unpinned if e.state == "loaded"]
                ready.sort(key=lambda e: e.last_used)
                victims = parked + ready[: len(ready) // 2]
            n = sum(self._drop(e) for e in victims)
        self.pressure_unloads += n
        if n:
            gc.collect()
        return n

    # -- figures ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        models = {}
        for e in self._models.values():
            models[e.name] = {
                "state": e.state,
                "device": e.home,
                "size_bytes": e.nbytes if e.state != "unloaded" else e.declared_bytes,
                "size_known": e.size_known,
                "pinned": e.pinned,
                "load_seconds": e.load_seconds,
                "park_seconds": e.park_seconds,
                "restore_seconds": e.restore_seconds,
                "last_error": e.last_error,
                **e.counts,
            }
        return {
            "models": models,
            "loaded": self.loaded(),
            "parked": self.parked(),
            "used_bytes": {k: v for k, v in self._used.items() if v},
            "max_host_bytes": self.max_host_bytes,
            "max_gpu_bytes": self.max_gpu_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "pressure_unloads": self.pressure_unloads,
        }

    collect_stats = stats
