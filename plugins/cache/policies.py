"""Eviction policies for the memory tier: which entry leaves when the tier is full.

Each policy is a small key -> value store that also decides the victim, so a
hit costs one dict lookup plus the policy's bookkeeping and nothing else:

- `LRUStore`: least recently used (an `OrderedDict`).
- `TTLStore`: the entry that expires first leaves first (FIFO when no TTL).
- `SieveStore`: SIEVE (Zhang et al., NSDI 2024): a FIFO queue with one
  "visited" bit and a hand; hits only set the bit, so they never reorder.
- `S3FIFOStore`: S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO,
  a main FIFO with 2-bit frequencies and a ghost FIFO of recently evicted keys
  (their hashes: at most one per live entry, counted in `ENTRY_OVERHEAD`).
  One-hit wonders and scans leave through the small queue without touching
  the main one. The default: best or equal-best in `benchmarks/eviction.py`.

The memory tier decides *when* to evict (entries or bytes over bound) and
asks the store for a victim with `evict()`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Any

__all__ = ["POLICIES", "LRUStore", "S3FIFOStore", "SieveStore", "Store", "TTLStore", "make_store"]

_MISSING: Any = object()


class Store:
    """The interface: `get` (counts as a use), `peek`, `set`, `pop`, `evict`, `len`, `key_list`."""

    name = ""
    _d: dict[Hashable, Any]  # every live key, in each store's own order and item shape

    def get(self, key: Hashable, default: Any = None) -> Any:
        raise NotImplementedError

    def peek(self, key: Hashable, default: Any = None) -> Any:
        raise NotImplementedError

    def set(self, key: Hashable, value: Any, expires_at: float = 0.0) -> None:
        raise NotImplementedError

    def pop(self, key: Hashable, default: Any = None) -> Any:
        raise NotImplementedError

    def evict(self) -> tuple[Hashable, Any] | None:
        """Remove and return the victim ``(key, value)``, or None when empty."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Hashable) -> bool:
        return self.peek(key, _MISSING) is not _MISSING

    def key_list(self) -> Iterator[Hashable]:
        return iter(list(self._d))

    def clear(self) -> None:
        raise NotImplementedError


class LRUStore(Store):
    name = "lru"

    def __init__(self) -> None:
        self._d: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, default: Any = None) -> Any:
        value = self._d.get(key, _MISSING)
        if value is _MISSING:
            return default
        self._d.move_to_end(key)
        return value

    def peek(self, key: Hashable, default: Any = None) -> Any:
        return self._d.get(key, default)

    def set(self, key: Hashable, value: Any, expires_at: float = 0.0) -> None:
        self._d[key] = value
        self._d.move_to_end(key)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        return self._d.pop(key, default)

    def evict(self) -> tuple[Hashable, Any] | None:
        return self._d.popitem(last=False) if self._d else None

    def clear(self) -> None:
        self._d.clear()


class TTLStore(Store):
    """Evicts the entry closest to expiry; entries without one (0) by insertion order, last."""

    name = "ttl"

    def __init__(self) -> None:
        self._d: dict[Hashable, tuple[Any, int]] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()

    def get(self, key: Hashable, default: Any = None) -> Any:
        item = self._d.get(key)
        return default if item is None else item[0]

    peek = get

    def set(self, key: Hashable, value: Any, expires_at: float = 0.0) -> None:
        seq = next(self._seq)
        self._d[key] = (value, seq)
        heapq.heappush(self._heap, (expires_at or float("inf"), seq, key))
        if len(self._heap) > 2 * len(self._d) + 64:
            self._heap = [e for e in self._heap if self._d.get(e[2], (None, -1))[1] == e[1]]
            heapq.heapify(self._heap)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        item = self._d.pop(key, None)
        return default if item is None else item[0]

    def evict(self) -> tuple[Hashable, Any] | None:
        while self._heap:
            _, seq, key = heapq.heappop(self._heap)
            item = self._d.get(key)
            if item is not None and item[1] == seq:
                del self._d[key]
                return key, item[0]
        return None

    def clear(self) -> None:
        self._d.clear()
        self._heap.clear()


