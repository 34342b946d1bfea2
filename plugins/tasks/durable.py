"""`DurableTaskQueue`: the scale-out backend, on taskiq with taskiq-redis' stream broker.

Why it exists: the in-process queue loses its jobs when the process dies and
cannot spread them across machines. taskiq's `RedisStreamBroker` keeps jobs in
a Redis Stream read through a consumer group; a job is acknowledged only after
it ran, so a job whose worker died stays pending and another worker claims it
(XAUTOCLAIM) once it has been idle for `idle_timeout` seconds. Messages are
JSON (taskiq's default serializer): nothing read back from Redis is unpickled.

Two things are added to the library's broker here:
- reclaiming also when the stream is quiet: taskiq-redis 1.2 looks for a dead
  worker's pending jobs only after new messages arrived, so a crashed job could
  wait for the next enqueue; `ReclaimingStreamBroker` checks on every poll;
- acknowledged messages are deleted from the stream (XACK + XDEL), so the
  stream does not grow without bound.
And a middleware that carries the request id of the request that queued a job
(a message label) into the job's structlog context on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import structlog

from .processor import TaskError, log_context, logger

__all__ = ["DurableTaskQueue", "TaskNotRegistered", "make_broker"]

try:  # optional extra: overdrive[tasks]
    from redis.asyncio import Redis
    from taskiq import TaskiqMessage, TaskiqMiddleware
    from taskiq.acks import AckableMessage
    from taskiq_redis import RedisStreamBroker
except ImportError:  # pragma: no cover - exercised only without the extra
    RedisStreamBroker = None  # type: ignore[assignment,misc]


class TaskNotRegistered(TaskError):
    """`add_task` got a function the workers would not know."""


def _require() -> None:
    if RedisStreamBroker is None:  # pragma: no cover
        raise ImportError(
            "the durable task backend needs taskiq and taskiq-redis: pip install 'overdrive[tasks]'"
        )


if RedisStreamBroker is not None:

    class ReclaimingStreamBroker(RedisStreamBroker):
        """taskiq-redis' stream broker, reclaiming dead workers' jobs on every poll."""

        def _ack_generator(self, id: str, queue_name: str) -> Callable[[], Awaitable[None]]:
            async def _ack() -> None:
                async with Redis(connection_pool=self.connection_pool) as conn:
                    await conn.xack(queue_name, self.consumer_group_name, id)
                    await conn.xdel(queue_name, id)

            return _ack

        async def listen(self) -> AsyncGenerator[AckableMessage, None]:
            streams = [self.queue_name, *self.additional_streams]
            async with Redis(connection_pool=self.connection_pool) as conn:
                while True:
                    for stream in streams:
                        claimed: Any = await conn.xautoclaim(
                            stream,
                            self.consumer_group_name,
                            self.consumer_name,
                            min_idle_time=self.idle_timeout,
                            start_id="0-0",
                            count=self.unacknowledged_batch_size,
                        )
                        for msg_id, msg in claimed[1]:
                            if not msg:  # deleted while pending: nothing to run
                                await conn.xack(stream, self.consumer_group_name, msg_id)
                                continue
                            logger.info("reclaimed a pending job", stream=stream, id=msg_id)
                            yield AckableMessage(
                                data=msg[b"data"], ack=self._ack_generator(msg_id, stream)
                            )
                    wanted: dict[Any, Any] = {self.queue_name: ">", **self.additional_streams}
                    fetched: Any = await conn.xreadgroup(
                        self.consumer_group_name,
                        self.consumer_name,
                        wanted,
                        block=self.block,
                        noack=False,
                        count=self.count,
                    )
                    for stream, messages in fetched or ():
                        for msg_id, msg in messages:
                            yield AckableMessage(
                                data=msg[b"data"], ack=self._ack_generator(msg_id, stream)
                            )

    class RequestIdMiddleware(TaskiqMiddleware):
        """Producer: the caller's request id into the message's labels.
        Worker: the labels into the structlog context for the job's log lines."""

        KEYS = ("request_id",)

        def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            context = log_context()
            for key in self.KEYS:
                if key in context and key not in message.labels:
                    message.labels[key] = str(context[key])
            return message

        def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
            bound = {k: message.labels[k] for k in self.KEYS if k in message.labels}
            if bound:
                structlog.contextvars.bind_contextvars(**bound)
            return message

        def post_execute(self, message: TaskiqMessage, result: Any) -> None:
            structlog.contextvars.unbind_contextvars(*self.KEYS)


