"""`BackgroundTaskProcessor`: an in-process pool of asyncio workers on a bounded queue.

Why it exists: an endpoint that starts a video render must answer now and run
the job later, without a broker to install. The queue is bounded, so a burst
pushes back on the callers (`add_task` waits, then raises `QueueFull`) instead
of growing memory without limit. Every job ends in exactly one counted state
(completed, failed, cancelled, dropped) and every failure is logged with the
request id of the request that queued it, so no job is lost silently. The
worker count can change while it runs (`resize`), which `AutoScaler` uses.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from overdrive.redact import plain_traceback

logger = structlog.get_logger("overdrive.tasks")

__all__ = [
    "BackgroundTaskProcessor",
    "Job",
    "ProcessorStopped",
    "QueueFull",
    "TaskError",
    "current_request_id",
    "log_context",
]

# Set by the tasks plugin for the length of a request; read when a job is queued.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "overdrive_request_id", default=None
)


def log_context() -> dict[str, Any]:
    """What a job carries into its log lines: the structlog context of the caller,
    plus the request id of the request being served, if any."""
    context = structlog.contextvars.get_contextvars()
    rid = current_request_id.get()
    if rid is not None and "request_id" not in context:
        context["request_id"] = rid
    return context


class TaskError(Exception):
    """Base of the errors the task processor raises."""


class QueueFull(TaskError):
    """The queue stayed full for the whole wait (backpressure)."""


class ProcessorStopped(TaskError):
    """The processor is not running (never started, or stopping)."""


def _name_of(fn: Callable[..., Any]) -> str:
    target = fn.func if isinstance(fn, functools.partial) else fn
    return str(getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target)))


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  (an object with an async __call__)
    )


class Job:
    """One queued call. ``await job.wait()`` gives its result or raises its error."""

    __slots__ = (
        "_done",
        "args",
        "context",
        "enqueued_at",
        "error",
        "finished_at",
        "fn",
        "id",
        "kwargs",
        "name",
        "result",
        "started_at",
        "state",
    )

    def __init__(
        self, job_id: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.id = job_id
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.name = _name_of(fn)
        self.context = log_context()
        self.enqueued_at = time.monotonic()
        self.started_at = 0.0
        self.finished_at = 0.0
        self.state = "queued"  # queued, running, completed, failed, cancelled, dropped
        self.result: Any = None
        self.error: BaseException | None = None
        self._done: asyncio.Event | None = None

    def _finish(self, state: str) -> None:
        self.state = state
        self.finished_at = time.monotonic()
        if self._done is not None:
            self._done.set()

    @property
    def done(self) -> bool:
        return self.state in ("completed", "failed", "cancelled", "dropped")

    async def wait(self) -> Any:
        """Wait for the job to end; its result, or its error raised again."""
        if not self.done:
            if self._done is None:
                self._done = asyncio.Event()
            await self._done.wait()
        if self.error is not None:
            raise self.error
        if self.state in ("cancelled", "dropped"):
            raise asyncio.CancelledError(f"job {self.name} #{self.id} was {self.state}")
        return self.result

    def __repr__(self) -> str:
        return f"<Job #{self.id} {self.name} {self.state}>"


class BackgroundTaskProcessor:
    """`max_workers` asyncio workers taking jobs from a queue of at most `queue_size`.

    ::

        processor = BackgroundTaskProcessor(max_workers=4)
        await processor.start()
        await processor.add_task(process_video, video_id="123")
        await processor.stop()

    Async functions run on the event loop; plain functions run in a thread
    (``asyncio.to_thread``) so they cannot block it. `add_task` waits up to
    `put_timeout` seconds for room in a full queue, then raises `QueueFull`.
    `stop` stops taking jobs, waits up to `drain_timeout` for the queue to
    drain, then cancels what still runs; cancelled and never-run jobs are
    counted and logged by name.
    """

    def __init__(
        self,
        max_workers: int = 4,
        *,
        queue_size: int = 1000,
        put_timeout: float | None = 5.0,
        drain_timeout: float = 30.0,
        task_timeout: float | None = None,
        name: str = "tasks",
        keep_errors: int = 20,
    ) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers: expected an integer >= 1, got {max_workers!r}")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size: expected an integer >= 1, got {queue_size!r}")
        if put_timeout is not None and put_timeout < 0:
            raise ValueError(f"put_timeout: expected >= 0 or None, got {put_timeout!r}")
        if drain_timeout < 0:
            raise ValueError(f"drain_timeout: expected >= 0, got {drain_timeout!r}")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError(f"task_timeout: expected > 0 or None, got {task_timeout!r}")
        self.max_workers = max_workers
        self.queue_size = queue_size
        self.put_timeout = put_timeout
        self.drain_timeout = drain_timeout
        self.task_timeout = task_timeout
        self.name = name
        self._queue: asyncio.Queue[Job] | None = None
        self._workers: dict[asyncio.Task[None], bool] = {}  # task -> busy
        self._target = 0
        self._accepting = False
        self._ids = itertools.count(1)
        self._running: dict[int, Job] = {}
        self._t0 = time.monotonic()
        # utilization accounting: busy worker-seconds and available worker-seconds
        self._busy_acc = 0.0
        self._capacity_acc = 0.0
        self._capacity_mark = self._t0
        self.counts = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
            "dropped": 0,
            "rejected": 0,
            "timed_out": 0,
        }
        self.recent_errors: deque[dict[str, Any]] = deque(maxlen=keep_errors)
        self.history: deque[tuple[float, int]] = deque(maxlen=512)

    # -- life ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def workers(self) -> int:
        """How many workers there are now."""
        return len(self._workers)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self, workers: int | None = None) -> None:
        """Start `workers` workers (default `max_workers`). Idempotent."""
        if self._accepting:
            return
        self._queue = asyncio.Queue(self.queue_size)
        self._accepting = True
        self._t0 = self._capacity_mark = time.monotonic()
        self.resize(self.max_workers if workers is None else workers)

    def resize(self, workers: int) -> int:
        """Grow or shrink to `workers` (>= 1). Idle workers leave at once, busy ones
        after their current job; no job is interrupted. Returns the new target."""
        if workers < 1:
            raise ValueError(f"workers: expected >= 1, got {workers!r}")
        if self._queue is None:
            raise ProcessorStopped(f"task processor {self.name!r} is not started")
        self._account(time.monotonic())
        self._target = workers
        while len(self._workers) < workers:
            task = asyncio.get_running_loop().create_task(
                self._worker(), name=f"{self.name}-worker"
            )
            self._workers[task] = False
        excess = len(self._workers) - workers
        if excess > 0:
            for task, busy in list(self._workers.items()):
                if excess == 0:
                    break
                if not busy:
                    task.cancel()
                    del self._workers[task]
                    excess -= 1
        self.history.append((round(time.monotonic() - self._t0, 3), workers))
        return workers

    async def stop(self, timeout: float | None = None) -> dict[str, int]:
        """Stop taking jobs, drain for up to `timeout` (default `drain_timeout`) seconds,
        then cancel the rest. Returns how many jobs were cancelled and dropped."""
        queue = self._queue
        if queue is None:
            return {"cancelled": 0, "dropped": 0}
        self._accepting = False
        timeout = self.drain_timeout if timeout is None else timeout
        before = self.counts["cancelled"], self.counts["dropped"]
        try:
            async with asyncio.timeout(timeout):
                await queue.join()
        except TimeoutError:
            logger.warning(
                "task queue did not drain in time; cancelling",
                processor=self.name,
                queued=queue.qsize(),
                running=len(self._running),
                timeout=timeout,
            )
        tasks = list(self._workers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._account(time.monotonic())
        self._workers.clear()
        while not queue.empty():
            job = queue.get_nowait()
            self.counts["dropped"] += 1
            job._finish("dropped")
            logger.warning("task dropped at shutdown", task=job.name, job_id=job.id, **job.context)
        self._queue = None
        self.history.append((round(time.monotonic() - self._t0, 3), 0))
        return {
            "cancelled": self.counts["cancelled"] - before[0],
            "dropped": self.counts["dropped"] - before[1],
        }

    # -- queueing --------------------------------------------------------------------

    def _job(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job:
        if not callable(fn):
            raise TypeError(f"add_task: expected a callable, got {fn!r}")
        if not self._accepting or self._queue is None:
            raise ProcessorStopped(
                f"task processor {self.name!r} is not running; call `await start()` first"
            )
        return Job(next(self._ids), fn, args, kwargs)

    async def add_task(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
        """Queue ``fn(*args, **kwargs)``; waits for room up to `put_timeout` seconds."""
        job = self._job(fn, args, kwargs)
        queue = self._queue
        assert queue is not None
        try:
            queue.put_nowait(job)
        except asyncio.QueueFull:
            try:
                async with asyncio.timeout(self.put_timeout):
                    await queue.put(job)
            except TimeoutError:
                self.counts["rejected"] += 1
                raise QueueFull(
                    f"task queue {self.name!r} is full ({self.queue_size} jobs waiting) and "
                    f"stayed full for {self.put_timeout:g} s; job {job.name} not queued"
                ) from None
        self.counts["submitted"] += 1
        return job

    def add_task_nowait(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
        """Queue ``fn(*args, **kwargs)`` or raise `QueueFull` at once."""
        job = self._job(fn, args, kwargs)
        assert self._queue is not None
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counts["rejected"] += 1
            raise QueueFull(
                f"task queue {self.name!r} is full ({self.queue_size} jobs waiting); "
                f"job {job.name} not queued"
            ) from None
        self.counts["submitted"] += 1
        return job

    async def join(self) -> None:
        """Wait until every queued job has ended."""
        if self._queue is not None:
            await self._queue.join()

    # -- workers ---------------------------------------------------------------------

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None and self._queue is not None
        queue = self._queue
        try:
            while True:
                job = await queue.get()
                self._workers[me] = True
                try:
                    await self._run(job)
                finally:
                    self._workers[me] = False
                    queue.task_done()
                if len(self._workers) > self._target:
                    return  # shrinking: leave after the job, never during it
        finally:
            self._workers.pop(me, None)

    async def _run(self, job: Job) -> None:
        job.state = "running"
        job.started_at = now = time.monotonic()
        self._running[job.id] = job
        try:
            with structlog.contextvars.bound_contextvars(**job.context):
                try:
                    if self.task_timeout is not None:
                        async with asyncio.timeout(self.task_timeout):
                            job.result = await self._call(job)
                    else:
                        job.result = await self._call(job)
                except asyncio.CancelledError:
                    self.counts["cancelled"] += 1
                    job._finish("cancelled")
                    logger.warning("task cancelled", task=job.name, job_id=job.id)
                    raise
                except Exception as exc:
                    job.error = exc
                    timed_out = isinstance(exc, TimeoutError) and self.task_timeout is not None
                    self.counts["failed"] += 1
                    if timed_out:
                        self.counts["timed_out"] += 1
                    self.recent_errors.append(
                        {
                            "task": job.name,
                            "job_id": job.id,
                            "error": f"{type(exc).__name__}: {exc}"[:300],
                            "request_id": job.context.get("request_id"),
                            "at": time.time(),
                        }
                    )
                    logger.error(
                        "task failed", task=job.name, job_id=job.id, traceback=plain_traceback(exc)
                    )
                    job._finish("failed")
                else:
                    self.counts["completed"] += 1
                    job._finish("completed")
        finally:
            self._running.pop(job.id, None)
            self._busy_acc += time.monotonic() - now

    @staticmethod
    async def _call(job: Job) -> Any:
        if _is_async(job.fn):
            return await job.fn(*job.args, **job.kwargs)
        result = await asyncio.to_thread(job.fn, *job.args, **job.kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    # -- figures ---------------------------------------------------------------------

    def _account(self, now: float) -> None:
        self._capacity_acc += (now - self._capacity_mark) * len(self._workers)
        self._capacity_mark = now

    def busy_and_capacity(self, now: float | None = None) -> tuple[float, float]:
        """Busy worker-seconds and available worker-seconds since start (for utilization)."""
        now = time.monotonic() if now is None else now
        self._account(now)
        running = sum(now - job.started_at for job in self._running.values())
        return self._busy_acc + running, self._capacity_acc

    def get_stats(self) -> dict[str, Any]:
        busy = sum(1 for b in self._workers.values() if b)
        workers = len(self._workers)
        return {
            "name": self.name,
            "running": self._accepting,
            "current_workers": workers,
            "target_workers": self._target,
            "busy_workers": busy,
            "utilization": round(busy / workers, 3) if workers else 0.0,
            "queue_depth": self.queue_depth,
            "queue_size": self.queue_size,
            **self.counts,
            "recent_errors": list(self.recent_errors),
        }
