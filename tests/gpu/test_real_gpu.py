"""NVML, torch.cuda and the gpu plugin on a real device (skipped without one)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from overdrive.contrib.testing import serve
from overdrive.plugins.gpu import GPUOptimizer, GPUPlugin, NVMLBackend, open_backend

MB = 2**20


def test_nvml_backend_reads_every_device() -> None:
    backend = NVMLBackend()
    try:
        assert backend.device_count() >= 1
        for i in range(backend.device_count()):
            info = backend.device_info(i)
            assert info.name
            assert info.memory_total > 0
            assert 0 <= info.memory_used <= info.memory_total
            assert 0 <= info.memory_free <= info.memory_total
            assert 0 <= info.memory_usage_percent <= 100
            if info.utilization_percent is not None:
                assert 0 <= info.utilization_percent <= 100
            if info.power_w is not None:
                assert info.power_w > 0
    finally:
        backend.close()
    assert open_backend("auto").kind == "nvml"


async def test_gpu_info_has_the_seed_shape() -> None:
    info = await GPUOptimizer().get_gpu_info()
    assert info["count"] >= 1 and info["backend"] == "nvml"
    gpu0 = info["gpus"]["gpu_0"]
    assert 0 <= gpu0["memory_usage_percent"] <= 100
    assert gpu0["memory_total_mb"] > 0
    print("gpu_0:", {k: gpu0[k] for k in sorted(gpu0)})


async def test_allocate_optimize_and_torch_figures(cuda: Any) -> None:
    opt = GPUOptimizer()
    tensor = await opt.allocate_gpu_memory(size_mb=64, device_id=0)
    assert tensor.device.type == "cuda" and tensor.numel() == 64 * MB
    info = await opt.get_gpu_info()
    assert info["torch_cuda"] is True
    assert info["gpus"]["gpu_0"]["torch_allocated"] >= 64 * MB
    del tensor
    freed = await opt.optimize_gpu_memory(device_id=0)
    assert freed["torch_cuda"] is True and freed["devices"] == [0]
    assert freed["freed_bytes"] >= 64 * MB  # the cached block went back to the driver
    everything = await opt.optimize_gpu_memory()
    assert everything["devices"] == list(range(cuda.cuda.device_count()))


async def test_allocating_more_than_the_device_is_torchs_oom(cuda: Any) -> None:
    total_mb = cuda.cuda.get_device_properties(0).total_memory // MB
    with pytest.raises(cuda.OutOfMemoryError):
        await GPUOptimizer().allocate_gpu_memory(size_mb=total_mb * 2, device_id=0)
    with pytest.raises(Exception, match="device_id"):
        await GPUOptimizer().allocate_gpu_memory(size_mb=1, device_id=999)


async def test_monitor_reports_real_figures() -> None:
    alerts: list[dict[str, Any]] = []
    seen = asyncio.Event()

    def callback(alert: dict[str, Any]) -> None:
        alerts.append(alert)
        seen.set()

    opt = GPUOptimizer()
    task = await opt.monitor_gpu_usage(callback, {"memory_usage_percent": -1.0}, interval=0.05)
    await asyncio.wait_for(seen.wait(), 30)
    task.cancel()
    assert alerts[0]["device"] == "gpu_0"
    assert alerts[0]["info"]["memory_total"] > 0


async def test_plugin_admits_on_the_real_device_and_learns_the_peak(cuda: Any) -> None:
    async def infer(request: Request) -> JSONResponse:
        lease = request.state.gpu_lease
        x = cuda.empty(200 * MB, dtype=cuda.uint8, device=f"cuda:{lease.device}")
        x.fill_(1)
        del x
        return JSONResponse({"device": lease.device, "bytes": lease.bytes})

    app = Starlette(routes=[Route("/fixed", infer), Route("/auto", infer)])
    config = {
        "plugins": ["gpu"],
        "gpu": {"backend": "nvml", "safety_margin_mb": 1024},
        "routes": [
            {"path": "/fixed", "gpu": {"memory_mb": 256}},
            {"path": "/auto", "gpu": {"memory_mb": "auto", "auto_min_samples": 2}},
        ],
    }
    async with serve(app, plugins=[GPUPlugin], config=config) as h:
        r = await h.client.get("/fixed")
        assert r.status_code == 200 and r.json()["bytes"] == 256 * MB
        plugin = h.host.get_plugin("gpu")
        info = plugin.backend.device_info(0)
        assert 0 < plugin.admission.budgets[0] <= info.memory_total - 1024 * MB
        sizes = [(await h.client.get("/auto")).json()["bytes"] for _ in range(4)]
        learned = sizes[-1]
        assert 200 * MB <= learned <= int(200 * MB * 1.2 * 1.05), sizes
        stats = (await h.host.get_system_stats())["gpu"]
        assert stats["reserved_mb"][0] == 0.0
        print("learned:", stats["learned"], "budgets_mb:", stats["budgets_mb"])