def make_broker(
    redis_url: str,
    queue_name: str = "overdrive:tasks",
    *,
    consumer_group: str = "overdrive",
    idle_timeout: float = 60.0,
    xread_block: float = 1.0,
    max_connections: int | None = None,
) -> Any:
    """A taskiq broker on a Redis Stream, for `taskiq worker module:broker` too."""
    _require()
    broker = ReclaimingStreamBroker(
        redis_url,
        queue_name=queue_name,
        consumer_group_name=consumer_group,
        consumer_id="0",  # a new group reads jobs queued before it existed
        idle_timeout=int(idle_timeout * 1000),
        xread_block=int(xread_block * 1000),
        max_connection_pool_size=max_connections,
    )
    broker.add_middlewares(RequestIdMiddleware())
    return broker


class DurableTaskQueue:
    """Jobs in Redis that survive a crash of the process that runs them.

    Producer and workers build the queue the same way and register the same job
    functions (import the same module)::

        queue = DurableTaskQueue("redis://redis:6379/0", "videos")

        @queue.task
        async def render(video_id: str) -> None: ...

        await queue.start()
        await queue.add_task(render, video_id="123")     # in the web app
        await queue.run_worker()                          # in a worker process

    or run workers with taskiq's own CLI: ``taskiq worker mymodule:queue.broker``.
    Arguments must be JSON-serializable.
    """

    def __init__(
        self,
        redis_url: str,
        queue_name: str = "overdrive:tasks",
        *,
        consumer_group: str = "overdrive",
        idle_timeout: float = 60.0,
        xread_block: float = 1.0,
        max_connections: int | None = None,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout: expected seconds > 0, got {idle_timeout!r}")
        self.redis_url = redis_url
        self.queue_name = queue_name
        self.idle_timeout = idle_timeout
        self.broker = make_broker(
            redis_url,
            queue_name,
            consumer_group=consumer_group,
            idle_timeout=idle_timeout,
            xread_block=xread_block,
            max_connections=max_connections,
        )
        self._tasks: dict[Any, Any] = {}
        self._started = False
        self.submitted = 0

    def task(self, fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Register a job function (decorator); returns taskiq's decorated task."""

        def register(f: Callable[..., Any]) -> Any:
            decorated = self.broker.task(task_name=name)(f) if name else self.broker.task(f)
            self._tasks[f] = decorated
            return decorated

        return register(fn) if fn is not None else register

    def _find(self, fn: Any) -> Any:
        if hasattr(fn, "kicker") and hasattr(fn, "task_name"):
            return fn
        found = self._tasks.get(fn)
        if found is None:
            raise TaskNotRegistered(
                f"{getattr(fn, '__qualname__', fn)!r} is not a registered job; decorate it "
                "with @queue.task in a module that the workers import too"
            )
        return found

    async def start(self) -> None:
        if not self._started:
            await self.broker.startup()
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.broker.shutdown()

    async def add_task(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Queue ``fn(*args, **kwargs)`` in Redis; returns taskiq's task handle."""
        task = self._find(fn)
        if not self._started:
            await self.start()
        handle = await task.kiq(*args, **kwargs)
        self.submitted += 1
        return handle

    async def run_worker(self, *, max_async_tasks: int = 10) -> None:
        """Consume jobs in this process until cancelled (taskiq's receiver)."""
        from taskiq.api import run_receiver_task

        await self.start()
        await run_receiver_task(self.broker, max_async_tasks=max_async_tasks, run_startup=False)

    async def get_stats(self) -> dict[str, Any]:
        """Stream length and pending (delivered, not acknowledged) jobs, from Redis."""
        stats: dict[str, Any] = {
            "backend": "redis",
            "queue": self.queue_name,
            "submitted": self.submitted,
        }
        try:
            async with asyncio.timeout(2.0), Redis.from_url(self.redis_url) as conn:
                stats["queue_depth"] = await conn.xlen(self.queue_name)
                pending = await conn.xpending(self.queue_name, self.broker.consumer_group_name)
                stats["pending"] = pending.get("pending", 0) if pending else 0
        except Exception as exc:
            stats["error"] = f"{type(exc).__name__}: {exc}"[:200]
        return stats

    async def delete(self) -> None:
        """Remove the stream and its consumer group from Redis (tests, teardown)."""
        with contextlib.suppress(Exception):
            async with Redis.from_url(self.redis_url) as conn:
                await conn.delete(self.queue_name)
