"""What may be stored and for how long (RFC 9111 section 3 and 4.2), per route.

`Route` is compiled once per effective settings object (the plugin's, or a
`[[routes]]` override): the request headers to read, the query parameters to
ignore, the key. `judge` decides whether a response may be stored and shared,
and `build_stored` turns a captured response into a `StoredResponse`.
`revalidate` fetches a fresh copy from the app in the background
(stale-while-revalidate).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from overdrive.context import CapturedResponse, RequestContext
from overdrive.middleware.internal import EmptyRequest

from .http import (
    DROP_HEADERS,
    StoredResponse,
    delta_seconds,
    normalize_query,
    parse_age,
    parse_cache_control,
    parse_http_date,
    strong_etag,
    vary_names,
)
from .settings import CacheSettings
from .targeted import parse_targeted

__all__ = ["Judgement", "Route", "build_stored", "duplicated", "judge", "revalidate"]

_READ_BASE = {
    b"authorization": 0,
    b"cookie": 1,
    b"cache-control": 2,
    b"pragma": 3,
    b"if-none-match": 4,
    b"if-modified-since": 5,
    b"range": 6,
    b"if-range": 7,
    b"host": 8,
}
UNKEYED_KIND = 15  # a header frameworks trust that is not in the key: bypass
_KEYED = 16  # key_headers get kinds 16, 17, ...: each its own bit for duplicate checks
_INCOMPRESSIBLE = ("image/", "video/", "audio/", "font/woff", "application/zip", "application/gzip")
_CONDITIONAL = frozenset(
    {b"if-none-match", b"if-modified-since", b"range", b"if-range", b"cache-control", b"pragma"}
)
MAX_TAGS = 32
MAX_KEY = 2048


class Route:
    """A settings object compiled for the hot path."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        keyed = set(settings.key_headers)
        # Every header the lookup reads, by kind; a kind seen twice in a request bypasses
        # the cache (frameworks read the first of a repeated header, a joined value or
        # the last: the key must not be built from one and the response from another).
        self.read = dict(_READ_BASE)
        for name in settings.unkeyed_headers:
            if name not in keyed:
                self.read[name.encode("latin-1")] = UNKEYED_KIND
        for i, name in enumerate(sorted(keyed)):
            self.read.setdefault(name.encode("latin-1"), _KEYED + i)
        self.sort_query = settings.sort_query
        self.by_auth = "authorization" in keyed
        self.by_cookie = "cookie" in keyed
        self.key_headers = tuple(sorted(keyed))
        self.ignore = frozenset(p.encode("utf-8") for p in settings.ignore_query_params)
        self.tag_header = settings.tag_header.encode("latin-1")
        self.statuses = frozenset(settings.cacheable_statuses)
        self.drop = DROP_HEADERS | {self.tag_header}
        self.targets = tuple(t.encode("latin-1") for t in settings.targeted_cache_control)

    # -- keys ------------------------------------------------------------------------

    def base_key(self, raw_path: bytes, query: bytes, host: bytes) -> str:
        q = normalize_query(query, self.ignore, self.sort_query)
        key = "GET " + raw_path.decode("latin-1") + "?" + q.decode("latin-1") + "\n"
        key += host.lower().decode("latin-1")
        if len(key) > MAX_KEY:  # bounded keys; the path's start stays readable for prefixes
            digest = hashlib.blake2b(key.encode("latin-1"), digest_size=20).hexdigest()
            key = "GET " + raw_path[:512].decode("latin-1") + "#" + digest
        return key

    def key(self, ctx: RequestContext, host: bytes) -> str:
        scope = ctx.scope
        raw_path = scope.get("raw_path")
        if not raw_path:
            raw_path = ctx.path.encode("utf-8", "surrogatepass")
        elif b"?" in raw_path:  # some servers (httpx's ASGI transport) include the query
            raw_path = raw_path.partition(b"?")[0]
        if not host:
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}".encode() if server else b""
        key = self.base_key(raw_path, scope.get("query_string", b""), host)
        if self.key_headers:
            headers = ctx.headers
            h = hashlib.blake2b(digest_size=16)
            for name in self.key_headers:
                h.update(
                    name.encode() + b"\x00" + headers.get(name, "").encode("latin-1", "replace")
                )
                h.update(b"\x01")
            key += "\n" + h.hexdigest()
        return key

    @staticmethod
    def request_directives(cc: bytes | None, pragma: bytes | None) -> dict[str, Any]:
        """The request's Cache-Control that a cache obeys: no-store, no-cache, max-age."""
        out: dict[str, Any] = {}
        if cc is not None:
            parsed = parse_cache_control(cc.decode("latin-1"))
            if "no-store" in parsed:
                out["no-store"] = True
            if "no-cache" in parsed:
                out["no-cache"] = True
            if "max-age" in parsed:
                age = delta_seconds(parsed["max-age"])
                if age is not None:
                    out["max-age"] = age
        elif pragma is not None and b"no-cache" in pragma.lower():
            out["no-cache"] = True
        return out

    # -- responses -----------------------------------------------------------------------

    def vary_of(self, headers: list[tuple[bytes, bytes]]) -> tuple[str, ...] | None:
        return vary_names(v for k, v in headers if k.lower() == b"vary")

    def shareable(
        self, status: int, headers: list[tuple[bytes, bytes]], ctx: RequestContext
    ) -> bool:
        return self.fresh_age(status, headers, None) is not None

    def fresh_age(
        self, status: int, headers: list[tuple[bytes, bytes]], request_time: float | None
    ) -> float | None:
        """The age of a response that arrives fresh and storable; None otherwise (a
        request waiting on it must not get it: it is not a response the cache may use)."""
        j = judge(self, status, headers, time.time(), request_time)
        if j is None or j.fresh_for <= j.initial_age:
            return None
        return j.initial_age

    def client_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The leader's response headers as a follower may get them."""
        drop = self.drop - {b"content-length"}
        return [(k, v) for k, v in headers if k.lower() not in drop]


