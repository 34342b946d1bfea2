"""GPU memory admission: budgets per device, placement, a bounded FIFO wait queue.

`Admission.acquire(nbytes)` returns a `Grant` (device, bytes) once the request
fits a device's budget, waits in FIFO order while it does not, and raises
`AdmissionRejected` (the plugin answers 503 + Retry-After) when it can never
fit, when the queue is full, or past `max_wait`. Who holds what is kept by a
ledger: `LocalLedger` (this process) or `RedisLedger` (every worker sharing the
GPUs, atomic Lua scripts, leases that expire so a crashed worker cannot hold
memory forever).

Queue discipline: FIFO, except that a waiter that fits may pass a blocked
older one, and each blocked waiter can be passed at most `max_bypass` times;
after that nobody passes it (``max_bypass=0`` is strict FIFO). This keeps small
requests flowing past a large one without ever starving the large one.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal, Protocol

__all__ = [
    "Admission",
    "AdmissionRejected",
    "Grant",
    "Ledger",
    "LocalLedger",
    "RedisLedger",
    "place",
]

MB = 2**20
Placement = Literal["best_fit", "first_fit"]


class AdmissionRejected(Exception):
    """A request was not admitted. `reason` is for the client; `retry_after` in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(slots=True)
class Grant:
    """What `acquire` gives: a device, the bytes reserved on it, and how long it waited."""

    device: int
    nbytes: int
    lease_id: str
    waited: float = 0.0
    released: bool = False


def place(need: int, budgets: Sequence[int], used: Sequence[int], placement: Placement) -> int:
    """The device `need` bytes go to, or -1. Best fit: the least room left over."""
    best, left = -1, -1
    for i, budget in enumerate(budgets):
        room = budget - used[i] - need
        if room < 0:
            continue
        if placement == "first_fit":
            return i
        if best < 0 or room < left:
            best, left = i, room
    return best


class Ledger(Protocol):
    """Who holds how much on which device. `reserve` is atomic across its users."""

    async def reserve(self, lease_id: str, need: int, budgets: Sequence[int]) -> int: ...

    async def release(self, lease_id: str, device: int, need: int) -> bool: ...

    async def used(self, devices: int) -> list[int]: ...


class LocalLedger:
    """The embedded ledger: one process, exact and cheap."""

    def __init__(self, devices: int, placement: Placement = "best_fit") -> None:
        self.reserved = [0] * devices
        self.placement: Placement = placement
        self.holders: dict[str, tuple[int, int]] = {}

    async def reserve(self, lease_id: str, need: int, budgets: Sequence[int]) -> int:
        device = place(need, budgets, self.reserved, self.placement)
        if device >= 0:
            self.reserved[device] += need
            self.holders[lease_id] = (device, need)
        return device

    async def release(self, lease_id: str, device: int, need: int) -> bool:
        if self.holders.pop(lease_id, None) is None:
            return False
        self.reserved[device] -= need
        return True

    async def used(self, devices: int) -> list[int]:
        return list(self.reserved)


_PURGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[1], id) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
"""

_USED = """
local function used_by_device(n)
  local used = {}
  for i = 1, n do used[i] = 0 end
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
    local sep = string.find(v, ':', 1, true)
    local d = tonumber(string.sub(v, 1, sep - 1)) + 1
    if d >= 1 and d <= n then used[d] = used[d] + tonumber(string.sub(v, sep + 1)) end
  end
  return used
end
"""

# KEYS: leases hash (id -> "device:bytes"), expiry zset (id -> ms), epoch (see RedisLedger)
# ARGV: id, need, ttl_ms, placement, known, grace_ms, budget_0, budget_1, ...
# -> the device, -1 (no room), -2 (the ledger was lost: wait while holders re-assert)
RESERVE = (
    _PURGE
    + _USED
    + """
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  if ARGV[5] == '1' then
    redis.call('SET', KEYS[3], now)
    return -2
  end
  redis.call('SET', KEYS[3], 0)
elseif tonumber(epoch) > 0 and now < tonumber(epoch) + tonumber(ARGV[6]) then
  return -2
end
local n = #ARGV - 6
local used = used_by_device(n)
local need = tonumber(ARGV[2])
local best, left = -1, -1
for i = 1, n do
  local room = tonumber(ARGV[6 + i]) - used[i] - need
  if room >= 0 then
    if ARGV[4] == 'first_fit' then best = i - 1; break end
    if best < 0 or room < left then best = i - 1; left = room end
  end
