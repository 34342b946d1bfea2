"""Revalidation of a stale stored response with a conditional request (RFC 9111 4.3).

When the entry for a GET is stale (or stored with ``no-cache``) and the app gave
it a validator (``ETag``, ``Last-Modified``), the cache does not throw it away:
it asks the app again with ``If-None-Match`` / ``If-Modified-Since`` from the
stored entry. A ``304 Not Modified`` renews the entry (its headers replaced by
the 304's, RFC 9111 3.2 and 4.3.4) and the client gets the stored body; any
other answer goes to the client as it streams, and is stored when it may be.

`Revalidation` is the ASGI answer `cache_lookup` returns for that: it calls the
app itself (the request's own ``receive``, a copy of its scope with the
conditional headers), so the middleware's response path (``on_response_start``,
the ``x-cache`` header) sees exactly what the client gets.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import anyio

from overdrive.context import CapturedResponse

from .http import StoredResponse, strong_etag
from .store import connection_listed

if TYPE_CHECKING:
    from overdrive.context import RequestContext

    from .plugin import CachePlugin
    from .store import Route

__all__ = ["Revalidation", "conditional_headers", "freshened_headers"]

#: Request fields replaced by the cache's own conditions (the client's are answered
#: by the cache from the renewed entry), and Range (the whole representation is fetched).
_CLIENT_CONDITIONS = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range",
     b"range"}
)  # fmt: skip
#: Never taken from a 304 into the stored headers (RFC 9111 3.2: the stored body's
#: length stays; hop-by-hop fields are the 304's own).
_KEEP_STORED = frozenset(
    {b"content-length", b"content-range", b"transfer-encoding", b"connection", b"keep-alive",
     b"te", b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-authorization"}
)  # fmt: skip


def conditional_headers(stored: StoredResponse) -> list[tuple[bytes, bytes]]:
    """If-None-Match / If-Modified-Since from the app's own validators; [] when none.

    An ETag the cache made up (from the body's digest, for its clients) is never
    sent: the app does not know it.
    """
    out: list[tuple[bytes, bytes]] = []
    if stored.etag is not None and stored.etag != strong_etag(stored.body):
        out.append((b"if-none-match", stored.etag))
    for name, value in stored.headers:
        if name == b"last-modified":
            out.append((b"if-modified-since", value))
            break
    return out


def freshened_headers(
    stored: list[tuple[bytes, bytes]], update: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The stored headers with every field the 304 carries replaced by the 304's."""
    drop = connection_listed(update) | _KEEP_STORED
    fresh = [(k.lower(), v) for k, v in update if k.lower() not in drop]
    names = {k for k, _ in fresh}
    return [(k, v) for k, v in stored if k not in names] + fresh


class Revalidation:
    """The ASGI answer for a stale entry with a validator: a conditional call to the app."""

    __slots__ = ("conditions", "ctx", "key", "plugin", "request_time", "route", "stale")

    def __init__(
        self,
        plugin: CachePlugin,
        ctx: RequestContext,
        key: str,
        route: Route,
        stale: StoredResponse,
        conditions: tuple[bytes | None, ...],
    ) -> None:
        self.plugin = plugin
        self.ctx = ctx
        self.key = key
        self.route = route
        self.stale = stale
        self.conditions = conditions
        self.request_time = time.time()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        plugin, ctx, stale = self.plugin, self.ctx, self.stale
        app = plugin.host.state.get("app")
        sub = dict(scope)
        sub["headers"] = [
            (k, v) for k, v in scope.get("headers", ()) if k not in _CLIENT_CONDITIONS
        ] + conditional_headers(stale)
        plugin.counts["validations"] += 1
        limit = self.route.settings.max_entry_bytes
        state: dict[str, Any] = {"status": 0, "headers": [], "size": 0, "forward": False}
        chunks: list[bytes] = []

        async def app_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["headers"] = list(message.get("headers") or ())
                status = message["status"]
                if status >= 500 and plugin.serve_stale_on_error(ctx, stale):
                    state["error"] = True  # held back: the stale entry answers instead
                elif status != 304:
                    state["forward"] = True  # a new representation: the client's answer
                    await send(message)
            elif message["type"] == "http.response.body" and state["forward"]:
                body = message.get("body", b"")
                state["size"] += len(body)
                if state["size"] <= limit:
                    chunks.append(body)
                if not message.get("more_body", False):
                    state["complete"] = state["size"] <= limit
                await send(message)

        timeout = ctx.timeout if ctx.timeout is not None else math.inf
        try:
            with anyio.fail_after(timeout):
                await app(sub, receive, app_send)
        except Exception:
            if state["forward"] or not plugin.serve_stale_on_error(ctx, stale):
                raise
            await plugin.stale_answer(ctx, stale)(scope, receive, send)
            return
        now = time.time()
        status = state["status"]
        if status == 304:
            headers = freshened_headers(stale.headers, state["headers"])
            renewed = CapturedResponse(stale.status, headers, stale.body)
            stored = await plugin.store_captured(self.route, self.key, ctx, renewed,
                                                 self.request_time)  # fmt: skip
            plugin.counts["not_modified_upstream"] += 1
            if stored is None:  # no longer storable: answer once from what it says
                stored = StoredResponse(stale.status, headers, stale.body, stored_at=now,
                                        fresh_for=0.0, etag=stale.etag,
                                        last_modified=stale.last_modified)  # fmt: skip
            answer = plugin.hit_answer(ctx, stored, stored.age(now), self.conditions)
            await answer(scope, receive, send)
            return
        if state.get("error"):
            await plugin.stale_answer(ctx, stale)(scope, receive, send)
            return
        if state.get("complete") and status:
            tags = ctx.state.get("cache_tags")
            captured = CapturedResponse(status, state["headers"], b"".join(chunks))
            await plugin.store_captured(self.route, self.key, ctx, captured, self.request_time,
                                        tags)  # fmt: skip
