"""FastAPI helpers: endpoints think in endpoints, not path patterns.

    from overdrive.contrib.fastapi import OverdriveContext, policy

    @app.get("/thumbnails/{video_id}")
    @policy(cache={"ttl": 3600})
    async def thumbnail(video_id: str, ctx: OverdriveContext): ...

`policy` declares per-plugin settings on the endpoint; at startup the
middleware turns them into route rules from the app's own route templates
(configured `[[routes]]` still win). The dependencies hand an endpoint the
request's `RequestContext` (its GPU lease, request id, state) and the host.
Works with plain Starlette routes too (the dependencies are FastAPI's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request

from overdrive.context import RequestContext
from overdrive.host import Overdrive
from overdrive.middleware.dependencies import READS_ATTR
from overdrive.middleware.endpoints import POLICY_ATTR

__all__ = ["OverdriveContext", "OverdriveHost", "get_context", "get_host", "policy", "reads"]

F = TypeVar("F", bound=Callable[..., Any])


def policy(**plugins: Mapping[str, Any]) -> Callable[[F], F]:
    """Declare per-plugin settings for this endpoint, as a `[[routes]]` rule would.

    Each keyword is a plugin name and its table of settings, validated at
    startup like configuration (an error names the key).
    """
    for name, table in plugins.items():
        if not isinstance(table, Mapping):
            raise TypeError(f"policy({name}=...): expected a dict of settings, got {table!r}")

    def mark(endpoint: F) -> F:
        merged = dict(getattr(endpoint, POLICY_ATTR, {}))
        merged.update({name: dict(table) for name, table in plugins.items()})
        setattr(endpoint, POLICY_ATTR, merged)
        return endpoint

    return mark


def reads(*headers: str) -> Callable[[F], F]:
    """Declare the request headers a dependency that takes the `Request` reads.

    A cache hit skips FastAPI's dependencies, so at startup a cached endpoint
    is keyed on what its dependencies read (`Header`, `Cookie`, security
    schemes); a dependency that takes the whole `Request` is opaque and its
    endpoint is refused unless it says what it reads::

        @reads("x-api-key")
        async def verify_key(request: Request) -> None: ...

    ``@reads()`` declares that it reads no header (it checks the path, the app
    state, ...).
    """
    names = tuple(h.lower() for h in headers)

    def mark(dependency: F) -> F:
        setattr(dependency, READS_ATTR, names)
        return dependency

    return mark


def get_context(request: Request) -> RequestContext:
    """The request's Overdrive context (a 500 naming the cause if the middleware is missing)."""
    scope = request.scope
    ctx = scope.get("overdrive.ctx")
    if ctx is None:
        host = scope.get("overdrive.host")
        if host is None:
            raise HTTPException(500, "OverdriveMiddleware is not installed on this app")
        # A host with no plugin makes no context per request: make one on demand.
        ctx = RequestContext(scope, scope["overdrive.request_id"], host.routes.default, host)
        scope["overdrive.ctx"] = ctx
    return ctx


def get_host(request: Request) -> Overdrive:
    """The Overdrive host serving this request."""
    host = get_context(request).host
    assert host is not None
    return host


# Ours take the Request for its scope, never for a header.
setattr(get_context, READS_ATTR, ())
setattr(get_host, READS_ATTR, ())

OverdriveContext = Annotated[RequestContext, Depends(get_context)]
OverdriveHost = Annotated[Overdrive, Depends(get_host)]
