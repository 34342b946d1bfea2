"""The `memory` plugin: checks memory every `check_interval`, tells plugins of
pressure, cleans up, and sheds requests (503) while memory is critical."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from overdrive import ConfigError, Plugin, hookimpl
from overdrive.metrics import MetricFamily as F
from overdrive.middleware.responses import PlainResponse
from overdrive.redact import plain_traceback

from .optimizer import MemoryOptimizer, logger

__all__ = ["MemoryPlugin", "MemorySettings"]


@dataclass
class MemorySettings:
    """Percents are of the binding memory (the cgroup's when tighter, see `get_memory_usage`)."""

    #: Above this, plugins are told (`on_memory_pressure("warning")`) and garbage collected.
    warning_percent: float = 80.0
    #: Above this, requests are answered 503 (and plugins told "critical").
    critical_percent: float = 92.0
    #: Shedding stops below this (default: critical - 5).
    recover_percent: float | None = None
    #: Seconds between checks.
    check_interval: float = 1.0
    #: Seconds between two clean-ups at the same level.
    cooldown: float = 30.0
    retry_after: int = 5
    #: Per route: false exempts it from shedding (health checks).
    shed: bool = True

    def __post_init__(self) -> None:
        for key in ("warning_percent", "critical_percent"):
            value = getattr(self, key)
            if not 0 < value <= 100:
                raise ConfigError(f"memory.{key}: expected 0 < percent <= 100, got {value!r}")
        if self.warning_percent > self.critical_percent:
            raise ConfigError(
                f"memory.warning_percent: expected <= critical_percent "
                f"({self.critical_percent}), got {self.warning_percent!r}"
            )
        if self.recover_percent is None:
            self.recover_percent = max(0.0, self.critical_percent - 5.0)
        elif not 0 <= self.recover_percent <= self.critical_percent:
            raise ConfigError(
                f"memory.recover_percent: expected 0 <= value <= critical_percent, "
                f"got {self.recover_percent!r}"
            )
        if self.check_interval <= 0:
            raise ConfigError(f"memory.check_interval: expected > 0, got {self.check_interval!r}")
        if self.cooldown < 0 or self.retry_after < 0:
            raise ConfigError("memory.cooldown and memory.retry_after: expected >= 0")


class MemoryPlugin(Plugin):
    """Sheds requests (503) above `critical_percent`, recovers below `recover_percent`."""

    name = "memory"
    metric_families = (
        F(
            "memory_shedding",
            "gauge",
            "1 while requests are refused under memory pressure",
            "shedding",
        ),
        F(
            "memory_shed_requests",
            "counter",
            "Requests answered 503 under memory pressure",
            "shed_requests",
        ),
        F("memory_shed_episodes", "counter", "Times shedding started", "sheds_entered"),
        F(
            "memory_used_ratio",
            "gauge",
            "Memory in use over the limit the plugin watches (cgroup or machine)",
            "percent",
            unit="ratio",
            scale=0.01,
            multiprocess_mode="livemostrecent",
        ),
        F(
            "memory_resident_bytes",
            "gauge",
            "Resident memory of this process",
            "rss_mb",
            unit="bytes",
            scale=2**20,
        ),
        F(
            "memory_available_bytes",
            "gauge",
            "Memory still available under the watched limit",
            "available_mb",
            unit="bytes",
            scale=2**20,
            multiprocess_mode="livemostrecent",
        ),
    )
    Settings = MemorySettings
    provides: ClassVar[dict[str, str]] = {"memory_optimizer": "optimizer"}

    def __init__(self, settings: MemorySettings | None = None, cgroup_root: str | Path = "/"):
        super().__init__(settings)
        self.cgroup_root = cgroup_root
        self.optimizer: MemoryOptimizer | None = None
        self.shedding = False
        self.level: str | None = None
        self.shed_count = 0
        self.sheds_entered = 0
        self.last_usage: dict[str, Any] = {}
        self._last_cleanup: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._response: PlainResponse | None = None

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: MemorySettings = self.settings
        self.optimizer = MemoryOptimizer(host, s.warning_percent, self.cgroup_root)
        self._response = PlainResponse(
            503, b"Service Unavailable: memory pressure", retry_after=s.retry_after
        )

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval)
            try:
                await self.check()
            except Exception as exc:
                logger.error("memory check failed\n%s", plain_traceback(exc))

    async def check(self) -> dict[str, Any]:
        """Read memory once, update shedding (with hysteresis), clean up if due."""
        s: MemorySettings = self.settings
        assert self.optimizer is not None
        usage = self.optimizer.get_memory_usage()
        self.last_usage = usage
        percent = usage["percent"]
        if percent >= s.critical_percent:
            if not self.shedding:
                self.sheds_entered += 1
                logger.warning("memory critical (%.1f%%): shedding requests", percent)
            self.shedding = True
            level: str | None = "critical"
        else:
            if self.shedding and percent < (s.recover_percent or 0.0):
                self.shedding = False
                logger.warning("memory recovered (%.1f%%): admitting requests", percent)
            level = "warning" if percent >= s.warning_percent else None
        self.level = level
        if level is not None:
            now = asyncio.get_running_loop().time()
            last = self._last_cleanup.get(level)
            if last is None or now - last >= s.cooldown:
                self._last_cleanup[level] = now
                await self.optimizer.optimize_memory_async(level)
        return usage

    @hookimpl
    def before_request(self, ctx: Any) -> Any:
        if not self.shedding:
            return None
        rs = ctx.settings(self.name)
        if rs is not None and not rs.shed:
            return None
        self.shed_count += 1
        return self._response

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        u = self.last_usage
        return {
            "shedding": self.shedding,
            "level": self.level,
            "shed_requests": self.shed_count,
            "sheds_entered": self.sheds_entered,
            "percent": u.get("percent"),
            "rss_mb": u.get("rss_mb"),
            "available_mb": u.get("available_mb"),
            "source": u.get("source"),
        }
