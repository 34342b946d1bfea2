"""The hook contract: every hook a plugin may implement, and what the host does with it.

Request-side hooks (`before_request`, `cache_lookup`, `gpu_allocate`,
`on_failure`) run in the configured plugin order; response-side hooks
(`on_response_start`, `cache_store`, `gpu_release`, `after_request`) run in
reverse, onion-style. ``tryfirst``/``trylast`` move an implementation within
that order. Any hook may be ``async def`` unless it says "sync".

A hook that raises is isolated: the error is logged and counted against its
plugin and the request goes on, unless the plugin is fail-closed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from .context import CapturedResponse, Lease, Operation, RequestContext
    from .host import Overdrive

hookspec = pluggy.HookspecMarker("overdrive")
hookimpl = pluggy.HookimplMarker("overdrive")


# -- lifecycle ---------------------------------------------------------------


@hookspec
def overdrive_configure(host: Overdrive) -> None:
    """Sync. Runs once when the host is built, after settings were validated.

    Read ``self.settings``, validate what dataclass types cannot express and
    precompute. Raising here is a startup error (the app does not start).
    """


@hookspec
def overdrive_startup(host: Overdrive) -> None:
    """Runs once before the app's own startup (ASGI lifespan), or lazily at the first
    request under a server that sends no lifespan. Open pools, start monitors.
    """


@hookspec
def overdrive_shutdown(host: Overdrive) -> None:
    """Runs once after the app's own shutdown, in reverse order. Close what startup opened."""


# -- a request's life ----------------------------------------------------------


@hookspec(firstresult=True)
def before_request(ctx: RequestContext) -> ASGIApp | None:
    """Admission. Return None to let the request go on, or an ASGI callable
    (for example a ``starlette.responses.Response``) to answer it instead of the
    app: rate limited, shed, breaker open. The first non-None result wins.
    """


@hookspec(firstresult=True)
def cache_lookup(ctx: RequestContext) -> ASGIApp | None:
    """Return a stored response (any ASGI callable) to answer from, or None.

    A plugin that wants to store the response calls ``ctx.capture_response(n)``
    here; the middleware then keeps a copy of the body up to n bytes.
    """


@hookspec(firstresult=True)
def gpu_allocate(ctx: RequestContext) -> Lease | ASGIApp | None:
    """For routes that need a GPU: return a `Lease` (the host puts it on
    ``ctx.lease`` and guarantees exactly one `gpu_release`), an ASGI callable to
    reject (503 with Retry-After), or None when the route needs none. May wait.
    """


@hookspec
def on_response_start(ctx: RequestContext, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """Sync. The response is about to start (from the app or a short-circuit).

    Mutate `headers` in place to add or change headers (X-Cache, Server-Timing).
    """


@hookspec
def cache_store(ctx: RequestContext, response: CapturedResponse) -> None:
    """A response captured by ``ctx.capture_response`` has been sent in full. Store it."""


@hookspec(firstresult=True)
def on_failure(ctx: RequestContext, error: BaseException | None) -> ASGIApp | None:
    """The app raised, timed out (`error` is a TimeoutError) or started a 5xx
    (``ctx.status`` says which; `error` is the exception a framework was handling
    when it answered 500, else None). Record it. Before the response

    has started, a plugin may return a fallback ASGI callable (a stale copy);
    with none, an exception propagates as before and a timeout answers 504.
    """


@hookspec
def gpu_release(ctx: RequestContext, lease: Lease) -> None:
    """Always, exactly once per lease, also when the app raised or the client left."""


@hookspec
def after_request(ctx: RequestContext) -> None:
    """Always, exactly once per HTTP request: metrics, logs, releasing slots."""


# -- operations run inside the app: host.run(name, fn, *args) -------------------


@hookspec(firstresult=True)
def before_operation(op: Operation) -> BaseException | None:
    """Before each attempt. Return an exception (such as `OperationRefused`) to
    refuse the call; the host raises it to the caller. May set ``op.timeout``.
    """


@hookspec(firstresult=True)
def on_operation_failure(op: Operation, error: BaseException) -> float | None:
    """An attempt raised. Return a delay in seconds to retry after it, or None to
    give up (the error is raised to the caller). The host owns the loop.
    """


@hookspec
def after_operation(op: Operation) -> None:
    """After the last attempt; ``op.error`` is set when it failed."""


# -- system ------------------------------------------------------------------------


@hookspec
def collect_stats(host: Overdrive) -> dict[str, Any] | None:
    """Return this plugin's figures; they appear under its name in ``get_system_stats()``."""


@hookspec
def on_memory_pressure(host: Overdrive, level: str) -> None:
    """Memory is short (`level` is ``"warning"`` or ``"critical"``): trim caches, unload models."""


REQUEST_HOOKS = ("before_request", "cache_lookup", "gpu_allocate", "on_failure")
RESPONSE_HOOKS = ("on_response_start", "cache_store", "gpu_release", "after_request")
SYNC_HOOKS = frozenset({"overdrive_configure", "on_response_start"})
# Results of these hooks replace the app's response, so they must be ASGI callables.
SHORT_CIRCUIT_HOOKS = frozenset({"before_request", "cache_lookup", "on_failure"})
