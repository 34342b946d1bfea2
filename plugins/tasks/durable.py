"""`DurableTaskQueue`: the scale-out backend, on taskiq with a Redis Stream broker.

Why it exists: the in-process queue loses its jobs when the process dies and
cannot spread them across machines. Jobs are kept in a Redis Stream read
through a consumer group; a job is acknowledged only after it ran, so a job
whose worker died stays pending and another worker claims it (XAUTOCLAIM) once
it has been idle for `idle_timeout` seconds. Messages are JSON (taskiq's
default serializer): nothing read back from Redis is unpickled.

The broker (`StreamBroker`) is ours, on taskiq's `AsyncBroker`, because
taskiq-redis 1.2's `RedisStreamBroker` runs jobs twice without any crash (it
reads 100 messages per consumer, and those waiting behind `max_workers` pass
`idle_timeout` and are claimed by other consumers while still queued here),
never recovers from a lost stream (NOGROUP on every poll), and takes no Redis
Cluster or Sentinel client. See `StreamBroker` for what it does instead.
A middleware carries the request id of the request that queued a job (a
message label) into the job's structlog context on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

from .processor import TaskError, log_context, logger

__all__ = ["DurableTaskQueue", "StreamBroker", "TaskNotRegistered", "make_broker"]

try:  # optional extra: overdrive[tasks]
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from taskiq import AsyncBroker, BrokerMessage, TaskiqMessage, TaskiqMiddleware
    from taskiq.acks import AckableMessage
except ImportError:  # pragma: no cover - exercised only without the extra
    AsyncBroker = None  # type: ignore[assignment,misc]


class TaskNotRegistered(TaskError):
    """`add_task` got a function the workers would not know."""


def _require() -> None:
    if AsyncBroker is None:  # pragma: no cover
        raise ImportError(
            "the durable task backend needs taskiq and taskiq-redis: pip install 'overdrive[tasks]'"
        )


# Keep the idle clock of jobs this consumer is running at zero, for those it still owns.
# KEYS[1]: the stream. ARGV: group, consumer, id, id, ... -> how many were still ours.
_HEARTBEAT = """
local kept = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if p[1] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""


