"""HTTP pieces: the ``Prefer`` header (RFC 7240), principals, tenants, bounded bodies.

Nothing here holds state; the plugin and the monitor use these functions.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from overdrive.middleware.responses import PlainResponse

__all__ = [
    "BodyTooLarge",
    "CapturedRequest",
    "MalformedPrefer",
    "Preferences",
    "ReplayReceive",
    "json_response",
    "parse_prefer",
    "principal_of",
    "read_body",
    "tenant_of",
]

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class MalformedPrefer(ValueError):
    """A ``Prefer`` preference we act on has a value we cannot read."""


class BodyTooLarge(Exception):
    """The request body is longer than the bound."""


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


@dataclass(slots=True)
class Preferences:
    respond_async: bool = False
    wait: float | None = None


def parse_prefer(values: list[bytes]) -> Preferences:
    """Read ``respond-async`` and ``wait=N`` from every ``Prefer`` header (RFC 7240 s2).

    Preferences are comma-separated; a preference's parameters follow ``;`` and
    are ignored. Unknown preferences are ignored, as the RFC asks. A ``wait``
    that is not a non-negative number raises `MalformedPrefer` (answered 400):
    guessing what the client meant would be worse.
    """
    prefs = Preferences()
    for raw in values:
        text = raw.decode("latin-1")
        for item in _split(text):
            token = item.split(";", 1)[0].strip()
            if not token:
                continue
            name, eq, value = token.partition("=")
            name = name.strip().lower()
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if name == "respond-async":
                prefs.respond_async = True
            elif name == "wait":
                if not eq:
                    raise MalformedPrefer("Prefer: wait needs a value in seconds (wait=10)")
                try:
                    seconds = float(value)
                except ValueError:
                    raise MalformedPrefer(f"Prefer: wait={value!r} is not a number") from None
                if not math.isfinite(seconds) or seconds < 0:
                    raise MalformedPrefer(f"Prefer: wait={value!r} must be >= 0")
                prefs.wait = seconds
    return prefs


def _split(text: str) -> list[str]:
    """Split on commas outside double quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def principal_of(raw_headers: list[tuple[bytes, bytes]], names: frozenset[bytes]) -> str:
    """A hash of the credentials the request carries (the headers in `names`).

    Requests with the same credentials are the same principal; requests with none
    are one "anonymous" principal. Only the hash is kept, never the credentials.
    """
    h = hashlib.sha256()
    for name, value in sorted((n.lower(), v) for n, v in raw_headers if n.lower() in names):
        h.update(name + b"\x00" + value + b"\x01")
    return h.hexdigest()[:32]


def tenant_of(spec: str, ctx: Any, principal: str) -> str:
    """The tenant a request is queued for: its principal, a header, or a path parameter."""
    if spec.startswith("header:"):
        wanted = spec[7:].strip().lower()
        value = ctx.headers.get(wanted)
        return value[:200] if value else "-"
    if spec.startswith("path:"):
        param = "{" + spec[5:].strip()
        segments = [s for s in ctx.path.split("/") if s]
        for rule in getattr(ctx.policy, "rules", ()):
            for i, seg in enumerate(s for s in rule.path.split("/") if s):
                if (seg == param + "}" or seg.startswith(param + ":")) and i < len(segments):
                    return segments[i][:200]
        return "-"
    return principal


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, or `BodyTooLarge` past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise BodyTooLarge
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


class ReplayReceive:
    """A `receive` that gives `body` once, then defers to `after` (the client's own
    receive, for a disconnect) or, when there is none, waits for `done` and reports a
    disconnect as a server would once the response is over."""

    __slots__ = ("after", "body", "done", "sent")

    def __init__(self, body: bytes, after: Receive | None = None, done: Any = None) -> None:
        self.body = body
        self.after = after
        self.done = done
        self.sent = False

    async def __call__(self) -> MutableMapping[str, Any]:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if self.after is not None:
            return await self.after()
        await self.done.wait()
        return {"type": "http.disconnect"}


# Request headers a job does not replay: they asked for the job itself.
_NOT_REPLAYED = frozenset({b"prefer", b"idempotency-key", b"content-length"})


@dataclass(slots=True)
class CapturedRequest:
    """What a job replays: the request as it arrived, its body read (bounded)."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    scheme: str
    server: Any
    client: Any
    root_path: str
    http_version: str

    @classmethod
    def of(cls, scope: MutableMapping[str, Any], body: bytes) -> CapturedRequest:
        headers = [(n, v) for n, v in scope.get("headers") or () if n.lower() not in _NOT_REPLAYED]
        headers.append((b"content-length", str(len(body)).encode()))
        return cls(
            method=scope.get("method", "POST"),
            path=scope.get("path", "/"),
            raw_path=scope.get("raw_path") or scope.get("path", "/").encode(),
            query_string=scope.get("query_string", b""),
            headers=headers,
            body=body,
            scheme=scope.get("scheme", "http"),
            server=scope.get("server"),
            client=scope.get("client"),
            root_path=scope.get("root_path", ""),
            http_version=scope.get("http_version", "1.1"),
        )

    def scope(self, extensions: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": self.scheme,
            "server": self.server,
            "client": self.client,
            "root_path": self.root_path,
            "path": self.path,
            "raw_path": self.raw_path,
            "query_string": self.query_string,
            "headers": list(self.headers),
            "extensions": extensions,
        }


def json_response(
    status: int,
    data: Any,
    headers: list[tuple[bytes, bytes]] | None = None,
    retry_after: float | None = None,
) -> PlainResponse:
    body = json.dumps(data, separators=(",", ":")).encode()
    return PlainResponse(
        status,
        body,
        headers,
        content_type=b"application/json",
        retry_after=None if retry_after is None else max(1.0, retry_after),
    )
