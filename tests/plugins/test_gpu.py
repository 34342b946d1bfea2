"""The gpu plugin and GPUOptimizer, on the simulated backend (and NVML's honest "none")."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import overdrive.plugins.gpu as gpu_mod
from overdrive import ConfigError, hookimpl
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.middleware import OverdriveMiddleware
from overdrive.plugins.gpu import (
    Admission,
    AdmissionRejected,
    GPUOptimizer,
    GPUPlugin,
    GPUUnavailableError,
    NullBackend,
    RedisLedger,
    SimulatedBackend,
    open_backend,
    place,
)

MB = 2**20
GB = 1024 * MB


def test_public_names_are_pinned() -> None:
    assert gpu_mod.__all__ == sorted(gpu_mod.__all__)
    assert gpu_mod.__all__ == [
        "Admission",
        "AdmissionRejected",
        "DeviceBackend",
        "DeviceInfo",
        "GPUOptimizer",
        "GPUPlugin",
        "GPUSettings",
        "GPUUnavailableError",
        "Grant",
        "LearnedSizes",
        "LocalLedger",
        "NVMLBackend",
        "NullBackend",
        "PeakProbe",
        "RedisLedger",
        "SimulatedBackend",
        "Unavailable",
        "open_backend",
        "place",
    ]


def test_check_plugin() -> None:
    check_plugin(GPUPlugin)


# -- GPUOptimizer ------------------------------------------------------------------


async def test_gpu_info_without_a_gpu_is_an_honest_zero() -> None:
    backend = open_backend("auto")
    if backend.device_count():
        pytest.skip("this machine has a GPU; tests/gpu covers it")
    info = await GPUOptimizer().get_gpu_info()
    assert info["count"] == 0
    assert info["gpus"] == {}
    assert info["reason"]  # says why: no NVML library, no driver, or no device


async def test_gpu_info_on_the_simulated_backend_has_the_seed_shape() -> None:
    backend = SimulatedBackend(devices=2, memory_mb=1000)
    backend.set_external(0, 950 * MB)
    info = await GPUOptimizer(backend).get_gpu_info()
    assert info["count"] == 2
    assert info["gpus"]["gpu_0"]["memory_usage_percent"] == 95.0
    assert info["gpus"]["gpu_1"]["memory_free_mb"] == 1000.0
    assert set(info["gpus"]["gpu_0"]) >= {
        "name",
        "memory_total",
        "memory_used",
        "memory_free",
        "utilization_percent",
        "temperature_c",
        "power_w",
    }


async def test_allocate_without_cuda_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present; tests/gpu covers allocation")
    with pytest.raises(GPUUnavailableError, match="CUDA"):
        await GPUOptimizer().allocate_gpu_memory(size_mb=16, device_id=0)
    with pytest.raises(ValueError, match="size_mb"):
        await GPUOptimizer().allocate_gpu_memory(size_mb=-1)


async def test_optimize_without_cuda_reports_what_it_did() -> None:
    result = await GPUOptimizer(SimulatedBackend()).optimize_gpu_memory()
    assert result["freed_bytes"] == 0
    assert result["gc_collected"] >= 0
    assert result  # truthy, as the seed's `success = await ...` reads it


async def test_monitor_calls_back_over_thresholds_and_cancels() -> None:
    backend = SimulatedBackend(devices=2, memory_mb=1000)
    backend.set_external(1, 990 * MB)
    alerts: list[dict[str, Any]] = []
    seen = asyncio.Event()

    async def callback(alert: dict[str, Any]) -> None:
        alerts.append(alert)
        seen.set()

    task = await GPUOptimizer(backend).monitor_gpu_usage(
        callback, thresholds={"memory_usage_percent": 90}, interval=0.01
    )
    await asyncio.wait_for(seen.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert alerts[0]["device"] == "gpu_1"
    assert alerts[0]["exceeded"] == {"memory_usage_percent": 99.0}


# -- admission -----------------------------------------------------------------------


def test_best_fit_and_first_fit_placement() -> None:
    budgets = [10 * GB, 6 * GB]
    assert place(5 * GB, budgets, [0, 0], "best_fit") == 1
    assert place(5 * GB, budgets, [0, 0], "first_fit") == 0
    assert place(7 * GB, budgets, [0, 0], "best_fit") == 0
    assert place(7 * GB, budgets, [4 * GB, 0], "best_fit") == -1


async def test_waits_fifo_and_admits_on_release() -> None:
    adm = Admission([4 * GB], max_wait=30)
    first = await adm.acquire(3 * GB)
    waiter = asyncio.create_task(adm.acquire(2 * GB))
    await asyncio.sleep(0)
    assert not waiter.done() and len(adm.queue) == 1
    await adm.release(first)
    second = await asyncio.wait_for(waiter, 10)
    assert second.device == 0 and second.waited > 0
    assert adm.reserved == [2 * GB]
    assert await adm.release(second) and not await adm.release(second)  # exactly once
    assert adm.reserved == [0]


async def test_too_large_is_refused_at_once_never_queued() -> None:
    adm = Admission([4 * GB, 2 * GB])
    with pytest.raises(AdmissionRejected, match="largest device budget is 4096 MB") as info:
        await adm.acquire(5 * GB)
    assert info.value.retry_after is None  # retrying will not help
    assert not adm.queue


async def test_queue_bound_and_wait_bound_reject_with_retry_after() -> None:
    adm = Admission([1 * GB], max_queue=1, max_wait=0.05, retry_after=3)
    held = await adm.acquire(1 * GB)
    waiting = asyncio.create_task(adm.acquire(1 * GB))
    await asyncio.sleep(0)
    with pytest.raises(AdmissionRejected, match="queue full") as full:
        await adm.acquire(1 * GB)
    assert full.value.retry_after == 3
    with pytest.raises(AdmissionRejected, match="waited"):
        await waiting
    assert not adm.queue
    await adm.release(held)
    assert adm.reserved == [0]


async def test_cancelled_waiter_leaves_the_queue_and_holds_nothing() -> None:
    adm = Admission([1 * GB])
    held = await adm.acquire(1 * GB)
    waiter = asyncio.create_task(adm.acquire(512 * MB))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not adm.queue
    await adm.release(held)
    assert adm.reserved == [0]


async def test_small_requests_pass_a_blocked_large_one_at_most_max_bypass_times() -> None:
    adm = Admission([4 * GB], max_bypass=2)
    held = await adm.acquire(3 * GB)
    large = asyncio.create_task(adm.acquire(4 * GB))
    await asyncio.sleep(0)
    smalls = [asyncio.create_task(adm.acquire(256 * MB)) for _ in range(4)]
    await asyncio.sleep(0)
    admitted = [t for t in smalls if t.done()]
    assert len(admitted) == 2  # two passed the large one, then the queue is strict again
    for t in admitted:
        await adm.release(t.result())
    await adm.release(held)
    grant = await asyncio.wait_for(large, 10)  # the large one goes next, before the others
    assert grant.nbytes == 4 * GB
    assert not any(t.done() for t in smalls if t not in admitted)
    await adm.release(grant)
    for t in smalls:
        if t not in admitted:
            await adm.release(await asyncio.wait_for(t, 10))
    assert adm.reserved == [0]


async def test_random_stream_never_exceeds_any_budget() -> None:
    rng = random.Random(7)
    budgets = [8 * GB, 6 * GB, 3 * GB]
    adm = Admission(budgets, max_queue=1000, max_wait=60)
    worst = [0, 0, 0]

    async def one() -> None:
        grant = await adm.acquire(rng.choice([256, 512, 1024, 2048, 3072]) * MB)
        for i, r in enumerate(adm.reserved):
            worst[i] = max(worst[i], r)
            assert r <= budgets[i]
        await asyncio.sleep(rng.random() / 1000)
        await adm.release(grant)

    await asyncio.gather(*(one() for _ in range(300)))
    assert adm.reserved == [0, 0, 0]
    assert adm.stats.admitted == 300


# -- the plugin through the middleware --------------------------------------------------


class Seen:
    """Records what the hooks saw per request (queue wait, lease)."""

    name = "seen"

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.releases = 0

    @hookimpl
    async def gpu_release(self, ctx: Any, lease: Any) -> None:
        self.releases += 1

    @hookimpl
    async def after_request(self, ctx: Any) -> None:
        self.waits.append(ctx.queue_wait)


def gpu_app(
    backend: SimulatedBackend | None = None, gate: asyncio.Event | None = None
) -> Starlette:
    async def infer(request: Request) -> JSONResponse:
        lease = request.state.gpu_lease
        if backend is not None and isinstance(lease.device, int):
            backend.allocate(lease.device, 300 * MB)
            backend.free(lease.device, 300 * MB)
        if gate is not None:
            await gate.wait()
        return JSONResponse({"device": lease.device, "mb": lease.bytes // MB})

    async def boom(request: Request) -> PlainTextResponse:
        raise RuntimeError("endpoint bug")

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("no gpu")

    return Starlette(
        routes=[
            Route("/infer", infer, methods=["POST"]),
            Route("/auto", infer, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
            Route("/plain", plain),
        ]
    )


ROUTES = [
    {"path": "/infer", "gpu": {"memory_mb": 4096}},
    {"path": "/boom", "gpu": {"memory_mb": 4096}},
    {"path": "/auto", "gpu": {"memory_mb": "auto", "auto_min_samples": 3}},
]


def gpu_config(**gpu: Any) -> dict[str, Any]:
    settings = {"backend": "simulated", "simulated_devices": 2, "simulated_memory_mb": 8192}
    settings.update(gpu)
    return {"plugins": ["gpu"], "gpu": settings, "routes": ROUTES}


async def test_lease_reaches_the_endpoint_and_is_released() -> None:
    async with serve(gpu_app(), plugins=[GPUPlugin], config=gpu_config()) as h:
        r = await h.client.post("/infer")
        assert r.status_code == 200
        assert r.json() == {"device": 0, "mb": 4096}
        assert (await h.client.get("/plain")).text == "no gpu"
        stats = (await h.host.get_system_stats())["gpu"]
        assert stats["reserved_mb"] == [0.0, 0.0]
        assert stats["admitted"] == 1 and stats["releases"] == 1
        assert stats["budgets_mb"] == [7168.0, 7168.0]  # 8192 minus the 1024 MB margin
        assert h.host.gpu_optimizer is h.host.get_plugin("gpu").optimizer


async def test_release_exactly_once_when_the_app_raises() -> None:
    seen = Seen()
    plugin = GPUPlugin()
    host = make_host(plugin, seen, config=gpu_config())
    async with serve(gpu_app(), host=host, raise_app_exceptions=False) as h:
        r = await h.client.post("/boom")
        assert r.status_code == 500
    assert seen.releases == 1
    assert plugin.releases == 1
    assert plugin.admission is not None
    assert plugin.admission.stats.double_release == 0
    assert plugin.admission.reserved == [0, 0]


async def test_release_exactly_once_when_the_client_disconnects() -> None:
    """The server cancels the request task when the client goes (as uvicorn's
    disconnect handling ends the app): the lease still comes back, once."""
    seen = Seen()
    plugin = GPUPlugin()
    gate = asyncio.Event()  # never set: the endpoint is mid-inference when the client leaves
    inside = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        inside.set()
        await gate.wait()

    host = make_host(plugin, seen, config=gpu_config())
    mw = OverdriveMiddleware(app, host=host)
    scope = {"type": "http", "method": "POST", "path": "/infer", "headers": [], "state": {}}

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    task = asyncio.create_task(mw(scope, receive, send))
    await asyncio.wait_for(inside.wait(), 10)
    assert plugin.admission is not None and plugin.admission.reserved == [4 * GB, 0]
    assert scope["state"]["gpu_lease"].device == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen.releases == 1 and plugin.releases == 1
    assert plugin.admission.reserved == [0, 0]
    await host.cleanup()


async def test_the_client_reads_disconnect_and_the_app_returns() -> None:
    plugin = GPUPlugin()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # the app notices the client left and stops without a response

    host = make_host(plugin, config=gpu_config())
    mw = OverdriveMiddleware(app, host=host)
    messages = [
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        raise AssertionError("nothing is sent to a client that left")

    await mw({"type": "http", "method": "POST", "path": "/infer", "headers": []}, receive, send)
    assert plugin.releases == 1
    assert plugin.admission is not None and plugin.admission.reserved == [0, 0]
    await host.cleanup()


async def test_waiting_is_recorded_in_queue_wait_and_503_past_the_bound() -> None:
    gate = asyncio.Event()
    seen = Seen()
    config = gpu_config(simulated_devices=1, max_queue=1, max_wait=30, retry_after=7)
    host = make_host(GPUPlugin(), seen, config=config)
    async with serve(gpu_app(gate=gate), host=host) as h:
        first = asyncio.create_task(h.client.post("/infer"))
        plugin = h.host.get_plugin("gpu")
        while plugin.admission.stats.admitted < 1:
            await asyncio.sleep(0.001)
        second = asyncio.create_task(h.client.post("/infer"))
        while not plugin.admission.queue:
            await asyncio.sleep(0.001)
        third = await h.client.post("/infer")  # the queue (1) is full
        assert third.status_code == 503
        assert third.headers["retry-after"] == "7"
        assert "queue full" in third.text
        gate.set()
        assert (await first).status_code == 200
        assert (await second).status_code == 200
    assert max(seen.waits) > 0  # the second request's ctx.queue_wait


async def test_invalid_sizes_fail_at_startup() -> None:
    with pytest.raises(ConfigError, match="memory_mb"):
        make_host(
            GPUPlugin(),
            config=gpu_config() | {"routes": [{"path": "/x", "gpu": {"memory_mb": -5}}]},
        )
    with pytest.raises(ConfigError, match="more than any device has"):
        make_host(
            GPUPlugin(),
            config=gpu_config() | {"routes": [{"path": "/x", "gpu": {"memory_mb": 9000}}]},
        )
    with pytest.raises(ConfigError, match="max_wait"):
        make_host(GPUPlugin(), config=gpu_config(max_wait=-1))


async def test_a_size_over_the_budget_is_a_503_with_a_reason_not_a_hang() -> None:
    with pytest.raises(ConfigError, match="largest: 2048 MB"):  # a cap is known at startup
        make_host(GPUPlugin(), config=gpu_config(cap_mb=2048))
    # Free memory is only known at run time: another process holds 6 GB of each 8 GB device.
    backend = SimulatedBackend(devices=2, memory_mb=8192)
    backend.set_external(0, 6 * GB)
    backend.set_external(1, 6 * GB)
    plugin = GPUPlugin(backend=backend)
    config = {"plugins": ["gpu"], "routes": ROUTES}
    async with serve(gpu_app(), plugins=[plugin], config=config) as h:
        r = await asyncio.wait_for(h.client.post("/infer"), 10)
        assert r.status_code == 503
        assert "largest device budget is 1024 MB" in r.text  # 2048 free - 1024 margin
        assert "retry-after" not in r.headers


@pytest.mark.parametrize(("mode", "status"), [("cpu", 200), ("refuse", 503)])
async def test_no_gpu_passthrough_or_refuse(mode: str, status: int) -> None:
    plugin = GPUPlugin(backend=NullBackend("test: no GPU"))
    config = {"plugins": ["gpu"], "gpu": {"no_gpu": mode}, "routes": ROUTES}
    async with serve(gpu_app(), plugins=[plugin], config=config) as h:
        r = await h.client.post("/infer")
        assert r.status_code == status
        if mode == "cpu":
            assert r.json() == {"device": "cpu", "mb": 0}
        else:
            assert "no GPU" in r.text


async def test_auto_admits_by_the_learned_peak() -> None:
    backend = SimulatedBackend(devices=1, memory_mb=8192)
    plugin = GPUPlugin(backend=backend)
    config = {"plugins": ["gpu"], "gpu": {"auto_headroom": 1.5}, "routes": ROUTES}
    async with serve(gpu_app(backend), plugins=[plugin], config=config) as h:
        sizes = [(await h.client.post("/auto")).json()["mb"] for _ in range(5)]
    # Whole budget (8192 - 1024) until 3 samples, then the 300 MB peak times 1.5.
    assert sizes == [7168, 7168, 7168, 450, 450]
    assert plugin.learned is not None
    assert plugin.learned.snapshot()["/auto"]["admit_mb"] == 450.0


# -- several workers: Redis -------------------------------------------------------------


async def _cleanup(client: Any, namespace: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{namespace}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_redis_coordination_between_workers(redis_url: str, namespace: str) -> None:
    from redis.asyncio import Redis

    a_client, b_client = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        worker_a = Admission([1 * GB], ledger=RedisLedger(a_client, namespace), poll_interval=0.01)
        worker_b = Admission([1 * GB], ledger=RedisLedger(b_client, namespace), poll_interval=0.01)
        held = await worker_a.acquire(600 * MB)
        waiting = asyncio.create_task(worker_b.acquire(600 * MB))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # B sees A's lease through Redis
        assert await worker_b.used() == [600 * MB]
        await worker_a.release(held)
        grant = await asyncio.wait_for(waiting, 10)
        assert grant.device == 0
        await worker_b.release(grant)
        assert await worker_a.used() == [0]
    finally:
        await _cleanup(a_client, namespace)
        await b_client.aclose()


async def test_a_crashed_workers_lease_lapses(redis_url: str, namespace: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        crashed = RedisLedger(client, namespace, lease_ttl=0.2)
        assert await crashed.reserve("dead-worker-lease", 800 * MB, [1 * GB]) == 0
        survivor = Admission([1 * GB], ledger=RedisLedger(client, namespace), poll_interval=0.02)
        grant = await asyncio.wait_for(survivor.acquire(800 * MB), 10)  # waits, then it lapses
        assert grant.waited > 0
        await survivor.release(grant)
    finally:
        await _cleanup(client, namespace)


async def test_a_live_workers_lease_is_renewed(redis_url: str, namespace: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        ledger = RedisLedger(client, namespace, lease_ttl=0.3)
        assert await ledger.reserve("live", 800 * MB, [1 * GB]) == 0
        for _ in range(4):
            await asyncio.sleep(0.1)
            assert await ledger.renew() == 1
        assert await ledger.used(1) == [800 * MB]
        assert await ledger.release("live", 0, 800 * MB)
        assert not await ledger.release("live", 0, 800 * MB)
    finally:
        await _cleanup(client, namespace)


async def test_redis_unreachable_is_a_503_with_a_reason(redis_url: str, namespace: str) -> None:
    from tests.support.faults import free_port

    config = gpu_config(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_prefix=namespace)
    async with serve(gpu_app(), plugins=[GPUPlugin], config=config) as h:
        r = await asyncio.wait_for(h.client.post("/infer"), 20)
        assert r.status_code == 503
        assert "coordination unavailable" in r.text


async def test_plugin_with_redis_admits_and_releases(redis_url: str, namespace: str) -> None:
    from redis.asyncio import Redis

    config = gpu_config(redis_url=redis_url, redis_prefix=namespace)
    async with serve(gpu_app(), plugins=[GPUPlugin], config=config) as h:
        assert (await h.client.post("/infer")).status_code == 200
        plugin = h.host.get_plugin("gpu")
        assert await plugin.admission.used() == [0, 0]
    await _cleanup(Redis.from_url(redis_url), namespace)
