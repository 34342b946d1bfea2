"""The `concurrency` plugin and its limiter: bounded in-flight, bounded queue, shedding,
partitions, and limits that move (ScalingConfig, AIMD, gradient)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive import ConfigError, Overdrive, hookimpl
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.plugins.resilience import (
    AIMDController,
    ConcurrencyLimiter,
    ConcurrencyPlugin,
    GradientController,
    ScalingConfig,
    ScalingController,
    Shed,
)


def test_check_plugin() -> None:
    check_plugin(ConcurrencyPlugin)


async def test_limiter_queues_then_sheds_when_the_queue_is_full() -> None:
    lim = ConcurrencyLimiter(1, max_queue=1, max_wait=5)
    part = lim.partition(None)
    assert await lim.acquire(part) == 0.0
    waiter = asyncio.ensure_future(lim.acquire(part))
    await asyncio.sleep(0)
    with pytest.raises(Shed) as info:
        await lim.acquire(part)
    assert info.value.reason == "queue full"
    assert info.value.retry_after >= 1
    lim.release(part, 0.01)
    assert await waiter >= 0.0
    assert lim.in_flight == 1
    assert lim.queued == 0


async def test_limiter_sheds_after_max_wait_and_cleans_up() -> None:
    lim = ConcurrencyLimiter(1, max_queue=10, max_wait=0.01)
    part = lim.partition(None)
    await lim.acquire(part)
    with pytest.raises(Shed, match="waited too long"):
        await lim.acquire(part)
    assert lim.queued == 0
    task = asyncio.ensure_future(lim.acquire(part))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lim.queued == 0
    lim.release(part)
    assert lim.in_flight == 0


async def test_limiter_sheds_at_once_when_the_estimated_wait_is_too_long() -> None:
    lim = ConcurrencyLimiter(1, max_queue=10, max_wait=0.5)
    part = lim.partition(None)
    await lim.acquire(part)
    lim.release(part, 2.0)  # requests take 2 s: nobody should wait for one
    await lim.acquire(part)
    with pytest.raises(Shed, match="wait too long"):
        await lim.acquire(part)


async def test_partitions_serve_the_starved_partition_first() -> None:
    lim = ConcurrencyLimiter(
        2, max_queue=10, max_wait=5, partitions={"interactive": 0.9, "batch": 0.1}
    )
    batch = lim.partition("batch")
    interactive = lim.partition("interactive")
    await lim.acquire(batch)
    await lim.acquire(batch)
    order: list[str] = []

    async def wait(part: Any, label: str) -> None:
        await lim.acquire(part)
        order.append(label)

    tasks = [asyncio.ensure_future(wait(batch, f"b{i}")) for i in range(3)]
    await asyncio.sleep(0)
    tasks.append(asyncio.ensure_future(wait(interactive, "i0")))
    await asyncio.sleep(0)
    lim.release(batch)
    await asyncio.sleep(0)
    assert order == ["i0"]
    lim.release(batch)
    await asyncio.sleep(0)
    assert order == ["i0", "b0"]
    assert lim.stats()["partitions"]["batch"]["queued"] == 2
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_aimd_backs_off_when_slow_and_grows_when_busy() -> None:
    ctl = AIMDController(1, 100, target=0.1)
    lim = ConcurrencyLimiter(20, controller=ctl)
    lim.in_flight = 20
    lim.sample(0.5)
    assert lim.limit == 18
    lim.sample(0.01)
    assert lim.limit == 19
    lim.in_flight = 0


def test_gradient_shrinks_the_limit_when_latency_rises() -> None:
    ctl = GradientController(2, 100)
    lim = ConcurrencyLimiter(40, controller=ctl)
    lim.in_flight = 40
    for _ in range(50):
        lim.sample(0.1)
    steady = lim.limit
    for _ in range(50):
        lim.in_flight = lim.limit
        lim.sample(1.0)  # ten times slower: the app queues internally
    assert lim.limit < steady
    assert lim.limit >= 2
    lim.in_flight = 0


async def test_scaling_config_semantics_on_the_limit() -> None:
    cfg = ScalingConfig(
        min_workers=2,
        max_workers=8,
        scale_up_threshold=0.8,
        scale_down_threshold=0.3,
        check_interval=0.001,
        scale_up_cooldown=0,
        scale_down_cooldown=0,
        scale_up_step=1,
    )
    ctl = ScalingController(cfg)
    lim = ConcurrencyLimiter(2, controller=ctl)
    seen = [lim.limit]
    for _ in range(10):
        lim.in_flight = lim.limit  # fully used: grows by one step at a time
        await asyncio.sleep(0.002)
        lim.sample(0.0)
        seen.append(lim.limit)
    assert seen[:4] == [2, 3, 4, 5]
    assert lim.limit == 8  # capped at max_workers
    for _ in range(10):
        lim.in_flight = 0
        await asyncio.sleep(0.002)
        lim.sample(0.0)
    assert lim.limit == 2  # floored at min_workers
    assert ctl.stats()["last_decision"] == "within thresholds"


async def test_scaling_cooldown_holds_the_limit() -> None:
    cfg = ScalingConfig(min_workers=2, max_workers=8, check_interval=0.001, scale_up_cooldown=60)
    lim = ConcurrencyLimiter(2, controller=ScalingController(cfg))
    for _ in range(5):
        lim.in_flight = lim.limit
        await asyncio.sleep(0.002)
        lim.sample(0.0)
    assert lim.limit == 3  # one scale-up, then the cooldown
    lim.in_flight = 0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"min_workers": 0}, "min_workers"),
        ({"min_workers": 5, "max_workers": 2}, "max_workers"),
        ({"scale_up_threshold": 1.5}, "scale_up_threshold"),
        ({"scale_down_threshold": 0.9}, "scale_down_threshold"),
        ({"scale_up_cooldown": -1}, "scale_up_cooldown"),
        ({"scale_down_step": 0}, "scale_down_step"),
    ],
)
def test_scaling_config_nonsense(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ScalingConfig(**kwargs)


class Waits:
    """Records ctx.queue_wait of every request."""

    name = "waits"

    def __init__(self) -> None:
        self.waits: list[float] = []

    @hookimpl
    def after_request(self, ctx: Any) -> None:
        self.waits.append(ctx.queue_wait)


def gated_app(gate: asyncio.Event, running: list[int]) -> Starlette:
    async def work(request: Any) -> PlainTextResponse:
        running.append(1)
        await gate.wait()
        return PlainTextResponse("done")

    return Starlette(routes=[Route("/work", work), Route("/gen", work)])


async def test_plugin_sheds_with_503_and_retry_after_and_records_queue_wait() -> None:
    gate = asyncio.Event()
    running: list[int] = []
    waits = Waits()
    host = make_host(
        ConcurrencyPlugin(),
        waits,
        config={
            "plugins": ["concurrency", "waits"],
            "concurrency": {"max_concurrent": 2, "max_queue": 1, "max_wait": 5},
        },
    )
    async with serve(gated_app(gate, running), host=host) as h:
        tasks = [asyncio.ensure_future(h.client.get("/work")) for _ in range(5)]
        for _ in range(200):
            if sum(t.done() for t in tasks) >= 2 and len(running) >= 2:
                break
            await asyncio.sleep(0.005)
        assert len(running) == 2  # never more in flight than the limit
        gate.set()
        responses = await asyncio.gather(*tasks)
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 200, 503, 503]
        shed = [r for r in responses if r.status_code == 503]
        assert all(int(r.headers["retry-after"]) >= 1 for r in shed)
        assert sum(1 for w in waits.waits if w > 0) == 1  # the queued one
        stats = (await h.host.get_system_stats())["concurrency"]["global"]
        assert stats["in_flight"] == 0
        assert stats["shed"] == 2


async def test_per_route_limit() -> None:
    gate = asyncio.Event()
    running: list[int] = []
    config = {
        "plugins": ["concurrency"],
        "concurrency": {"max_concurrent": 10, "max_queue": 0},
        "routes": [{"path": "/gen", "concurrency": {"route_limit": 1}}],
    }
    async with serve(gated_app(gate, running), config=config) as h:
        first = asyncio.ensure_future(h.client.get("/gen"))
        for _ in range(200):
            if running:
                break
            await asyncio.sleep(0.005)
        assert (await h.client.get("/gen")).status_code == 503
        other = asyncio.ensure_future(h.client.get("/work"))
        for _ in range(200):
            if len(running) == 2:
                break
            await asyncio.sleep(0.005)
        gate.set()
        assert (await first).status_code == 200
        assert (await other).status_code == 200
        stats = (await h.host.get_system_stats())["concurrency"]
        assert stats["routes"]["/gen"]["shed"] == 1
        assert stats["global"]["in_flight"] == 0


async def test_adaptive_plugin_runs_and_reports_its_controller() -> None:
    async def quick(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    config = {
        "plugins": ["concurrency"],
        "concurrency": {"max_concurrent": 4, "mode": "gradient"},
        "routes": [{"path": "/", "concurrency": {"cost": 10}}],
    }
    async with serve(Starlette(routes=[Route("/", quick)]), config=config) as h:
        for _ in range(5):
            assert (await h.client.get("/")).status_code == 200
        stats = (await h.host.get_system_stats())["concurrency"]["global"]
        assert stats["controller"]["samples"] == 5


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"max_concurrent": -1}, "concurrency.max_concurrent"),
        ({"max_queue": -5}, "concurrency.max_queue"),
        ({"max_wait": 0}, "concurrency.max_wait"),
        ({"partitions": {"a": 0.9, "b": 0.5}}, "concurrency.partitions"),
        ({"partitions": {"a": -1}}, "concurrency.partitions.a"),
        ({"partition": "vip"}, "concurrency.partition"),
        ({"mode": "magic"}, "concurrency.mode"),
        ({"cost": 0}, "concurrency.cost"),
        ({"scaling": {"min_workers": 0}}, "min_workers"),
    ],
)
def test_nonsense_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Overdrive({"plugins": ["concurrency"], "concurrency": table}, env={})
