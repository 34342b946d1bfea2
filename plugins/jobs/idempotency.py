"""Idempotency keys (the IETF httpapi ``Idempotency-Key`` draft, Stripe's semantics).

A key is claimed by the first request that carries it; the claim records the
request's fingerprint (a hash of method, path, query, content type and body).
A repeat with the same key and fingerprint joins the first (waits for its
response) or gets 409; after it finished, the stored response is replayed with
``Idempotent-Replayed: true``; the same key with another fingerprint gets 422.
Keys are scoped per principal (a hash of the credentials), so one client's key
never reaches another's response.

Stored: responses with a status below 500 other than 408, 425 and 429 (a retry
of a failure must be able to run again, a stored 500 would make the key useless).
A request that ends with no complete response, or one of those statuses, gives
its claim back. Records are JSON (body in base64), never pickle.

Two stores: `MemoryKeys` (this process) and `RedisKeys` (every worker; ``SET NX``
claims, so two workers racing on a key run it once).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import anyio

from .store import Result

__all__ = ["MemoryKeys", "Record", "RedisKeys", "fingerprint", "storable", "valid_key"]

MAX_KEY = 255


def valid_key(raw: bytes) -> str | None:
    """The key (a bare token, or a quoted sf-string as the draft writes it), or None."""
    text = raw.decode("latin-1").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not text or len(text) > MAX_KEY:
        return None
    if not all(0x21 <= ord(c) <= 0x7E for c in text):
        return None
    return text


def fingerprint(method: str, path: str, query: bytes, ctype: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, ctype.encode("latin-1"), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def storable(status: int) -> bool:
    return status < 500 and status not in (408, 425, 429)


@dataclass(slots=True)
class Record:
    fingerprint: str
    owner: str
    result: Result | None = None  # None while the first request runs

    def dumps(self) -> str:
        out: dict[str, Any] = {"fp": self.fingerprint, "owner": self.owner}
        if self.result is not None:
            out["status"] = self.result.status
            out["headers"] = [
                [n.decode("latin-1"), v.decode("latin-1")] for n, v in self.result.headers
            ]
            out["body"] = base64.b64encode(self.result.body).decode()
        return json.dumps(out)

    @classmethod
    def loads(cls, raw: str | bytes) -> Record | None:
        """A record, or None for anything malformed (a poisoned store is a miss)."""
        try:
            d = json.loads(raw)
            result = None
            if "status" in d:
                result = Result(
                    int(d["status"]),
                    [(str(n).encode("latin-1"), str(v).encode("latin-1")) for n, v in d["headers"]],
                    base64.b64decode(d["body"], validate=True),
                )
            return cls(str(d["fp"]), str(d["owner"]), result)
        except Exception:
            return None


def new_owner() -> str:
    return secrets.token_hex(8)


class MemoryKeys:
    """Keys in this process: a dict with expiry, bounded by `max_keys`."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._data: dict[str, tuple[float, Record]] = {}
        self._events: dict[str, anyio.Event] = {}

    def _live(self, key: str) -> Record | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            del self._data[key]
            return None
        return item[1]

    def _trim(self) -> None:
        if len(self._data) < self.max_keys:
            return
        now = time.monotonic()
        for k in [k for k, (exp, _) in self._data.items() if exp <= now]:
            del self._data[k]
        while len(self._data) >= self.max_keys:  # oldest inserted first
            del self._data[next(iter(self._data))]

    async def claim(self, key: str, record: Record, ttl: float) -> Record | None:
        """Claim `key` for `record` (None: claimed) or return the record holding it."""
        held = self._live(key)
        if held is not None:
            return held
        self._trim()
        self._data[key] = (time.monotonic() + ttl, record)
        return None

    async def complete(self, key: str, record: Record, ttl: float) -> None:
        held = self._live(key)
        if held is not None and held.owner == record.owner:
            self._data[key] = (time.monotonic() + ttl, record)
        self._wake(key)

    async def release(self, key: str, owner: str) -> None:
        held = self._live(key)
        if held is not None and held.owner == owner:
            del self._data[key]
        self._wake(key)

    def _wake(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    async def wait(self, key: str, timeout: float) -> Record | None:
        """The key's record once it holds a result or is gone; None on timeout."""
        with anyio.move_on_after(timeout):
            while True:
                held = self._live(key)
                if held is None or held.result is not None:
                    return held
                event = self._events.get(key)
                if event is None:
                    event = self._events[key] = anyio.Event()
                await event.wait()
        return _TIMEOUT

    async def close(self) -> None:
        pass


_TIMEOUT: Any = False  # wait()'s answer on timeout (distinct from None: the key is gone)

_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['owner'] == ARGV[1] then
  if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 0
"""


class RedisKeys:
    """Keys in Redis, shared by every worker: ``SET NX PX`` claims, owner-checked writes."""

    poll = 0.05  # seconds between looks while joining a request running on another worker

    def __init__(self, url: str, prefix: str) -> None:
        from overdrive.plugins.redisconn import redis_client

        # the shared helper: plain, TLS, Cluster or Sentinel URLs alike (every command
        # and the script touch one key, so any cluster slot layout works)
        self.client = redis_client(url, socket_timeout=2.0, connect_timeout=2.0)
        self.prefix = prefix
        self._script = self.client.register_script(_RELEASE)

    async def claim(self, key: str, record: Record, ttl: float) -> Record | None:
        k = self.prefix + key
        ok = await self.client.set(k, record.dumps(), nx=True, px=max(1, int(ttl * 1000)))
        if ok:
            return None
        raw = await self.client.get(k)
        if raw is None:  # expired between the two calls: try once more
            ok = await self.client.set(k, record.dumps(), nx=True, px=max(1, int(ttl * 1000)))
            return None if ok else Record("", "")
        held = Record.loads(raw)
        return held if held is not None else Record("", "")  # poisoned: never ours

    async def complete(self, key: str, record: Record, ttl: float) -> None:
        await self._script(
            keys=[self.prefix + key],
            args=[record.owner, record.dumps(), max(1, int(ttl * 1000))],
        )

    async def release(self, key: str, owner: str) -> None:
        await self._script(keys=[self.prefix + key], args=[owner, "", 0])

    async def wait(self, key: str, timeout: float) -> Record | None:
        with anyio.move_on_after(timeout):
            while True:
                raw = await self.client.get(self.prefix + key)
                if raw is None:
                    return None
                held = Record.loads(raw)
                if held is None or held.result is not None:
                    return held
                await anyio.sleep(self.poll)
        return _TIMEOUT

    async def close(self) -> None:
        from overdrive.plugins.redisconn import close_client

        await close_client(self.client)
