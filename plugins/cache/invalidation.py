"""Which stored responses an unsafe request invalidates (RFC 9111 4.4).

A POST, PUT, DELETE or any method that is not safe, answered with a non-error
status, changes the resource: the cache drops what it stored for the target URI,
and for the URIs in ``Location`` and ``Content-Location`` when they are on the
same origin (another origin's entries are never touched from here, so a response
cannot invalidate someone else's pages).

The keys are the entries' primary keys: dropping one drops every Vary variant
with it (a variant is only ever found through its primary entry). With
``key_headers``, the variant of the request's own key-header values is dropped
(and the entry without them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

if TYPE_CHECKING:
    from overdrive.context import RequestContext

    from .store import Route

__all__ = ["invalidation_keys"]

MAX_LOCATION = 2048


def _request_host(ctx: RequestContext) -> bytes:
    for name, value in ctx.raw_headers:
        if name == b"host":
            return value
    server = ctx.scope.get("server")
    return f"{server[0]}:{server[1]}".encode() if server else b""


def invalidation_keys(
    route: Route, ctx: RequestContext, response_headers: list[tuple[bytes, bytes]]
) -> list[str]:
    host = _request_host(ctx)
    keys = [route.key(ctx, host)]
    base = route.base_key(
        (ctx.scope.get("raw_path") or ctx.path.encode("utf-8", "surrogatepass")).partition(b"?")[0],
        ctx.scope.get("query_string", b""),
        host,
    )
    if base not in keys:
        keys.append(base)
    scheme = ctx.scope.get("scheme", "http")
    here = f"{scheme}://{host.decode('latin-1')}{ctx.path}"
    for name, value in response_headers:
        lname = name.lower()
        if lname != b"location" and lname != b"content-location":
            continue
        if len(value) > MAX_LOCATION:
            continue
        try:
            target = urlsplit(urljoin(here, value.decode("latin-1").strip()))
        except ValueError:
            continue
        if target.scheme != scheme or target.netloc.lower() != host.decode("latin-1").lower():
            continue  # another origin: not ours to invalidate
        key = route.base_key(
            (target.path or "/").encode("latin-1", "replace"),
            target.query.encode("latin-1", "replace"),
            host,
        )
        if key not in keys:
            keys.append(key)
    return keys
