"""The `access_log` plugin: one structured event per request, on structlog.

The request id is bound in structlog's contextvars for the request's life, so
the app's own structlog lines carry it (structlog's default processors and any
chain with ``merge_contextvars`` pick it up); `RequestIdFilter` does the same
for stdlib `logging`. The event is written by a logger of our own (JSON in
production, coloured key=value console output in development), so the
application's structlog configuration is left untouched.

structlog is already a core dependency, is fast when a level is filtered out
(``make_filtering_bound_logger`` turns filtered methods into no-ops) and has
the contextvars binding we need; nothing else is required.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from time import perf_counter
from typing import Any, ClassVar, Literal

import structlog
from structlog.contextvars import bind_contextvars, get_contextvars, reset_contextvars

from overdrive import Plugin, hookimpl

from .profiler.requests import request_error, route_template

__all__ = ["AccessLogPlugin", "RequestIdFilter"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class RequestIdFilter(logging.Filter):
    """A stdlib logging filter that sets ``record.request_id`` from the bound request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = get_contextvars().get("request_id", "-")
        return True


class AccessLogPlugin(Plugin):
    """One log event per request: request id, route, method, status, duration, cache, lease."""

    name: ClassVar[str] = "access_log"

    @dataclass
    class Settings:
        enabled: bool = True
        format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY
        level: Literal["debug", "info", "warning"] = "info"
        event: str = "request"
        include_path: bool = False  # also log the raw path (may hold ids or tokens)
        bind_request_id: bool = True  # bind request_id in contextvars for the app's logs

    def __init__(self, settings: Any = None, *, stream: Any = None) -> None:
        super().__init__(settings)
        self.stream = stream
        self.logger: Any = None
        self._on = True
        self._bind = True

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s = self.settings or self.Settings()
        self.settings = s
        self._on = s.enabled
        self._bind = s.enabled and s.bind_request_id
        stream = self.stream if self.stream is not None else sys.stderr
        fmt = s.format
        if fmt == "auto":
            isatty = getattr(stream, "isatty", None)
            fmt = "console" if isatty is not None and isatty() else "json"
        renderer: Any = (
            structlog.processors.JSONRenderer()
            if fmt == "json"
            else structlog.dev.ConsoleRenderer(colors=False)
        )
        self.logger = structlog.wrap_logger(
            structlog.PrintLogger(stream),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[s.level]),
        )
        self._event = s.event
        self._path = s.include_path

    @hookimpl(tryfirst=True)
    def before_request(self, ctx: Any) -> None:
        if self._bind:
            ctx.state["access_log"] = bind_contextvars(request_id=ctx.request_id)

    @hookimpl(trylast=True)
    def after_request(self, ctx: Any) -> None:
        if not self._on:
            return
        status = ctx.status
        error = ctx.error
        if error is None and (status is None or status >= 500):
            error = request_error(ctx)
        if status is None:  # no response started: the app raised (500) or the client left
            status = 500 if error is not None else 499  # 499: nginx's "client closed request"
        fields: dict[str, Any] = {
            "request_id": ctx.request_id,
            "route": route_template(ctx.scope),
            "method": ctx.method,
            "status": status,
            "duration_ms": round(((ctx.t_end or perf_counter()) - ctx.t_start) * 1000, 3),
        }
        if self._path:
            fields["path"] = ctx.path
        if ctx.cache_status is not None:
            fields["cache"] = ctx.cache_status
        if ctx.internal:
            fields["internal"] = True  # a prefetch the framework made, not a client
        if ctx.queue_wait:
            fields["queue_wait_ms"] = round(ctx.queue_wait * 1000, 3)
        lease = ctx.lease
        if lease is not None:
            fields["lease"] = {"device": lease.device, "bytes": lease.bytes}
        if error is not None:
            fields["error"] = type(error).__name__
            if isinstance(error, TimeoutError) and ctx.timeout is not None:
                fields["timeout"] = True
        state = ctx._state
        if state is not None:
            extra = state.get("log")  # figures other plugins want in the event (breaker state)
            if extra:
                for key, value in extra.items():
                    fields.setdefault(key, value)
        if status >= 500:
            self.logger.error(self._event, **fields)
        else:
            self.logger.info(self._event, **fields)
        # On failure the id stays bound: the exception propagates to the server (or
        # Starlette's ServerErrorMiddleware), whose traceback log then carries it too.
        if state is not None and error is None:
            tokens = state.pop("access_log", None)
            if tokens:
                reset_contextvars(**tokens)