def _nogroup(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


if AsyncBroker is not None:

    class StreamBroker(AsyncBroker):
        """A taskiq broker on one Redis Stream and its consumer group (any redis-py client).

        What it adds to taskiq-redis' `RedisStreamBroker`:
        - one message per read (XREADGROUP and XAUTOCLAIM with COUNT 1): taskiq's
          receiver asks for the next message only when it has a free slot, so a
          consumer never holds jobs it has not started (taskiq-redis reads 100 at
          once, and the ones still waiting pass `idle_timeout` and are run twice);
        - a heartbeat: every `idle_timeout / 3` the jobs this consumer is running
          are re-claimed by itself (XCLAIM JUSTID), so a job that runs longer than
          `idle_timeout` never looks abandoned; a dead worker's jobs stop being
          renewed and are reclaimed by another worker after `idle_timeout`;
        - reclaiming on every poll, not only after new messages arrived;
        - recovery when the stream or its group vanished (an empty Redis restart,
          FLUSHDB, `DurableTaskQueue.delete()`): NOGROUP re-creates the group (from
          the stream's start, so jobs queued meanwhile run), and connection errors
          back off (0.1 s doubling to 5 s) with one log line per outage;
        - acknowledged messages are deleted (XACK + XDEL): the stream stays bounded;
        - any client from `overdrive.plugins.redisconn`: Redis, Redis Cluster (the
          stream is one key, so one slot) or Sentinel.
        """

        def __init__(
            self,
            url: str,
            queue_name: str = "overdrive:tasks",
            *,
            consumer_group: str = "overdrive",
            consumer_name: str | None = None,
            idle_timeout: float = 60.0,
            xread_block: float = 1.0,
            max_connections: int | None = None,
        ) -> None:
            super().__init__()
            from overdrive.plugins.redisconn import redis_client

            self.url = url
            self.queue_name = queue_name
            self.consumer_group_name = consumer_group
            self.consumer_name = consumer_name or uuid.uuid4().hex
            self.idle_timeout = idle_timeout
            # No blocking XREADGROUP: a blocked read cancelled at shutdown could hang
            # (redis-py 8.2 on Python 3.11). An idle consumer polls instead, the pause
            # growing from 20 ms to `xread_block`; a job is picked up at most that late.
            self.poll_max = max(0.02, xread_block)
            self.redis: Any = redis_client(
                url,
                max_connections=max_connections or 16,
                socket_timeout=5.0,  # a SIGSTOPped Redis must not hang the worker
                pool_timeout=30.0,
                retries=2,  # a connection that died with a restarted Redis: reconnect
            )
            self._heartbeat_script = self.redis.register_script(_HEARTBEAT)
            self.running: dict[str, str] = {}  # message id -> stream, delivered and not acked
            self._heartbeat_task: asyncio.Task[None] | None = None
            # reads that outlived their listener's cancellation (shielded, below): shutdown
            # waits for them, or one could open a connection after the pool was closed
            self._reads: set[asyncio.Future[Any]] = set()
            self.recreated_groups = 0
            self.heartbeats = 0
            self.listen_errors = 0

        async def _create_group(self) -> bool:
            try:
                await self.redis.xgroup_create(
                    self.queue_name, self.consumer_group_name, id="0", mkstream=True
                )
                return True
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                return False

        async def startup(self) -> None:
            await super().startup()
            await self._create_group()

        async def shutdown(self) -> None:
            from overdrive.plugins.redisconn import close_client

            await self._stop_heartbeat()
            if self._reads:  # bounded: each command is cut off by socket_timeout (5 s)
                await asyncio.wait(set(self._reads), timeout=12.0)
            await close_client(self.redis)
            await super().shutdown()

        async def kick(self, message: BrokerMessage) -> None:
            await self.redis.xadd(self.queue_name, {b"data": message.message})

        def _ack(self, msg_id: Any) -> Callable[[], Awaitable[None]]:
            async def ack() -> None:
                try:
                    for attempt in range(3):
                        try:
                            await self.redis.xack(self.queue_name, self.consumer_group_name, msg_id)
                            await self.redis.xdel(self.queue_name, msg_id)
                            return
                        except ResponseError as exc:
                            if _nogroup(exc):  # the stream is gone: nothing left to ack
                                return
                            raise
                        except (RedisConnectionError, RedisTimeoutError, OSError):
                            if attempt == 2:
                                raise
                            await asyncio.sleep(0.2 * (attempt + 1))
                finally:
                    self.running.pop(_text(msg_id), None)

            return ack

        def _deliver(self, msg_id: Any, fields: Any) -> AckableMessage:
            self.running[_text(msg_id)] = self.queue_name
            return AckableMessage(data=fields[b"data"], ack=self._ack(msg_id))

        async def _next(self) -> tuple[Any, Any] | None:
            """One message this consumer may start now: a dead worker's first, else new."""
            group, me, stream = self.consumer_group_name, self.consumer_name, self.queue_name
            claimed: Any = await self.redis.xautoclaim(
                stream,
                group,
                me,
                min_idle_time=int(self.idle_timeout * 1000),
                start_id="0-0",
                count=1,
            )
            for msg_id, fields in claimed[1]:
                if not fields:  # deleted while pending: nothing to run
                    await self.redis.xack(stream, group, msg_id)
                    continue
                logger.info("reclaimed a pending job", stream=stream, id=_text(msg_id))
                return msg_id, fields
            fetched: Any = await self.redis.xreadgroup(group, me, {stream: ">"}, count=1)
            for _stream, messages in fetched or ():
                for msg_id, fields in messages:
                    return msg_id, fields
            return None

        async def listen(self) -> AsyncGenerator[AckableMessage, None]:
            self._start_heartbeat()
            backoff = 0.0
            idle = 0.0
            try:
                while True:
                    # shielded: redis-py 8.2 can swallow a cancellation that lands inside
                    # a command, and the receiver's shutdown then waits forever. A read
                    # cut off here finishes on its own; a job it took is not started and
                    # is reclaimed by another worker after `idle_timeout`.
                    read = asyncio.ensure_future(self._next())
                    self._reads.add(read)
                    read.add_done_callback(self._reads.discard)
                    try:
                        got = await asyncio.shield(read)
                    except asyncio.CancelledError:
                        read.add_done_callback(_consume)
                        raise
                    except Exception as exc:
                        if _nogroup(exc):
                            with contextlib.suppress(Exception):
                                if await self._create_group():
                                    self.recreated_groups += 1
                                    logger.warning(
                                        "the job stream or its group was gone; re-created",
                                        stream=self.queue_name,
                                    )
                                    continue
                        self.listen_errors += 1
                        if not backoff:
                            logger.warning(
                                "cannot read jobs from Redis; retrying with back-off",
                                stream=self.queue_name,
                                error=f"{type(exc).__name__}: {exc}"[:200],
                            )
                        backoff = min(max(backoff * 2, 0.1), 5.0)
                        await asyncio.sleep(backoff)
                        continue
                    if backoff:
                        logger.info("reading jobs from Redis again", stream=self.queue_name)
                        backoff = 0.0
                    if got is None:
                        idle = min(max(idle * 2, 0.02), self.poll_max)
                        await asyncio.sleep(idle)
                        continue
                    idle = 0.0
                    yield self._deliver(*got)
            finally:
                await self._stop_heartbeat()

        def _start_heartbeat(self) -> None:
            if self._heartbeat_task is None or self._heartbeat_task.done():
                self._heartbeat_task = asyncio.get_running_loop().create_task(
                    self._heartbeat(), name="tasks-heartbeat"
                )

        async def _stop_heartbeat(self) -> None:
            task, self._heartbeat_task = self._heartbeat_task, None
            if task is not None and task is not asyncio.current_task():
                task.cancel()  # bounded wait: a cancellation redis-py swallowed must not hang
                await asyncio.wait({task}, timeout=1.0)
                task.add_done_callback(_consume)

        async def _heartbeat(self) -> None:
            interval = self.idle_timeout / 3
            while self._heartbeat_task is asyncio.current_task():
                await asyncio.sleep(interval)
                ids = list(self.running)
                if not ids:
                    continue
                try:
                    await self._heartbeat_script(
                        keys=[self.queue_name],
                        args=[self.consumer_group_name, self.consumer_name, *ids],
                    )
                    self.heartbeats += 1
                except Exception as exc:  # Redis away: the next beat tries again
                    logger.warning("could not renew running jobs", error=str(exc)[:200])

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
    broker = StreamBroker(
        redis_url,
        queue_name,
        consumer_group=consumer_group,
        idle_timeout=idle_timeout,
        xread_block=xread_block,
        max_connections=max_connections,
    )
    broker.add_middlewares(RequestIdMiddleware())
    return broker


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        broker = self.broker
        stats.update(
            running_here=len(broker.running),
            groups_recreated=broker.recreated_groups,
            read_errors=broker.listen_errors,
        )
        try:
            async with asyncio.timeout(2.0), self._connection() as conn:
                stats["queue_depth"] = await conn.xlen(self.queue_name)
                pending = await conn.xpending(self.queue_name, broker.consumer_group_name)
                stats["pending"] = pending.get("pending", 0) if pending else 0
        except Exception as exc:
            stats["error"] = f"{type(exc).__name__}: {exc}"[:200]
        return stats

    async def delete(self) -> None:
        """Remove the stream and its consumer group from Redis (tests, teardown)."""
        with contextlib.suppress(Exception):
            async with self._connection() as conn:
                await conn.delete(self.queue_name)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """The broker's client while started; else one of its own, closed after use."""
        if self._started:
            yield self.broker.redis
            return
        from overdrive.plugins.redisconn import close_client, redis_client

        client = redis_client(self.redis_url, max_connections=2)
        try:
            yield client
        finally:
            await close_client(client)