end
if best >= 0 then
  redis.call('HSET', KEYS[1], ARGV[1], best .. ':' .. ARGV[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
end
return best
"""
)

# Leases this worker holds that Redis lost (restarted empty, flushed): written back, and
# the epoch marks a recovery so that no worker admits a new claim for grace_ms.
# ARGV: ttl_ms, id, "device:bytes", id, "device:bytes", ... -> how many were re-written
REASSERT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local written = 0
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then written = written + 1 end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[i])
end
if written > 0 then
  local epoch = redis.call('GET', KEYS[3])
  if not epoch or tonumber(epoch) == 0 then redis.call('SET', KEYS[3], now) end
end
return written
"""

RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# ARGV: ttl_ms, id, id, ...  -> how many leases were still there to renew
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[2], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[i])
end
return renewed
"""

# ARGV: devices -> used bytes per device, after purging expired leases
USED = (
    _PURGE
    + _USED
    + """
return used_by_device(tonumber(ARGV[1]))
"""
)


class RedisLedger:
    """Leases of every worker in one Redis hash; reserve/release/renew are Lua scripts.

    Each lease has an expiry (`lease_ttl` seconds, renewed by the holder's
    heartbeat); a crashed worker's leases lapse and their memory comes back.
    Budgets are passed by the caller on every reserve, so each worker's own view
    of device memory bounds what it admits. The keys share one hash tag
    (``{prefix}:leases``...), so the scripts run on a Redis Cluster too.

    Losing the ledger (Redis restarted empty, flushed, failed over without the
    data) must not admit claims against memory that is still in use. The
    `epoch` key says the ledger exists; a worker that has used the ledger
    before and finds it gone marks a recovery, and for `grace` seconds no
    worker admits a new claim (they wait in the queue) while every holder's
    `heartbeat` writes its leases back. `grace` must exceed the holders'
    heartbeat interval. A brand-new ledger (first start) has no grace.

    A release that fails (Redis away, every connection busy) is kept and
    retried by `heartbeat`; the lease is no longer renewed meanwhile, so at
    worst it lapses after `lease_ttl`.
    """

    def __init__(
        self,
        client: Any,
        prefix: str = "overdrive:gpu",
        lease_ttl: float = 60.0,
        placement: Placement = "best_fit",
        grace: float | None = None,
    ) -> None:
        from overdrive.plugins.redisconn import hash_tag

        self.client = client
        tag = hash_tag(prefix)
        self.keys = [f"{tag}:leases", f"{tag}:expiry", f"{tag}:epoch"]
        self.ttl_ms = int(lease_ttl * 1000)
        self.heartbeat_interval = min(lease_ttl / 3, 2.0)
        self.grace_ms = int((self.heartbeat_interval + 1.0 if grace is None else grace) * 1000)
        self.placement: Placement = placement
        self._reserve = client.register_script(RESERVE)
        self._release = client.register_script(RELEASE)
        self._renew = client.register_script(RENEW)
        self._used = client.register_script(USED)
        self._reassert = client.register_script(REASSERT)
        self.held: dict[str, str] = {}  # lease id -> "device:bytes", held by this worker
        self.unreleased: set[str] = set()  # releases that failed; retried by heartbeat
        self.known = False  # this worker has seen the ledger: a missing one was lost
        self.reasserted = 0

    @property
    def mine(self) -> set[str]:
        return set(self.held)

    async def reserve(self, lease_id: str, need: int, budgets: Sequence[int]) -> int:
        args = [
            lease_id,
            need,
            self.ttl_ms,
            self.placement,
            "1" if self.known else "0",
            self.grace_ms,
            *budgets,
        ]
        device = int(await self._reserve(keys=self.keys, args=args))
        self.known = True
        if device == -2:  # the ledger was lost: ours back first, then wait
            await self.reassert()
            return -1
        if device >= 0:
            self.held[lease_id] = f"{device}:{need}"
        return device

    async def release(self, lease_id: str, device: int, need: int) -> bool:
        self.held.pop(lease_id, None)
        try:
            return bool(await self._release(keys=self.keys[:2], args=[lease_id]))
        except Exception:
            self.unreleased.add(lease_id)  # never lost: the heartbeat tries again
            raise

    async def renew(self) -> int:
        """Push back the expiry of this worker's leases; returns how many were renewed."""
        if not self.held:
            return 0
        return int(await self._renew(keys=self.keys[:2], args=[self.ttl_ms, *self.held]))

    async def reassert(self) -> int:
        """Write back those of this worker's leases that Redis lost; returns how many."""
        if not self.held:
            return 0
        pairs = [x for item in self.held.items() for x in item]
        written = int(await self._reassert(keys=self.keys, args=[self.ttl_ms, *pairs]))
        self.reasserted += written
        return written

    async def heartbeat(self) -> tuple[int, int]:
        """Retry failed releases, renew the leases held, write back lost ones.

        Returns (renewed, re-asserted)."""
        for lease_id in list(self.unreleased):
            await self._release(keys=self.keys[:2], args=[lease_id])
            self.unreleased.discard(lease_id)
        held = len(self.held)
        renewed = await self.renew()
        lost = await self.reassert() if renewed < held else 0
        return renewed, lost

    async def used(self, devices: int) -> list[int]:
        return [int(x) for x in await self._used(keys=self.keys[:2], args=[devices])]


@dataclass(slots=True, eq=False)
class _Waiter:
    need: int
    future: asyncio.Future[Grant]
    lease_id: str
    since: float
    bypassed: int = 0


@dataclass
class AdmissionStats:
    admitted: int = 0
    queued: int = 0
    rejected_too_large: int = 0
    rejected_queue_full: int = 0
    rejected_timeout: int = 0
    rejected_backend: int = 0
    released: int = 0
    double_release: int = 0
    wait_total: float = 0.0
    wait_max: float = 0.0
    peak_reserved: list[int] = field(default_factory=list)


def _granted_result(future: asyncio.Future[Grant]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


class Admission:
    """Budgets per device (bytes), a ledger, and the FIFO queue of waiters."""

    def __init__(
        self,
        budgets: Sequence[int],
        *,
        placement: Placement = "best_fit",
        max_queue: int = 100,
        max_wait: float = 30.0,
        max_bypass: int = 4,
        retry_after: float = 1.0,
        ledger: Ledger | None = None,
        poll_interval: float = 0.05,
    ) -> None:
        self.budgets = list(budgets)
        self.placement: Placement = placement
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.max_bypass = max_bypass
        self.retry_after = retry_after
        self.ledger: Ledger = ledger or LocalLedger(len(self.budgets), placement)
        self.shared = not isinstance(self.ledger, LocalLedger)
        self.poll_interval = poll_interval
        self.queue: deque[_Waiter] = deque()
        self.held = [0] * len(self.budgets)
        self.stats = AdmissionStats(peak_reserved=[0] * len(self.budgets))
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._dispatches: set[asyncio.Task[None]] = set()

    @property
    def reserved(self) -> list[int]:
        """Bytes this process holds per device (every worker's, with Redis: see `used`)."""
        return list(self.held)

    def _reject(self, reason: str) -> AdmissionRejected:
        return AdmissionRejected(reason, self.retry_after)

    async def acquire(self, nbytes: int) -> Grant:
        """Reserve `nbytes` on one device; wait (FIFO, bounded) while none has room."""
        if nbytes < 0:
            raise ValueError(f"nbytes: expected >= 0, got {nbytes}")
        largest = max(self.budgets, default=0)
        if nbytes > largest:
            self.stats.rejected_too_large += 1
            raise AdmissionRejected(
                f"needs {nbytes / MB:.0f} MB of GPU memory; the largest device budget is "
                f"{largest / MB:.0f} MB",
                None,
            )
        lease_id = uuid.uuid4().hex
        t0 = perf_counter()
        if not self.queue:
            async with self._lock:
                device = await self._reserve(lease_id, nbytes)
            if device >= 0:
                return self._granted(device, nbytes, lease_id, 0.0)
        if len(self.queue) >= self.max_queue:
            self.stats.rejected_queue_full += 1
            raise self._reject(f"GPU queue full ({self.max_queue} waiting)")
        waiter = _Waiter(nbytes, asyncio.get_running_loop().create_future(), lease_id, t0)
        self.queue.append(waiter)
        self.stats.queued += 1
        self._kick()
        try:
            async with asyncio.timeout(self.max_wait):
                grant = await asyncio.shield(waiter.future)
        except TimeoutError:
            self._abandon(waiter)
            if _granted_result(waiter.future):
                return waiter.future.result()  # granted in the same instant
            self.stats.rejected_timeout += 1
            raise self._reject(
                f"waited {self.max_wait:g}s for {nbytes / MB:.0f} MB of GPU memory"
            ) from None
        except BaseException:
            self._abandon(waiter)
            if _granted_result(waiter.future):
                await self.release(waiter.future.result())  # granted, then the caller left
            raise
        return grant

    def _abandon(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(waiter)
        if not waiter.future.done():
            waiter.future.cancel()
        if self.queue:
            self._kick()  # the waiter that left may have been blocking others

    async def _reserve(self, lease_id: str, nbytes: int) -> int:
        try:
            return await self.ledger.reserve(lease_id, nbytes, self.budgets)
        except Exception as exc:
            if isinstance(exc, AdmissionRejected):
                raise
            self.stats.rejected_backend += 1
            raise self._reject(f"GPU coordination unavailable: {type(exc).__name__}") from exc

    def _granted(self, device: int, nbytes: int, lease_id: str, waited: float) -> Grant:
        st = self.stats
        st.admitted += 1
        st.wait_total += waited
        if waited > st.wait_max:
            st.wait_max = waited
        self.held[device] += nbytes
        if self.held[device] > st.peak_reserved[device]:
            st.peak_reserved[device] = self.held[device]
        return Grant(device, nbytes, lease_id, waited)

    async def release(self, grant: Grant) -> bool:
        """Give a grant back (idempotent: a second call does nothing and returns False)."""
        if grant.released:
            self.stats.double_release += 1
            return False
        grant.released = True
        self.stats.released += 1
        self.held[grant.device] -= grant.nbytes
        try:
            await self.ledger.release(grant.lease_id, grant.device, grant.nbytes)
        finally:
            if self.queue:
                self._kick()
        return True

    def _kick(self) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(self.ledger, LocalLedger):
            self._dispatch_local()
        else:
            task = loop.create_task(self._dispatch_shared())
            self._dispatches.add(task)
            task.add_done_callback(self._dispatches.discard)
            if self._poller is None or self._poller.done():
                self._poller = loop.create_task(self._poll())

    def _dispatch_local(self) -> None:
        """Admit waiters in order; a fitting waiter may pass blocked ones (bounded)."""
        ledger = self.ledger
        assert isinstance(ledger, LocalLedger)
        blocked: _Waiter | None = None
        now = perf_counter()
        for waiter in list(self.queue):
            if waiter.future.done():
                continue
            if blocked is not None and blocked.bypassed >= self.max_bypass:
                break
            device = place(waiter.need, self.budgets, ledger.reserved, self.placement)
            if device < 0:
                blocked = blocked or waiter
                continue
            ledger.reserved[device] += waiter.need
            ledger.holders[waiter.lease_id] = (device, waiter.need)
            self.queue.remove(waiter)
            if blocked is not None:
                blocked.bypassed += 1
            waiter.future.set_result(
                self._granted(device, waiter.need, waiter.lease_id, now - waiter.since)
            )

    async def _dispatch_shared(self) -> None:
        if self._lock.locked():
            return  # the running dispatch (or poller) will see the change
        async with self._lock:
            blocked: _Waiter | None = None
            for waiter in list(self.queue):
                if waiter.future.done():
                    continue
                if blocked is not None and blocked.bypassed >= self.max_bypass:
                    break
                try:
                    device = await self.ledger.reserve(waiter.lease_id, waiter.need, self.budgets)
                except Exception as exc:
                    self.stats.rejected_backend += 1
                    if waiter in self.queue:
                        self.queue.remove(waiter)
                    if not waiter.future.done():
                        waiter.future.set_exception(
                            self._reject(f"GPU coordination unavailable: {type(exc).__name__}")
                        )
                    continue
                if device < 0:
                    blocked = blocked or waiter
                    continue
                if waiter.future.done():  # left while we were reserving: give it back
                    await self.ledger.release(waiter.lease_id, device, waiter.need)
                    continue
                self.queue.remove(waiter)
                if blocked is not None:
                    blocked.bypassed += 1
                waited = perf_counter() - waiter.since
                waiter.future.set_result(
                    self._granted(device, waiter.need, waiter.lease_id, waited)
                )

    async def _poll(self) -> None:
        """With a shared ledger other workers' releases are not signalled: look again."""
        while self.queue:
            await asyncio.sleep(self.poll_interval)
            await self._dispatch_shared()

    async def used(self) -> list[int]:
        """Bytes held per device by every user of the ledger."""
        return await self.ledger.used(len(self.budgets))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for waiter in list(self.queue):
            if not waiter.future.done():
                waiter.future.set_exception(self._reject("GPU admission is shutting down"))
        self.queue.clear()
