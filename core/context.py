"""The objects handed to hooks: a request's context, an operation, a GPU lease.

`RequestContext` is the one allocation the middleware makes per request, so it
is slotted and everything optional in it is created lazily.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .host import Overdrive
    from .routes import RoutePolicy

Headers = list[tuple[bytes, bytes]]
BodyObserver = Callable[[bytes, bool], None]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ProgressSink = Callable[[float, str], None]


@dataclass(slots=True)
class Lease:
    """A GPU reservation returned by `gpu_allocate` and given back by `gpu_release`.

    `device` is a device index, or ``"cpu"`` when a route runs without a GPU.
    """

    device: int | str
    bytes: int
    owner: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CapturedResponse:
    """A response the app produced, captured while it streamed (see `capture_response`)."""

    status: int
    headers: Headers
    body: bytes


class Capture:
    """Collects a response body up to `max_bytes`; past that it gives up (`overflow`)."""

    __slots__ = ("chunks", "complete", "max_bytes", "overflow", "size")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False
        self.complete = False

    def __call__(self, body: bytes, more_body: bool) -> None:
        if not self.overflow and body:
            self.size += len(body)
            if self.size > self.max_bytes:
                self.overflow = True
                self.chunks.clear()
            else:
                self.chunks.append(body)
        if not more_body:
            self.complete = not self.overflow

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class RequestContext:
    """Everything the plugins know about one HTTP request.

    Invariants: `request_id` is set before any hook runs; `status` and
    `response_headers` are set once the app (or a short-circuit) starts its
    response; `error` holds the exception or timeout that `on_failure` saw.
    """

    # The attributes every request writes live in slots. The rarely written ones
    # are class-level defaults, stored in the instance __dict__ only when a plugin
    # sets them, so a request pays for what its plugins use.
    __slots__ = (
        "__dict__",
        "host",
        "method",
        "path",
        "policy",
        "raw_headers",
        "receive",
        "request_id",
        "response_headers",
        "response_started",
        "scope",
        "status",
        "t_end",
        "t_first_byte",
        "t_start",
    )

    _headers: dict[str, str] | None = None
    _state: dict[str, Any] | None = None
    #: True once an on_failure fallback answered instead of the app.
    replaced: bool = False
    error: BaseException | None = None
    lease: Lease | None = None
    #: Seconds the app may run (set by a plugin in before_request); then 504.
    timeout: float | None = None
    capture: Capture | None = None
    body_observers: list[BodyObserver] | None = None
    #: HIT, MISS, STALE, BYPASS: set by the cache plugin, read by logs and metrics.
    cache_status: str | None = None
    #: The plugin whose before_request or cache_lookup answered instead of the app.
    answered_by: str | None = None
    #: Seconds spent waiting in queues (concurrency limit, GPU admission).
    queue_wait: float = 0.0
    t_admitted: float = 0.0
    t_app: float = 0.0
    #: A request the framework made itself (a prefetch), marked by the ASGI scope
    #: extension ``"overdrive.internal"``: not client traffic, so rate limits,
    #: metrics and logs leave it out.
    internal: bool = False
    #: Set by a plugin that runs this request as a job (the ``jobs`` plugin): where
    #: `progress` reports go. None: `progress` does nothing.
    progress_sink: ProgressSink | None = None
    #: Set by a plugin when others depend on this request's response (the cache's
    #: single-flight followers): an object with ``holding() -> bool`` and an async
    #: ``released()``. While it holds, the middleware keeps the app running when the
    #: client leaves: the disconnect waits for ``released()`` and writes to the gone
    #: client are dropped, so one client leaving does not fail the others.
    keeper: Any = None
    #: True once the client left while a keeper held the app running.
    client_gone: bool = False

    def __init__(
        self,
        scope: MutableMapping[str, Any],
        request_id: str,
        policy: RoutePolicy,
        host: Overdrive | None = None,
        receive: Receive | None = None,
    ) -> None:
        self.scope = scope
        #: The ASGI receive the app will be given. A `before_request` plugin that must
        #: read the body first (an idempotency fingerprint, a job's captured request)
        #: reads it here and replaces it with one that replays what it read.
        self.receive = receive
        self.method: str = scope.get("method", "GET")
        self.path: str = scope.get("path", "/")
        self.raw_headers: Headers = scope.get("headers") or []
        self.request_id = request_id
        self.policy = policy
        self.host = host
        self.status: int | None = None
        self.response_headers: Headers | None = None
        self.response_started = False
        self.t_start = perf_counter()
        self.t_first_byte = 0.0
        self.t_end = 0.0

    @property
    def headers(self) -> dict[str, str]:
        """Request headers, lower-cased names, decoded on first use (latin-1, never fails).

        Repeated headers are joined with ``", "`` as RFC 9110 allows.
        """
        if self._headers is None:
            decoded: dict[str, str] = {}
            for raw_name, raw_value in self.raw_headers:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                decoded[name] = f"{decoded[name]}, {value}" if name in decoded else value
            self._headers = decoded
        return self._headers

    @property
    def query_string(self) -> bytes:
        qs: bytes = self.scope.get("query_string", b"")
        return qs

    @property
    def state(self) -> dict[str, Any]:
        """A slot per plugin: ``ctx.state["cache"]`` belongs to the cache plugin."""
        if self._state is None:
            self._state = {}
        return self._state

    def settings(self, plugin: str) -> Any:
        """The plugin's effective settings for this request (after route rules)."""
        return self.policy.settings.get(plugin)

    def capture_response(self, max_bytes: int) -> Capture:
        """Ask the middleware to keep a copy of the body, up to `max_bytes`.

        Capture does not delay the stream: chunks go to the client as they come.
        """
        if self.capture is None:
            self.capture = Capture(max_bytes)
            self.observe_body(self.capture)
        return self.capture

    def observe_body(self, observer: BodyObserver) -> None:
        """Call `observer(chunk, more_body)` for each body chunk the app sends."""
        if self.body_observers is None:
            self.body_observers = []
        self.body_observers.append(observer)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent per phase; phases that did not run are absent."""
        out: dict[str, float] = {}
        if self.t_admitted:
            out["admission"] = self.t_admitted - self.t_start
        if self.t_app:
            out["before_app"] = self.t_app - self.t_start
            if self.t_first_byte:
                out["time_to_first_byte"] = self.t_first_byte - self.t_app
            if self.t_end:
                out["app"] = self.t_end - self.t_app
        if self.queue_wait:
            out["queue_wait"] = self.queue_wait
        if self.t_end:
            out["total"] = self.t_end - self.t_start
        return out

    def progress(self, fraction: float, message: str = "") -> None:
        """Report how far this request's work is (0..1) and what it is doing.

        A request run as a job (the ``jobs`` plugin) shows it on its status monitor;
        anywhere else this does nothing, so an endpoint may call it unconditionally.
        """
        sink = self.progress_sink
        if sink is not None:
            sink(fraction, message)

    def get_header(self, name: str) -> str | None:
        """One request header by lower-case name, or None."""
        return self.headers.get(name)

    def response_header(self, name: bytes) -> bytes | None:
        """One response header by lower-case name, once the response has started."""
        for k, v in self.response_headers or ():
            if k.lower() == name:
                return v
        return None


class Operation:
    """One call run through `host.run(name, fn, ...)`: what the operation hooks see."""

    __slots__ = (
        "args",
        "attempt",
        "duration",
        "error",
        "fn",
        "kwargs",
        "name",
        "result",
        "started",
        "state",
        "timeout",
    )

    def __init__(
        self, name: str, fn: Callable[..., Any], args: Iterable[Any], kwargs: dict[str, Any]
    ) -> None:
        self.name = name
        self.fn = fn
        self.args = tuple(args)
        self.kwargs = kwargs
        self.attempt = 0
        self.error: BaseException | None = None
        self.result: Any = None
        self.timeout: float | None = None
        self.started = perf_counter()
        self.duration = 0.0
        self.state: dict[str, Any] = {}
