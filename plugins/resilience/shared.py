"""A breaker's state machine shared by every worker through Redis.

Why: with one local breaker per worker process, a dead downstream is probed by
every worker and every machine on its own. With the state in one Redis hash,
the first worker whose window trips opens the breaker for all, and the
half-open trial calls are bounded across all of them.

Each worker still keeps its own sliding window (recording a success costs no
round trip); the state (closed / open until T / half-open with N trials in
flight) lives in Redis and every transition is one Lua script, so two workers
never both win a race. Redis's own clock (``TIME``) is used, so the workers'
clocks need not agree. A successful call in the closed state reads the shared
state at most once per `redis_sync_interval`.

When Redis cannot be reached, the breaker runs on its local state, says so in
its stats (``backend: local-fallback``) and tries Redis again after
`redis_retry_interval`. Nothing raises to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .breaker import CircuitBreakerConfig

__all__ = ["SharedState"]

_KEY_TTL_MS = 24 * 3600 * 1000

# KEYS[1]: the breaker's hash. ARGV[1]: op, ARGV[2]: key TTL (ms), then op arguments.
# Returns {verdict or state, milliseconds left open}.
_SCRIPT = """
local key = KEYS[1]
local op = ARGV[1]
local ttl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', key, 'state', 'until', 'trials', 'ok', 'since')
local state = h[1] or 'closed'
local untl = tonumber(h[2]) or 0
local trials = tonumber(h[3]) or 0
local ok = tonumber(h[4]) or 0
local since = tonumber(h[5]) or 0
local function open(rec)
  redis.call('HSET', key, 'state', 'open', 'until', now + rec, 'trials', 0, 'ok', 0,
             'since', now)
  redis.call('HINCRBY', key, 'trips', 1)
  redis.call('PEXPIRE', key, ttl)
  return {'open', rec}
end
if op == 'read' then
  local left = untl - now
  if left < 0 then left = 0 end
  return {state, left}
elseif op == 'trip' then
  if state == 'closed' or state == 'half_open' then return open(tonumber(ARGV[3])) end
  return {state, math.max(untl - now, 0)}
elseif op == 'trial' then
  local max = tonumber(ARGV[3])
  local stale = tonumber(ARGV[4])
  if state == 'open' then
    if now < untl then return {'open', untl - now} end
    redis.call('HSET', key, 'state', 'half_open', 'trials', 1, 'ok', 0, 'since', now)
    redis.call('PEXPIRE', key, ttl)
    return {'granted', 0}
  elseif state == 'half_open' then
    if now - since > stale then
      -- trials outlived half_open_stale_after (a worker died mid-trial): start over
      redis.call('HSET', key, 'trials', 1, 'ok', 0, 'since', now)
      return {'granted', 0}
    end
    if trials + ok < max then
      redis.call('HINCRBY', key, 'trials', 1)
      return {'granted', 0}
    end
    return {'denied', 0}
  end
  return {state, 0}
elseif op == 'result' then
  if state ~= 'half_open' then return {state, math.max(untl - now, 0)} end
  local rec = tonumber(ARGV[4])
  if ARGV[3] ~= '1' then return open(rec) end
  ok = ok + 1
  if trials > 0 then trials = trials - 1 end
  if ok >= tonumber(ARGV[5]) then
    redis.call('HSET', key, 'state', 'closed', 'until', 0, 'trials', 0, 'ok', 0, 'since', now)
    return {'closed', 0}
  end
  redis.call('HSET', key, 'trials', trials, 'ok', ok)
  return {'half_open', 0}
elseif op == 'release' then
  if state == 'half_open' and trials > 0 then redis.call('HINCRBY', key, 'trials', -1) end
  return {state, 0}
elseif op == 'force' then
  redis.call('HSET', key, 'state', ARGV[3], 'until', 0, 'trials', 0, 'ok', 0, 'since', now)
  redis.call('PEXPIRE', key, ttl)
  return {ARGV[3], 0}
end
return {state, 0}
"""


class SharedState:
    """One breaker's state in a Redis hash; every method returns None when Redis failed."""

    def __init__(self, url: str, key: str, config: CircuitBreakerConfig) -> None:
        self.url = url
        self.key = key
        self.config = config
        self._client: Any = None
        self._script: Any = None
        self._down_until = 0.0
        self.errors = 0
        self.pool_waits = 0
        self.last_error = ""
        self._pending: list[tuple[str, ...]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def healthy(self) -> bool:
        return monotonic() >= self._down_until

    def _connect(self) -> None:
        from overdrive.plugins.redisconn import shared_client

        from .ratelimit import REDIS_OPTIONS

        # the process's shared pool (the rate limiter's too), not one per breaker
        self._client = shared_client(self.url, **REDIS_OPTIONS)
        self._script = self._client.register_script(_SCRIPT)

    async def _run(self, *args: Any) -> tuple[str, float] | None:
        if not self.healthy:
            return None
        try:
            if self._client is None:
                self._connect()
            while self._pending:
                await self._script(
                    keys=[self.key], args=[self._pending[0][0], _KEY_TTL_MS, *self._pending[0][1:]]
                )
                self._pending.pop(0)
            raw = await self._script(keys=[self.key], args=[args[0], _KEY_TTL_MS, *args[1:]])
        except Exception as exc:  # Redis down, timed out, refused: run on local state
            from overdrive.plugins.redisconn import is_pool_wait

            if is_pool_wait(exc):  # every shared connection busy: this call only
                self.pool_waits += 1
                return None
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            self._down_until = monotonic() + self.config.redis_retry_interval
            return None  # the shared client reconnects by itself at the next try
        state = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        return state, int(raw[1]) / 1000.0

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def read(self) -> tuple[str, float] | None:
        return await self._run("read")

    async def trip(self, recovery: float) -> None:
        await self._run("trip", int(recovery * 1000))

    async def try_trial(self, max_calls: int, stale_after: float) -> tuple[str | None, float]:
        result = await self._run("trial", max_calls, int(stale_after * 1000))
        if result is None:
            return None, 0.0
        return result

    async def trial_result(self, ok: bool, recovery: float, max_calls: int) -> str | None:
        result = await self._run("result", "1" if ok else "0", int(recovery * 1000), max_calls)
        return None if result is None else result[0]

    def schedule_release(self) -> None:
        self._spawn(self._run("release"))

    def schedule_force(self, state: str) -> None:
        """An operator state: applied now if a loop runs, else before the next script."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._pending.append(("force", state))
            return
        self._spawn(self._run("force", state))

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "redis" if self.healthy else "local-fallback",
            "redis_ok": self.healthy,
            "redis_errors": self.errors,
            "redis_last_error": self.last_error,
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        client, self._client = self._client, None
        if client is not None:
            from overdrive.plugins.redisconn import release_shared

            with contextlib.suppress(Exception):
                await release_shared(client)
