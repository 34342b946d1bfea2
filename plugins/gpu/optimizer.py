"""`GPUOptimizer`: the seed's GPU helper, usable without the middleware.

Device figures come from a `DeviceBackend` (NVML by default); torch's caching
allocator figures are added where torch and CUDA are present. Blocking NVML
and torch calls run in a thread so that the event loop never waits on a driver.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from overdrive.redact import plain_traceback

from .backends import MB, DeviceBackend, open_backend

__all__ = ["DEFAULT_THRESHOLDS", "GPUOptimizer", "GPUUnavailableError"]

logger = logging.getLogger("overdrive.gpu")

#: Percent figures above which `monitor_gpu_usage` calls back.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "memory_usage_percent": 90.0,
    "utilization_percent": 95.0,
    "temperature_c": 85.0,
}


class GPUUnavailableError(RuntimeError):
    """A GPU operation was asked for where there is no CUDA device (or no torch)."""


def import_torch() -> Any:
    """torch, or None when it is not installed.

    Its import-time warnings (a CPU build without NumPy warns) are not ours to
    raise: they are silenced for the import only.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
    except ImportError:
        return None
    return torch


def _torch_cuda() -> Any:
    """torch when it is importable and sees a CUDA device, else None."""
    torch = import_torch()
    if torch is None:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:  # a broken driver install: treat as no CUDA
        return None


def torch_memory(torch: Any, index: int) -> dict[str, int]:
    """The caching allocator's figures for one device, in bytes."""
    return {
        "torch_allocated": int(torch.cuda.memory_allocated(index)),
        "torch_reserved": int(torch.cuda.memory_reserved(index)),
        "torch_max_allocated": int(torch.cuda.max_memory_allocated(index)),
    }


class GPUOptimizer:
    """Device information, memory clean-up, allocation and monitoring.

    ``GPUOptimizer()`` opens NVML when it is there; on a machine without a GPU
    (or without NVML) `get_gpu_info` says ``count: 0`` and why. Pass
    ``backend=SimulatedBackend(2, 24576)`` to try things without a GPU.
    """

    def __init__(self, backend: DeviceBackend | None = None) -> None:
        self._backend = backend

    @property
    def backend(self) -> DeviceBackend:
        if self._backend is None:
            self._backend = open_backend("auto")
        return self._backend

    def _info_sync(self) -> dict[str, Any]:
        backend = self.backend
        count = backend.device_count()
        torch = _torch_cuda() if backend.kind == "nvml" else None
        gpus: dict[str, Any] = {}
        for i in range(count):
            figures = backend.device_info(i).as_dict()
            if torch is not None and i < torch.cuda.device_count():
                figures.update(torch_memory(torch, i))
            gpus[f"gpu_{i}"] = figures
        info: dict[str, Any] = {
            "count": count,
            "backend": backend.kind,
            "gpus": gpus,
            "torch_cuda": torch is not None,
        }
        reason = getattr(backend, "reason", None)
        if count == 0 and reason:
            info["reason"] = reason
        return info

    async def get_gpu_info(self) -> dict[str, Any]:
        """``{"count", "backend", "gpus": {"gpu_0": {...}}, "torch_cuda"}``.

        Per device: name, memory total/used/free (bytes and MB), memory_usage_percent,
        utilization, temperature, power; torch's allocated/reserved/peak when torch
        sees CUDA. With no device: ``count`` 0, ``gpus`` empty, and a ``reason``.
        """
        return await asyncio.to_thread(self._info_sync)

    async def optimize_gpu_memory(self, device_id: int | None = None) -> dict[str, Any]:
        """Collect garbage and give torch's cached blocks back to the driver.

        Returns what was freed: ``{"freed_bytes", "devices", "gc_collected",
        "torch_cuda"}`` (truthy when it ran, so ``success = await ...`` reads as
        the seed wrote it). ``device_id=None`` means every device.
        """
        collected = gc.collect()
        torch = _torch_cuda()
        if torch is None:
            return {"freed_bytes": 0, "devices": [], "gc_collected": collected, "torch_cuda": False}

        def run() -> tuple[int, list[int]]:
            count = torch.cuda.device_count()
            if device_id is not None and not 0 <= device_id < count:
                raise GPUUnavailableError(f"device_id {device_id}: torch sees {count} device(s)")
            devices = list(range(count)) if device_id is None else [device_id]
            freed = 0
            for d in devices:
                before = torch.cuda.memory_reserved(d)
                with torch.cuda.device(d):
                    torch.cuda.empty_cache()
                    torch.cuda.ipc_collect()
                freed += max(0, before - torch.cuda.memory_reserved(d))
            return freed, devices

        freed, devices = await asyncio.to_thread(run)
        return {
            "freed_bytes": freed,
            "freed_mb": round(freed / MB, 1),
            "devices": devices,
            "gc_collected": collected,
            "torch_cuda": True,
        }

    async def allocate_gpu_memory(self, size_mb: float, device_id: int = 0) -> Any:
        """A torch uint8 tensor of `size_mb` MB on `device_id`.

        Raises `GPUUnavailableError` without CUDA, `ValueError` for a size <= 0,
        and torch's ``OutOfMemoryError`` when the device cannot hold it.
        """
        if not size_mb > 0:
            raise ValueError(f"size_mb: expected > 0, got {size_mb!r}")
        torch = _torch_cuda()
        if torch is None:
            raise GPUUnavailableError(
                "allocate_gpu_memory needs torch with a CUDA device; "
                + ("torch sees no CUDA device" if _has_torch() else "torch is not installed")
            )
        count = torch.cuda.device_count()
        if not 0 <= device_id < count:
            raise GPUUnavailableError(f"device_id {device_id}: torch sees {count} device(s)")
        nbytes = int(size_mb * MB)
        return await asyncio.to_thread(
            torch.empty, nbytes, dtype=torch.uint8, device=f"cuda:{device_id}"
        )

    async def monitor_gpu_usage(
        self,
        callback: Callable[[dict[str, Any]], Any],
        thresholds: Mapping[str, float] | None = None,
        interval: float = 5.0,
    ) -> asyncio.Task[None]:
        """Start watching; returns the running task (``task.cancel()`` stops it).

        Every `interval` seconds each device's figures are compared with
        `thresholds` (default `DEFAULT_THRESHOLDS`); for each device over any of
        them, ``callback(alert)`` is called (awaited when it is async), with
        ``alert = {"device", "exceeded": {name: value}, "info": figures}``.
        A callback that raises is logged; the monitor goes on.
        """
        if interval <= 0:
            raise ValueError(f"interval: expected > 0, got {interval!r}")
        limits = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        return asyncio.get_running_loop().create_task(
            self._monitor(callback, limits, interval), name="overdrive-gpu-monitor"
        )

    async def _monitor(
        self,
        callback: Callable[[dict[str, Any]], Any],
        limits: dict[str, float],
        interval: float,
    ) -> None:
        while True:
            try:
                info = await self.get_gpu_info()
            except Exception as exc:
                logger.error("GPU monitor could not read device figures\n%s", plain_traceback(exc))
                info = {"gpus": {}}
            for key, figures in info["gpus"].items():
                exceeded = {
                    name: figures[name]
                    for name, limit in limits.items()
                    if figures.get(name) is not None and figures[name] > limit
                }
                if not exceeded:
                    continue
                try:
                    result = callback({"device": key, "exceeded": exceeded, "info": figures})
                    if isinstance(result, Awaitable):
                        await result
                except Exception as exc:
                    logger.error("GPU monitor callback raised\n%s", plain_traceback(exc))
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()


def _has_torch() -> bool:
    return import_torch() is not None
