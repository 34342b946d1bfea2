"""The `prometheus` plugin: serves the scrape at `path` (or on a port of its own),
guarded (`access.py`) and cached; in multiprocess mode, flushes this worker's
figures every `flush_seconds` and at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from overdrive import Plugin, hookimpl
from overdrive.plugins.profiler.requests import RouteName
from overdrive.redact import plain_traceback

from .access import ScrapeGuard, ScrapeServer
from .exporter import PrometheusExporter
from .mapping import DEFAULT_BUCKETS

__all__ = ["PrometheusPlugin"]

logger = logging.getLogger("overdrive.prometheus")


class PrometheusPlugin(Plugin):
    """Serves the metrics at `path` and, in multiprocess mode, flushes them periodically."""

    name: ClassVar[str] = "prometheus"
    provides: ClassVar[dict[str, str]] = {"prometheus": "exporter"}

    @dataclass
    class Settings:
        path: str | None = "/metrics"  # None: mount make_asgi_app(host) yourself
        namespace: str = "overdrive"
        buckets: list[float] = field(default_factory=lambda: list(DEFAULT_BUCKETS))
        multiprocess: bool | None = None  # None: when PROMETHEUS_MULTIPROC_DIR is set
        flush_seconds: float = 5.0  # multiprocess: how often a worker copies its figures
        include_default_registry: bool = True  # also expose prometheus_client's global one
        undeclared: bool = False  # also plugins without metric_families, names guessed
        cache_seconds: float = 1.0  # a rendered scrape is served again this long (0: never)
        render_in_thread: bool = True  # build and encode the scrape off the event loop
        token: str | None = None  # required as "Authorization: Bearer ..." when set
        max_scrapes_per_second: float = 5.0  # then 429 with Retry-After
        scrape_burst: int = 10  # scrapes allowed at once before the rate applies
        port: int | None = None  # serve on this port (a thread) instead of at `path`
        address: str = "127.0.0.1"  # the port's address

        def __post_init__(self) -> None:
            from overdrive import ConfigError

            if self.path is not None and not self.path.startswith("/"):
                raise ConfigError(f"prometheus.path: expected '/...', got {self.path!r}")
            if self.flush_seconds <= 0:
                raise ConfigError(
                    f"prometheus.flush_seconds: expected > 0, got {self.flush_seconds}"
                )
            if self.cache_seconds < 0:
                raise ConfigError(
                    f"prometheus.cache_seconds: expected >= 0, got {self.cache_seconds}"
                )
            if self.max_scrapes_per_second <= 0 or self.scrape_burst < 1:
                raise ConfigError(
                    "prometheus.max_scrapes_per_second / scrape_burst: expected > 0 and >= 1, "
                    f"got {self.max_scrapes_per_second} / {self.scrape_burst}"
                )
            if self.token is not None and len(self.token) < 8:
                raise ConfigError("prometheus.token: expected at least 8 characters")
            if self.port is not None and not 0 <= self.port < 65536:
                raise ConfigError(f"prometheus.port: expected 0..65535, got {self.port}")
            if not self.buckets or any(b <= 0 for b in self.buckets):
                raise ConfigError(
                    f"prometheus.buckets: expected positive bounds, got {self.buckets}"
                )

    exporter: PrometheusExporter

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s = self.settings or self.Settings()
        self.settings = s
        self.exporter = PrometheusExporter(
            host,
            namespace=s.namespace,
            buckets=tuple(s.buckets),
            multiprocess=s.multiprocess,
            include_default_registry=s.include_default_registry,
            undeclared=s.undeclared,
            cache_seconds=s.cache_seconds,
            render_in_thread=s.render_in_thread,
        )
        self.guard = ScrapeGuard(s.token, s.max_scrapes_per_second, s.scrape_burst)
        self.server: ScrapeServer | None = None
        # With a port of its own, the app's port does not answer the scrape at all.
        self._path = s.path if s.port is None else None
        self._route = RouteName(s.path or "")
        self._task: asyncio.Task[None] | None = None

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        s = self.settings
        if s.port is not None:
            self.server = ScrapeServer(self.exporter.render, self.guard, s.address, s.port)
            self.server.start()
        if self.exporter.multiprocess:
            self._task = asyncio.create_task(self._flusher())

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            import anyio

            await anyio.to_thread.run_sync(server.stop)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await self.exporter.flush()  # counters and histograms outlive the worker
            self.exporter.mark_process_dead()  # its live gauges (in flight, GPU) do not

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_seconds)
            try:
                await self.exporter.flush()
            except Exception as exc:
                logger.error("prometheus flush failed\n%s", plain_traceback(exc))

    @hookimpl(tryfirst=True)
    def before_request(self, ctx: Any) -> Any:
        if ctx.path == self._path:
            ctx.scope["route"] = self._route  # filed under its own path, not "<unmatched>"
            refusal = self.guard.check(ctx.method, ctx.get_header("authorization"))
            return refusal if refusal is not None else self.exporter.asgi
        return None
