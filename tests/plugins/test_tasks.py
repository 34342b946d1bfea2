"""BackgroundTaskProcessor, AutoScaler and the `tasks` plugin; the durable backend
against the real Redis with a worker process that is killed mid-job."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import overdrive.plugins.tasks as tasks_module
from overdrive import ConfigError
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.plugins.tasks import (
    AutoScaler,
    BackgroundTaskProcessor,
    ProcessorStopped,
    QueueFull,
    ScalingConfig,
    TasksPlugin,
    current_request_id,
)

ROOT = Path(__file__).resolve().parents[2]
log = structlog.get_logger("test.jobs")


def test_public_names_are_pinned() -> None:
    assert tasks_module.__all__ == sorted(tasks_module.__all__)
    assert tasks_module.__all__ == [
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


def test_plugin_keeps_the_hook_contract() -> None:
    check_plugin(TasksPlugin)


# -- the processor ------------------------------------------------------------------


async def test_seed_snippet_runs_both_jobs() -> None:
    done: list[str] = []

    async def process_video(video_id: str) -> None:
        done.append(f"video {video_id}")

    def generate_thumbnail(video_id: str) -> None:  # a plain function: run in a thread
        assert threading.current_thread() is not threading.main_thread()
        done.append(f"thumbnail {video_id}")

    processor = BackgroundTaskProcessor(max_workers=4)
    await processor.start()
    await processor.add_task(process_video, video_id="123")
    await processor.add_task(generate_thumbnail, video_id="456")
    await processor.stop()
    assert sorted(done) == ["thumbnail 456", "video 123"]
    stats = processor.get_stats()
    assert (stats["submitted"], stats["completed"], stats["failed"]) == (2, 2, 0)


async def test_a_job_handle_gives_the_result_or_the_error() -> None:
    async def double(x: int) -> int:
        return 2 * x

    async def broken() -> None:
        raise ValueError("bad frame")

    processor = BackgroundTaskProcessor(max_workers=2)
    await processor.start()
    try:
        assert await (await processor.add_task(double, 21)).wait() == 42
        job = await processor.add_task(broken)
        with pytest.raises(ValueError, match="bad frame"):
            await job.wait()
        assert job.state == "failed"
    finally:
        await processor.stop()


async def test_a_full_queue_pushes_back_then_refuses() -> None:
    gate = asyncio.Event()

    async def blocked() -> None:
        await gate.wait()

    processor = BackgroundTaskProcessor(max_workers=1, queue_size=2, put_timeout=0.05)
    await processor.start()
    try:
        await processor.add_task(blocked)  # running
        while processor.get_stats()["busy_workers"] == 0:
            await asyncio.sleep(0)
        await processor.add_task(blocked)
        await processor.add_task(blocked)  # the queue holds 2
        with pytest.raises(QueueFull, match="task queue 'tasks' is full"):
            await processor.add_task(blocked)
        with pytest.raises(QueueFull):
            processor.add_task_nowait(blocked)
        assert processor.get_stats()["rejected"] == 2

        processor.put_timeout = None  # wait as long as it takes
        waiting = asyncio.ensure_future(processor.add_task(blocked))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # backpressure: the caller waits for room
        gate.set()
        await waiting
        await processor.join()
        assert processor.get_stats()["completed"] == 4
    finally:
        await processor.stop()


async def test_stop_drains_then_cancels_and_counts_what_it_cut() -> None:
    finished: list[int] = []

    async def quick(i: int) -> None:
        await asyncio.sleep(0)
        finished.append(i)

    async def forever() -> None:
        await asyncio.Event().wait()

    processor = BackgroundTaskProcessor(max_workers=1)
    await processor.start()
    for i in range(5):
        await processor.add_task(quick, i)
    hung = await processor.add_task(forever)
    never = await processor.add_task(quick, 99)
    outcome = await processor.stop(timeout=0.5)
    assert finished == [0, 1, 2, 3, 4]
    assert outcome == {"cancelled": 1, "dropped": 1}
    assert (hung.state, never.state) == ("cancelled", "dropped")
    with pytest.raises(asyncio.CancelledError):
        await never.wait()
    with pytest.raises(ProcessorStopped, match="not running"):
        await processor.add_task(quick, 6)


async def test_errors_are_logged_with_the_request_id_and_counted() -> None:
    async def failing(video_id: str) -> None:
        log.info("rendering", video_id=video_id)
        raise RuntimeError("codec missing")

    processor = BackgroundTaskProcessor(max_workers=2)
    await processor.start()
    token = current_request_id.set("req-42")
    try:
        job = await processor.add_task(failing, video_id="7")
    finally:
        current_request_id.reset(token)
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        with pytest.raises(RuntimeError):
            await job.wait()
        await processor.stop()
    rendering = next(e for e in logs if e["event"] == "rendering")
    failed = next(e for e in logs if e["event"] == "task failed")
    assert rendering["request_id"] == failed["request_id"] == "req-42"
    assert failed["task"].endswith("failing") and failed["log_level"] == "error"
    stats = processor.get_stats()
    assert stats["failed"] == 1
    assert stats["recent_errors"][0]["error"] == "RuntimeError: codec missing"
    assert stats["recent_errors"][0]["request_id"] == "req-42"


async def test_resize_never_interrupts_a_running_job() -> None:
    gate = asyncio.Event()
    finished: list[str] = []

    async def job(name: str) -> None:
        await gate.wait()
        finished.append(name)

    processor = BackgroundTaskProcessor(max_workers=1)
    await processor.start()
    try:
        processor.resize(4)
        assert processor.workers == 4
        for name in "ab":
            await processor.add_task(job, name)
        while processor.get_stats()["busy_workers"] < 2:
            await asyncio.sleep(0)
        processor.resize(1)  # the two idle workers leave now, one busy one after its job
        assert processor.workers == 2
        gate.set()
        await processor.join()
        await asyncio.sleep(0)
        assert sorted(finished) == ["a", "b"] and processor.workers == 1
    finally:
        await processor.stop()


def test_bad_processor_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="max_workers: expected an integer >= 1, got 0"):
        BackgroundTaskProcessor(max_workers=0)
    with pytest.raises(ValueError, match="queue_size"):
        BackgroundTaskProcessor(queue_size=0)


# -- the auto-scaler ------------------------------------------------------------------


async def test_seed_snippet_autoscaler_starts_at_min_workers() -> None:
    config = ScalingConfig(min_workers=2, max_workers=10, scale_up_threshold=0.8,
                           scale_down_threshold=0.3)  # fmt: skip
    auto_scaler = AutoScaler(config)
    await auto_scaler.start()
    try:
        stats = auto_scaler.get_stats()
        assert stats["current_workers"] == 2
        auto_scaler.config.scale_up_threshold = 0.7  # the seed's tuning, at run time
        auto_scaler.config.scale_down_threshold = 0.4
        assert auto_scaler.get_stats()["scale_up_threshold"] == 0.7
    finally:
        await auto_scaler.stop()


def scaler(**config: Any) -> AutoScaler:
    return AutoScaler(ScalingConfig(**config), BackgroundTaskProcessor(max_workers=1))


def test_decide_follows_the_hpa_rule_with_queued_jobs_as_load() -> None:
    s = scaler(min_workers=2, max_workers=10, scale_up_cooldown=0, scale_down_cooldown=0,
               scale_down_step=1)  # fmt: skip
    # 4 workers 100 % busy and 4 jobs waiting: load 8, ceil(8 / 0.8) = 10
    assert s.decide(4, 1.0, 4, now=100).desired == 10
    # 4 workers 90 % busy, nothing waiting: ceil(3.6 / 0.8) = 5
    assert s.decide(4, 0.9, 0, now=100).desired == 5
    # inside the dead band: unchanged
    assert s.decide(4, 0.5, 0, now=100).desired == 4
    # idle: one worker less per decision (scale_down_step = 1), never below min
    assert s.decide(4, 0.0, 0, now=100).desired == 3
    assert s.decide(2, 0.0, 0, now=100).desired == 2
    # without a step limit, straight to the HPA figure
    s.config.scale_down_step = None
    assert s.decide(8, 0.1, 0, now=100).desired == 2  # ceil(0.8 / 0.8) = 1, min 2
    assert s.decide(8, 0.25, 0, now=100).desired == 3  # ceil(2 / 0.8)
    # never above max
    assert s.decide(10, 1.0, 500, now=100).desired == 10


def test_cooldowns_hold_decisions() -> None:
    s = scaler(min_workers=1, max_workers=8, scale_up_cooldown=5, scale_down_cooldown=30,
               scale_down_step=1)  # fmt: skip
    s._last_up = s._last_change = 100.0
    assert s.decide(2, 1.0, 10, now=103).reason == "scale-up cooldown"
    assert s.decide(2, 1.0, 10, now=105).desired == 8
    assert s.decide(4, 0.0, 0, now=120).reason == "scale-down cooldown"
    assert s.decide(4, 0.0, 0, now=130).desired == 3


def test_thresholds_change_at_run_time_and_are_validated() -> None:
    s = scaler(min_workers=1, max_workers=8, scale_up_cooldown=0)
    assert s.decide(4, 0.75, 0, now=1).desired == 4  # 0.75 < 0.8: hold
    s.config.scale_up_threshold = 0.7
    assert s.decide(4, 0.75, 0, now=1).desired == 5  # ceil(3 / 0.7)
    with pytest.raises(ConfigError, match="scale_down_threshold: expected < scale_up_threshold"):
        s.config.scale_up_threshold = 0.2
    with pytest.raises(ConfigError, match="max_workers: expected >= min_workers"):
        s.config.min_workers = 9
    s.config.update(scale_up_threshold=0.3, scale_down_threshold=0.1)
    assert s.config.scale_up_threshold == 0.3
    with pytest.raises(ConfigError):
        ScalingConfig(min_workers=5, max_workers=2)


async def test_a_burst_grows_the_pool_and_idleness_shrinks_it() -> None:
    gate = asyncio.Event()

    async def job() -> None:
        await gate.wait()

    config = ScalingConfig(min_workers=1, max_workers=6, check_interval=3600,
                           scale_up_cooldown=0, scale_down_cooldown=0,
                           scale_down_step=1)  # fmt: skip
    processor = BackgroundTaskProcessor(max_workers=1)
    auto_scaler = AutoScaler(config, processor)
    await auto_scaler.start()  # the loop sleeps an hour: steps are driven by hand here
    try:
        for _ in range(10):
            await processor.add_task(job)
        await asyncio.sleep(0.01)
        decision = auto_scaler.step()
        assert decision.desired == 6 and auto_scaler.get_stats()["current_workers"] == 6
        gate.set()
        await processor.join()
        await asyncio.sleep(0.01)
        for expected in (5, 4):
            auto_scaler.step()
            assert auto_scaler.get_stats()["current_workers"] == expected
        stats = auto_scaler.get_stats()
        assert (stats["scale_ups"], stats["scale_downs"]) == (1, 2)
        assert [n for _, n in stats["history"]] == [1, 6, 5, 4]
    finally:
        await auto_scaler.stop()
        await processor.stop()


# -- the plugin -------------------------------------------------------------------------


async def test_plugin_runs_jobs_from_endpoints_with_their_request_id() -> None:
    host = make_host(config={"plugins": ["tasks"], "tasks": {"max_workers": 2}})
    seen: list[Any] = []

    async def render(video_id: str) -> None:
        seen.append((video_id, structlog.contextvars.get_contextvars().get("request_id")))

    async def enqueue(request: Any) -> JSONResponse:
        await host.tasks.add_task(render, video_id=request.path_params["vid"])
        return JSONResponse({"queued": True}, status_code=202)

    app = Starlette(routes=[Route("/videos/{vid}", enqueue, methods=["POST"])])
    async with serve(app, host=host) as h:
        response = await h.client.post("/videos/9", headers={"x-request-id": "abc-123"})
        assert response.status_code == 202
        await h.host.tasks.join()
        assert seen == [("9", "abc-123")]
        assert current_request_id.get() is None  # not leaked past the request
        stats = await h.host.get_system_stats()
        assert stats["tasks"]["completed"] == 1 and stats["tasks"]["backend"] == "memory"
    assert not host.tasks.running  # stopped with the app


async def test_plugin_answers_503_when_the_queue_stays_full() -> None:
    config = {"plugins": ["tasks"],
              "tasks": {"max_workers": 1, "queue_size": 1, "put_timeout": 0}}  # fmt: skip
    host = make_host(config=config)
    gate = asyncio.Event()

    async def blocked() -> None:
        await gate.wait()

    async def enqueue(request: Any) -> JSONResponse:
        await host.tasks.add_task(blocked)
        return JSONResponse({"queued": True})

    app = Starlette(routes=[Route("/jobs", enqueue, methods=["POST"])])
    async with serve(app, host=host, raise_app_exceptions=False) as h:
        try:
            assert (await h.client.post("/jobs")).status_code == 200  # running
            while h.host.tasks.get_stats()["busy_workers"] == 0:
                await asyncio.sleep(0)
            assert (await h.client.post("/jobs")).status_code == 200  # queued
            last = await h.client.post("/jobs")
            assert last.status_code == 503 and last.headers["retry-after"] == "5"
            assert last.json()["error"] == "task queue full"
        finally:
            gate.set()


async def test_plugin_autoscale_publishes_the_scaler() -> None:
    config = {"plugins": ["tasks"],
              "tasks": {"autoscale": True, "min_workers": 2, "max_workers": 5}}  # fmt: skip
    async with serve(Starlette(), config=config) as h:
        assert h.host.auto_scaler.get_stats()["current_workers"] == 2
        stats = await h.host.get_system_stats()
        assert stats["tasks"]["auto_scaler"]["current_workers"] == 2
        assert stats["tasks"]["auto_scaler"]["max_workers"] == 5


def test_plugin_settings_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"tasks\.max_workers: expected an integer >= 1"):
        make_host(config={"plugins": ["tasks"], "tasks": {"max_workers": 0}})
    bad = {"autoscale": True, "min_workers": 3, "max_workers": 2}
    with pytest.raises(ConfigError, match=r"tasks\.max_workers: expected >= min_workers"):
        make_host(config={"plugins": ["tasks"], "tasks": bad})
    with pytest.raises(ConfigError, match=r"tasks\.redis_url"):
        make_host(config={"plugins": ["tasks"], "tasks": {"backend": "redis"}})


# -- the durable backend (taskiq on Redis Streams) -------------------------------------------


def spawn_worker(redis_url: str, stream: str, idle_timeout: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.plugins.tasks_worker", redis_url, stream, str(idle_timeout)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_for_key(r: Any, key: str, deadline_s: float = 45.0) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = await r.get(key)
        if value is not None:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key} never appeared")


async def test_a_job_survives_its_worker_being_killed(redis_url: str, namespace: str) -> None:
    from redis.asyncio import Redis

    from tests.plugins.tasks_worker import build

    stream = f"{namespace}:stream"
    queue, crash_job = build(redis_url, stream, idle_timeout=60)
    first = second = None
    async with Redis.from_url(redis_url) as r:
        try:
            await queue.start()
            first = spawn_worker(redis_url, stream, idle_timeout=60)
            token = current_request_id.set("req-durable")
            try:
                await queue.add_task(crash_job, namespace)
            finally:
                current_request_id.reset(token)
            await wait_for_key(r, f"{namespace}:attempts")  # the first worker took it
            first.kill()  # SIGKILL mid-job: no ack, no cleanup
            first.wait()
            assert await r.get(f"{namespace}:done") is None
            stats = await queue.get_stats()
            assert stats["pending"] == 1  # delivered, never acknowledged

            second = spawn_worker(redis_url, stream, idle_timeout=0.5)
            rid = await wait_for_key(r, f"{namespace}:done")
            assert rid == b"req-durable"  # the request id travelled with the job
            assert await r.get(f"{namespace}:attempts") == b"2"
            deadline = time.monotonic() + 10
            while (await queue.get_stats())["pending"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stats = await queue.get_stats()
            assert (stats["pending"], stats["queue_depth"]) == (0, 0)  # acked and deleted
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            await queue.stop()
            await queue.delete()
            await r.delete(f"{namespace}:attempts", f"{namespace}:done")


async def test_durable_add_task_refuses_unregistered_functions(redis_url: str) -> None:
    from overdrive.plugins.tasks import DurableTaskQueue, TaskNotRegistered

    async def stray() -> None:
        pass

    queue = DurableTaskQueue(redis_url, "odtest:unused")
    with pytest.raises(TaskNotRegistered, match=r"decorate it with @queue\.task"):
        await queue.add_task(stray)


async def test_plugin_redis_backend_runs_jobs_in_app_with_the_request_id(
    redis_url: str, namespace: str
) -> None:
    config = {"plugins": ["tasks"],
              "tasks": {"backend": "redis", "redis_url": redis_url, "worker_in_app": True,
                        "queue_name": f"{namespace}:jobs"}}  # fmt: skip
    host = make_host(config=config)
    queue = host.tasks
    seen: list[Any] = []
    finished = asyncio.Event()

    @queue.task(name=f"{namespace}.render")
    async def render(video_id: str) -> None:
        seen.append((video_id, structlog.contextvars.get_contextvars().get("request_id")))
        finished.set()

    async def enqueue(request: Any) -> JSONResponse:
        await host.tasks.add_task(render, video_id="5")
        return JSONResponse({"queued": True}, status_code=202)

    app = Starlette(routes=[Route("/render", enqueue, methods=["POST"])])
    try:
        async with serve(app, host=host) as h:
            response = await h.client.post("/render", headers={"x-request-id": "rid-77"})
            assert response.status_code == 202
            async with asyncio.timeout(30):
                await finished.wait()
            assert seen == [("5", "rid-77")]
            stats = (await h.host.get_system_stats())["tasks"]
            assert stats["backend"] == "redis" and stats["submitted"] == 1
    finally:
        await queue.delete()


async def test_shutdown_waits_for_a_read_that_outlived_its_listener(
    redis_url: str, namespace: str
) -> None:
    # A listener cancelled mid-read leaves the (shielded) read running; a shutdown that
    # closed the pool under it let the read open a fresh connection that nobody closed
    # (seen as an unclosed-socket warning at a later gc). The read is slowed by a real
    # pause before a real Redis command so that it is in flight at the cancellation.
    pytest.importorskip("taskiq")
    from overdrive.plugins.tasks.durable import make_broker

    broker = make_broker(redis_url, f"{namespace}:stream", xread_block=0.02)
    await broker.startup()
    real = broker.redis.xautoclaim
    in_read = asyncio.Event()

    async def slow_xautoclaim(*args: Any, **kwargs: Any) -> Any:
        in_read.set()
        await asyncio.sleep(0.3)
        return await real(*args, **kwargs)

    broker.redis.xautoclaim = slow_xautoclaim

    async def listen() -> None:
        async for _ in broker.listen():
            pass

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(in_read.wait(), 5)
    listener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await listener
    await broker.shutdown()
    await asyncio.sleep(0.5)  # what a late read would do, it has done by now
    pool = broker.redis.connection_pool
    connections = [*pool._available_connections, *pool._in_use_connections]
    assert not [c for c in connections if c.is_connected]
    from redis.asyncio import Redis

    async with Redis.from_url(redis_url) as raw:
        await raw.delete(f"{namespace}:stream")