def duplicated(raw_headers: list[tuple[bytes, bytes]], names: tuple[str, ...]) -> bool:
    """Whether one of `names` (lower-case) comes more than once in the request."""
    if not names:
        return False
    wanted = {n.encode("latin-1", "replace") for n in names}
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        if name in wanted:
            if name in seen:
                return True
            seen.add(name)
    return False


class Judgement:
    __slots__ = (
        "etag",
        "fresh_for",
        "initial_age",
        "last_modified",
        "sie",
        "swr",
        "tags",
        "validator",
        "vary",
    )

    def __init__(self) -> None:
        self.fresh_for = 0.0
        self.swr = 0.0
        self.sie = 0.0
        self.initial_age = 0.0
        self.vary: tuple[str, ...] = ()
        self.etag: bytes | None = None
        self.last_modified: float | None = None
        self.tags: tuple[str, ...] = ()
        self.validator = False  # the origin gave an ETag or Last-Modified to revalidate with


#: RFC 9110 15: the codes it defines, "understood" for `must-understand` (RFC 9111 5.2.2.3).
UNDERSTOOD = frozenset(
    {200, 201, 202, 203, 204, 205, 206, 300, 301, 302, 303, 304, 305, 307, 308}
    | set(range(400, 418)) | {421, 422, 426} | set(range(500, 506))
)  # fmt: skip
#: Never stored, whatever the response says: a part is not the whole (Range requests
#: are answered from a stored 200), a 304 is not a representation.
NEVER_STORED = frozenset({206, 304})


def judge(
    route: Route,
    status: int,
    headers: list[tuple[bytes, bytes]],
    now: float,
    request_time: float | None = None,
) -> Judgement | None:
    """May this response be stored in a shared cache, and for how long? None: no.

    `now` is when the response arrived, `request_time` when its request was made
    (for the response delay in the age, RFC 9111 4.2.3; `now` when unknown).
    """
    if status < 200 or status in NEVER_STORED:
        return None
    s = route.settings
    cc_parts: list[str] = []
    targeted: dict[bytes, list[str]] = {}
    vary: list[bytes] = []
    expires: list[str] = []
    ages: list[str] = []
    date = last_modified = None
    etag: bytes | None = None
    tags: list[str] = []
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == b"cache-control":
            cc_parts.append(value.decode("latin-1"))
        elif name == b"set-cookie":
            return None
        elif name == b"vary":
            vary.append(value)
        elif name == b"expires":
            expires.append(value.decode("latin-1"))
        elif name == b"date":
            date = value.decode("latin-1")
        elif name == b"age":
            ages.append(value.decode("latin-1"))
        elif name == b"etag":
            etag = value
        elif name == b"last-modified":
            last_modified = value.decode("latin-1")
        elif name == route.tag_header:
            tags.extend(t.strip() for t in value.decode("latin-1").split(",") if t.strip())
        elif name in route.targets:
            targeted.setdefault(name, []).append(value.decode("latin-1"))
    cc = None
    for target in route.targets:  # RFC 9213: the first valid targeted field wins
        if target in targeted:
            cc = parse_targeted(", ".join(targeted[target]))
            if cc is not None:
                break
    if cc is None:
        cc = parse_cache_control(", ".join(cc_parts)) if cc_parts else {}
    if "must-understand" in cc:  # RFC 9111 5.2.2.3: no-store is for caches that do not
        if status not in UNDERSTOOD:
            return None
    elif "no-store" in cc:
        return None
    if "private" in cc and not (route.by_auth or route.by_cookie):
        return None
    names = vary_names(vary) if vary else ()
    if names is None:
        return None
    validator = etag is not None or last_modified is not None
    j = Judgement()
    if "s-maxage" in cc or "max-age" in cc:
        fresh = delta_seconds(cc.get("s-maxage") if "s-maxage" in cc else cc.get("max-age"))
        if fresh is None:
            return None  # malformed: not cached rather than guessed
        j.fresh_for = float(fresh)
    elif expires:
        # Several Expires lines, or one that is not an HTTP-date: already expired (5.3).
        when = parse_http_date(expires[0], now) if len(expires) == 1 else None
        base = parse_http_date(date, now) or now
        j.fresh_for = (when - base) if when is not None else 0.0
    elif status not in route.statuses and "public" not in cc:
        return None  # RFC 9111 3: other codes only with explicit freshness (or public)
    elif s.ttl is not None or s.default_ttl is not None:
        j.fresh_for = float(s.ttl if s.ttl is not None else s.default_ttl)  # type: ignore[arg-type]
    elif (lm := parse_http_date(last_modified, now)) is not None and s.heuristic_fraction > 0:
        # RFC 9111 4.2.2: a fraction of the time since it last changed, bounded.
        since = (parse_http_date(date, now) or now) - lm
        j.fresh_for = min(max(since, 0.0) * s.heuristic_fraction, float(s.heuristic_max))
    elif not (validator and "no-cache" in cc):
        return None
    if "no-cache" in cc:
        j.fresh_for = 0.0  # stored, and revalidated before each use (5.2.2.4)
    if j.fresh_for <= 0 and not validator:
        return None  # stale on arrival, nothing to revalidate it with
    j.fresh_for = max(j.fresh_for, 0.0)
    if not ("must-revalidate" in cc or "proxy-revalidate" in cc or "no-cache" in cc
            or "s-maxage" in cc):  # fmt: skip
        swr = delta_seconds(cc.get("stale-while-revalidate"))
        sie = delta_seconds(cc.get("stale-if-error"))
        j.swr = float(swr if swr is not None else s.stale_while_revalidate)
        j.sie = float(sie if sie is not None else s.stale_if_error)
    # RFC 9111 4.2.3: the age it arrived with, corrected for the time it took to come,
    # and at least what its Date says.
    age_value = parse_age(ages) or 0.0
    response_delay = max(0.0, now - (request_time if request_time is not None else now))
    date_value = parse_http_date(date, now)
    apparent_age = max(0.0, now - date_value) if date_value is not None else 0.0
    j.initial_age = max(apparent_age, age_value + response_delay)
    j.vary = names
    j.etag = etag
    j.last_modified = parse_http_date(last_modified, now)
    j.validator = validator
    j.tags = tuple(t[:128] for t in tags[:MAX_TAGS])
    return j


