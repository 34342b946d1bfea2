"""The `tasks` plugin: background jobs that start and stop with the app.

``host.tasks`` is a `BackgroundTaskProcessor` (the embedded default) or, with
``backend = "redis"``, a `DurableTaskQueue` on taskiq; both have
``await add_task(fn, *args, **kwargs)``. With ``autoscale = true`` an
`AutoScaler` (``host.auto_scaler``) sizes the in-process pool. A job queued
while serving a request carries that request's id into its log lines. A full
queue answers the request 503 with ``Retry-After`` instead of a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import overdrive
from overdrive import ConfigError, hookimpl
from overdrive.metrics import MetricFamily as F
from overdrive.middleware.responses import PlainResponse

from .durable import DurableTaskQueue, TaskNotRegistered, make_broker
from .processor import (
    BackgroundTaskProcessor,
    Job,
    ProcessorStopped,
    QueueFull,
    TaskError,
    current_request_id,
    log_context,
)
from .scaler import AutoScaler, ScalingConfig, ScalingDecision

__all__ = [
    "AutoScaler",
    "BackgroundTaskProcessor",
    "DurableTaskQueue",
    "Job",
    "ProcessorStopped",
    "QueueFull",
    "ScalingConfig",
    "ScalingDecision",
    "TaskError",
    "TaskNotRegistered",
    "TasksPlugin",
    "TasksSettings",
    "current_request_id",
    "log_context",
    "make_broker",
]

_SCALING_KEYS = (
    "min_workers",
    "scale_up_threshold",
    "scale_down_threshold",
    "check_interval",
    "scale_up_cooldown",
    "scale_down_cooldown",
)


@dataclass
class TasksSettings:
    backend: Literal["memory", "redis"] = "memory"
    max_workers: int = 4  # the fixed pool size; with autoscale, the ceiling
    queue_size: int = 1000
    put_timeout: float = 5.0  # seconds add_task waits for room before QueueFull
    drain_timeout: float = 30.0  # seconds stop() waits for the queue to drain
    task_timeout: float | None = None  # seconds one job may run (None: no limit)
    autoscale: bool = False
    min_workers: int = 1
    scale_up_threshold: float = 0.8
    scale_down_threshold: float = 0.3
    check_interval: float = 1.0
    scale_up_cooldown: float = 5.0
    scale_down_cooldown: float = 30.0
    # backend = "redis": taskiq on a Redis Stream
    redis_url: str | None = None  # default: the host's redis_url
    queue_name: str = "overdrive:tasks"
    idle_timeout: float = 600.0  # seconds before a dead worker's job is run again
    worker_in_app: bool = False  # also consume jobs in the app process (max_workers at once)
    retry_after: int = 5  # seconds, in the 503 answered when the queue is full

    def __post_init__(self) -> None:
        def check(key: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ConfigError(f"tasks.{key}: expected {expected}, got {getattr(self, key)!r}")

        check("max_workers", self.max_workers >= 1, "an integer >= 1")
        check("queue_size", self.queue_size >= 1, "an integer >= 1")
        check("put_timeout", self.put_timeout >= 0, "seconds >= 0")
        check("drain_timeout", self.drain_timeout >= 0, "seconds >= 0")
        check("task_timeout", self.task_timeout is None or self.task_timeout > 0, "seconds > 0")
        check("idle_timeout", self.idle_timeout > 0, "seconds > 0")
        check("retry_after", self.retry_after >= 0, "seconds >= 0")
        if self.autoscale:
            try:
                self.scaling()
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("scaling.", "tasks.", 1)) from None

    def scaling(self) -> ScalingConfig:
        return ScalingConfig(
            max_workers=self.max_workers, **{k: getattr(self, k) for k in _SCALING_KEYS}
        )


class TasksPlugin(overdrive.Plugin):
    """Runs the background task processor for the app's lifetime."""

    name = "tasks"
    metric_families = (
        F("tasks_running", "gauge", "1 while the task processor runs", "running"),
        F("tasks_workers", "gauge", "Workers running now", "current_workers"),
        F("tasks_target_workers", "gauge", "Workers the autoscaler wants", "target_workers"),
        F("tasks_busy_workers", "gauge", "Workers running a job now", "busy_workers"),
        F("tasks_queue_depth", "gauge", "Jobs waiting in the queue", "queue_depth"),
        F("tasks_queue_capacity", "gauge", "Jobs the queue may hold", "queue_size"),
        F("tasks_submitted_jobs", "counter", "Jobs submitted", "submitted"),
        F(
            "tasks_finished_jobs",
            "counter",
            "Jobs finished, by outcome",
            "(completed|failed|cancelled|timed_out)",
            labels=("outcome",),
        ),
        F("tasks_dropped_jobs", "counter", "Jobs dropped (queue full, drop policy)", "dropped"),
        F("tasks_rejected_jobs", "counter", "Jobs refused (queue full)", "rejected"),
    )
    Settings = TasksSettings
    provides: ClassVar[dict[str, str]] = {
        "tasks": "tasks",
        "task_processor": "tasks",
        "background_tasks": "tasks",
        "auto_scaler": "auto_scaler",
    }

    def __init__(self, settings: TasksSettings | None = None) -> None:
        super().__init__(settings)
        self.tasks: Any = None
        self.auto_scaler: AutoScaler | None = None
        self._receiver: asyncio.Task[None] | None = None

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: TasksSettings = self.settings or TasksSettings()
        if s.backend == "redis":
            url = s.redis_url or host.redis_url
            if not url:
                raise ConfigError(
                    "tasks.redis_url: backend 'redis' needs a Redis URL "
                    "(tasks.redis_url or the host's redis_url)"
                )
            self.tasks = DurableTaskQueue(url, s.queue_name, idle_timeout=s.idle_timeout)
        else:
            self.tasks = BackgroundTaskProcessor(
                s.max_workers,
                queue_size=s.queue_size,
                put_timeout=s.put_timeout,
                drain_timeout=s.drain_timeout,
                task_timeout=s.task_timeout,
            )
            if s.autoscale:
                self.auto_scaler = AutoScaler(s.scaling(), self.tasks)
        host.state["tasks"] = self.tasks

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        s: TasksSettings = self.settings or TasksSettings()
        if isinstance(self.tasks, DurableTaskQueue):
            await self.tasks.start()
            if s.worker_in_app:
                self._receiver = asyncio.get_running_loop().create_task(
                    self.tasks.run_worker(max_async_tasks=s.max_workers), name="tasks-receiver"
                )
        elif self.auto_scaler is not None:
            await self.tasks.start(workers=s.min_workers)
            await self.auto_scaler.start()
        else:
            await self.tasks.start()

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        if self.auto_scaler is not None:
            await self.auto_scaler.stop()
        receiver, self._receiver = self._receiver, None
        if receiver is not None:  # unacknowledged jobs stay in Redis for the next worker
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        await self.tasks.stop()

    # The request id travels with jobs queued while a request is served.
    @hookimpl(tryfirst=True)
    def before_request(self, ctx: Any) -> None:
        current_request_id.set(ctx.request_id)

    @hookimpl
    def after_request(self, ctx: Any) -> None:
        current_request_id.set(None)

    @hookimpl(trylast=True)
    def on_failure(self, ctx: Any, error: BaseException | None) -> Any:
        if error is None:  # a 5xx start; under Starlette, sent while handling the error
            error = sys.exc_info()[1]
        if not isinstance(error, QueueFull):
            return None
        s: TasksSettings = self.settings or TasksSettings()
        body = json.dumps({"error": "task queue full", "detail": str(error)}).encode()
        return PlainResponse(503, body, content_type=b"application/json", retry_after=s.retry_after)

    @hookimpl
    async def collect_stats(self, host: Any) -> dict[str, Any]:
        if isinstance(self.tasks, DurableTaskQueue):
            return await self.tasks.get_stats()
        stats = self.tasks.get_stats()
        stats["backend"] = "memory"
        if self.auto_scaler is not None:
            stats["auto_scaler"] = self.auto_scaler.get_stats()
        return stats
