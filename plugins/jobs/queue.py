"""`FairQueue`: the job queue, weighted-fair across tenants, strict across priority classes.

One tenant's 500 queued generations must not starve another's 10. Each queued
item gets a virtual finish tag (start-time fair queuing, Goyal et al. 1996):

    start  = max(virtual time of its class, the tenant's last finish tag)
    finish = start + 1 / weight(tenant)

and the item with the smallest (class, finish tag, arrival) runs next; the
class's virtual time moves to the start tag of what was taken. A tenant that
floods only pushes its own tags further out; a newcomer starts at the current
virtual time, so it is served next. ``interactive`` items always go before
``batch`` ones. With ``fifo=True`` the tag is the arrival order (the baseline
benchmarks/jobs.py measures against).

Bounded: `max_size` items in all (`QueueFull`), `per_tenant` per tenant
(`TenantFull`). A removed (cancelled) item is skipped lazily when it surfaces.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Mapping
from typing import Any

import anyio

__all__ = ["CLASSES", "FairQueue", "QueueFull", "TenantFull"]

CLASSES = {"interactive": 0, "batch": 1}


class QueueFull(Exception):
    """The queue holds `max_size` items."""


class TenantFull(Exception):
    """This tenant holds `per_tenant` queued items."""


class _Entry:
    __slots__ = ("item", "key", "live", "start", "tenant")

    def __init__(self, key: tuple[int, float, int], start: float, tenant: Hashable, item: Any):
        self.key = key
        self.start = start
        self.tenant = tenant
        self.item = item
        self.live = True

    def __lt__(self, other: _Entry) -> bool:
        return self.key < other.key


class FairQueue:
    def __init__(
        self,
        max_size: int,
        per_tenant: int,
        weights: Mapping[str, float] | None = None,
        *,
        fifo: bool = False,
    ) -> None:
        self.max_size = max_size
        self.per_tenant = per_tenant
        self.weights = dict(weights or {})
        self.fifo = fifo
        self._heap: list[_Entry] = []
        self._entries: dict[int, _Entry] = {}  # id(item) -> entry, live ones only
        self._queued: dict[Hashable, int] = {}  # tenant -> live items
        self._last: dict[tuple[int, Hashable], float] = {}  # (class, tenant) -> last finish tag
        self._vtime = [0.0] * len(CLASSES)
        self._seq = itertools.count()
        self._ready: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_depth(self, tenant: Hashable) -> int:
        return self._queued.get(tenant, 0)

    def depths(self) -> dict[str, int]:
        return {str(t): n for t, n in self._queued.items() if n}

    def push(self, item: Any, tenant: Hashable, priority: str = "interactive") -> None:
        """Queue `item`; raises `QueueFull` or `TenantFull` (nothing queued then)."""
        if len(self._entries) >= self.max_size:
            raise QueueFull
        if self._queued.get(tenant, 0) >= self.per_tenant:
            raise TenantFull
        cls = CLASSES[priority]
        seq = next(self._seq)
        if self.fifo:
            start = finish = float(seq)
        else:
            weight = self.weights.get(str(tenant), 1.0)
            start = max(self._vtime[cls], self._last.get((cls, tenant), 0.0))
            finish = start + 1.0 / weight
            self._last[(cls, tenant)] = finish
            if len(self._last) > 4 * self.max_size:
                self._forget_idle(cls)
        entry = _Entry((cls, finish, seq), start, tenant, item)
        heapq.heappush(self._heap, entry)
        self._entries[id(item)] = entry
        self._queued[tenant] = self._queued.get(tenant, 0) + 1
        if self._ready is not None:
            self._ready.set()

    def _forget_idle(self, cls: int) -> None:
        # Tenants with nothing queued: forgetting a tag lets such a tenant start at the
        # virtual time again, at most 1/weight earlier than it would have: bounded.
        for k in [k for k in self._last if self._queued.get(k[1], 0) == 0]:
            del self._last[k]

    def _take(self, entry: _Entry) -> None:
        del self._entries[id(entry.item)]
        n = self._queued[entry.tenant] - 1
        if n:
            self._queued[entry.tenant] = n
        else:
            del self._queued[entry.tenant]

    def pop_nowait(self) -> Any | None:
        """The next item, or None when empty."""
        while self._heap:
            entry = heapq.heappop(self._heap)
            if not entry.live:
                continue
            self._take(entry)
            cls = entry.key[0]
            if not self.fifo:
                self._vtime[cls] = max(self._vtime[cls], entry.start)
            return entry.item
        return None

    async def pop(self) -> Any:
        """Wait for the next item."""
        while True:
            item = self.pop_nowait()
            if item is not None:
                return item
            if self._ready is None or self._ready.is_set():
                self._ready = anyio.Event()
            await self._ready.wait()

    def remove(self, item: Any) -> bool:
        """Take a queued `item` out (a cancelled job); False if it is not queued."""
        entry = self._entries.get(id(item))
        if entry is None:
            return False
        entry.live = False
        self._take(entry)
        return True

    def position(self, item: Any) -> int | None:
        """Items that run before `item` (0: it is next), or None if it is not queued.

        O(queued items); the queue is bounded by `max_size`.
        """
        entry = self._entries.get(id(item))
        if entry is None:
            return None
        key = entry.key
        return sum(1 for e in self._entries.values() if e.key < key)