def connection_listed(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The field names a Connection header lists (RFC 9110 7.6.1): for this hop only."""
    names: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            names.update(n.strip().lower() for n in v.split(b",") if n.strip())
    return frozenset(names)


def build_stored(
    route: Route,
    response: CapturedResponse,
    ctx: RequestContext,
    now: float,
    request_time: float | None = None,
) -> tuple[StoredResponse, float, tuple[str, ...], bool] | None:
    """(stored response, TTL in the cache, tags, compressible) or None when not storable."""
    j = judge(route, response.status, response.headers, now, request_time)
    if j is None:
        return None
    body = response.body
    drop = route.drop | connection_listed(response.headers)  # RFC 9111 3.1
    # Names lower-cased as ASGI has them: a stored response is matched by name later
    # (304 updates, conditional answers) whatever case the app used.
    headers = [(k.lower(), v) for k, v in response.headers if k.lower() not in drop]
    compressible = True
    for k, v in headers:
        lk = k.lower()
        if (lk == b"content-encoding" and v.strip().lower() != b"identity") or (
            lk == b"content-type" and v.decode("latin-1").lower().startswith(_INCOMPRESSIBLE)
        ):
            compressible = False
    etag = j.etag
    if etag is None and response.status == 200:
        etag = strong_etag(body)
        headers.append((b"etag", etag))
    headers.append((b"content-length", b"%d" % len(body)))
    stored = StoredResponse(
        response.status,
        headers,
        body,
        stored_at=now,
        fresh_for=j.fresh_for,
        initial_age=j.initial_age,
        stale_while_revalidate=j.swr,
        stale_if_error=j.sie,
        etag=etag,
        last_modified=j.last_modified,
        vary=j.vary,
    )
    # Kept past its freshness for stale-while-revalidate / stale-if-error, and, when it
    # has a validator, for a conditional request to renew it (cheaper than a full one).
    keep = max(j.swr, j.sie, float(route.settings.keep_stale) if j.validator else 0.0)
    ttl = max(max(j.fresh_for - j.initial_age, 0.0) + keep, 1.0)
    return stored, ttl, (*route.settings.tags, *j.tags), compressible


async def revalidate(
    app: Any, scope: dict[str, Any], timeout: float, limit: int
) -> CapturedResponse | None:
    """Call `app` for a fresh copy of a GET (no conditional or Range headers); None on failure."""
    scope = dict(scope)
    scope["method"] = "GET"
    scope["headers"] = [(k, v) for k, v in scope.get("headers", ()) if k not in _CONDITIONAL]
    done = asyncio.Event()
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    size = 0
    complete = False
    receive = EmptyRequest(done)

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers, size, complete
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers") or ())
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            size += len(body)
            if size <= limit:
                chunks.append(body)
            if not message.get("more_body", False):
                complete = size <= limit
                done.set()

    try:
        async with asyncio.timeout(timeout):
            await app(scope, receive, send)
    finally:
        done.set()
    if not complete or status == 0:
        return None
    return CapturedResponse(status, headers, b"".join(chunks))