class SieveStore(Store):
    """SIEVE over a list used as the queue (index 0 = oldest); holes are compacted lazily."""

    name = "sieve"

    def __init__(self) -> None:
        self._d: dict[Hashable, list[Any]] = {}  # key -> [value, visited, slot index]
        self._queue: list[Hashable | None] = []
        self._hand = 0
        self._holes = 0

    def get(self, key: Hashable, default: Any = None) -> Any:
        node = self._d.get(key)
        if node is None:
            return default
        node[1] = True
        return node[0]

    def peek(self, key: Hashable, default: Any = None) -> Any:
        node = self._d.get(key)
        return default if node is None else node[0]

    def set(self, key: Hashable, value: Any, expires_at: float = 0.0) -> None:
        node = self._d.get(key)
        if node is not None:
            node[0] = value
            node[1] = True
            return
        self._d[key] = [value, False, len(self._queue)]
        self._queue.append(key)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        node = self._d.pop(key, None)
        if node is None:
            return default
        self._queue[node[2]] = None
        self._holes += 1
        self._compact()
        return node[0]

    def evict(self) -> tuple[Hashable, Any] | None:
        if not self._d:
            return None
        queue, d = self._queue, self._d
        hand = self._hand
        while True:
            if hand >= len(queue):
                hand = 0
            key = queue[hand]
            if key is not None:
                node = d[key]
                if not node[1]:
                    break
                node[1] = False
            hand += 1
        del d[key]
        queue[hand] = None
        self._holes += 1
        self._hand = hand + 1
        self._compact()
        return key, node[0]

    def _compact(self) -> None:
        if self._holes <= 64 or self._holes * 2 < len(self._queue):
            return
        kept = 0
        new_hand = 0
        queue: list[Hashable | None] = []
        for i, key in enumerate(self._queue):
            if i == self._hand:
                new_hand = kept
            if key is not None:
                self._d[key][2] = kept
                queue.append(key)
                kept += 1
        self._queue = queue
        self._hand = new_hand if self._hand < len(self._queue) + self._holes else 0
        self._holes = 0

    def clear(self) -> None:
        self._d.clear()
        self._queue.clear()
        self._hand = 0
        self._holes = 0


class S3FIFOStore(Store):
    """S3-FIFO: small (10% of entries), main, ghost; frequencies capped at 3."""

    name = "s3fifo"

    def __init__(self, small_ratio: float = 0.1) -> None:
        self._d: dict[Hashable, Any] = {}
        self._freq: dict[Hashable, int] = {}
        self._small: OrderedDict[Hashable, None] = OrderedDict()
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        # Ghosts are the evicted keys' hashes, not the keys: a ghost costs the same
        # whatever the key's length (a 2 KB URL is not kept alive after its entry),
        # and a collision only sends one new key to the main queue early.
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._ratio = small_ratio

    def get(self, key: Hashable, default: Any = None) -> Any:
        value = self._d.get(key, _MISSING)
        if value is _MISSING:
            return default
        freq = self._freq[key]
        if freq < 3:
            self._freq[key] = freq + 1
        return value

    def peek(self, key: Hashable, default: Any = None) -> Any:
        return self._d.get(key, default)

    def set(self, key: Hashable, value: Any, expires_at: float = 0.0) -> None:
        if key in self._d:
            self._d[key] = value
            return
        self._d[key] = value
        self._freq[key] = 0
        ghost_key = hash(key)
        if ghost_key in self._ghost:
            del self._ghost[ghost_key]
            self._main[key] = None
        else:
            self._small[key] = None

    def pop(self, key: Hashable, default: Any = None) -> Any:
        value = self._d.pop(key, _MISSING)
        if value is _MISSING:
            return default
        del self._freq[key]
        if self._small.pop(key, _MISSING) is _MISSING:
            self._main.pop(key, None)
        return value

    def evict(self) -> tuple[Hashable, Any] | None:
        small, main = self._small, self._main
        freq = self._freq
        while small or main:
            if small and (len(small) >= self._ratio * len(self._d) or not main):
                key, _ = small.popitem(last=False)
                if freq[key] > 0:
                    freq[key] = 0
                    main[key] = None
                    continue
                ghost = self._ghost
                ghost[hash(key)] = None
                while len(ghost) > max(len(self._d), 1):
                    ghost.popitem(last=False)
            else:
                key, _ = main.popitem(last=False)
                f = freq[key]
                if f > 0:
                    freq[key] = f - 1
                    main[key] = None
                    continue
            del freq[key]
            return key, self._d.pop(key)
        return None

    def clear(self) -> None:
        for part in (self._d, self._freq, self._small, self._main, self._ghost):
            part.clear()


POLICIES: dict[str, type[Store]] = {
    "lru": LRUStore,
    "ttl": TTLStore,
    "sieve": SieveStore,
    "s3fifo": S3FIFOStore,
}


def make_store(policy: str) -> Store:
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {policy!r}; expected one of {sorted(POLICIES)}"
        ) from None
