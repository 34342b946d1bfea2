"""Device backends: where device facts come from (NVML, or a simulation).

The admission logic and `GPUOptimizer` never call NVML directly; they ask a
`DeviceBackend`. `NVMLBackend` is the real one (nvidia-ml-py, imported as
`pynvml`). `SimulatedBackend` pretends to have N devices of a given size, with
a tiny allocator (allocate/free, peak tracking like torch's) so that admission
settings and the learned "auto" sizes can be tried on a laptop, and so that the
demo runs on machines without a GPU. `NullBackend` is the honest "no device".
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DeviceBackend",
    "DeviceInfo",
    "NVMLBackend",
    "NullBackend",
    "SimulatedBackend",
    "open_backend",
]

MB = 2**20


@dataclass(slots=True)
class DeviceInfo:
    """One device's figures at one moment. Optional figures are None when unknown."""

    index: int
    name: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization_percent: float | None = None
    memory_utilization_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_usage_percent(self) -> float:
        return 100.0 * self.memory_used / self.memory_total if self.memory_total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The seed's per-device shape (``gpu_info["gpus"]["gpu_0"]``), sizes in MB too."""
        return {
            "index": self.index,
            "name": self.name,
            "memory_total": self.memory_total,
            "memory_used": self.memory_used,
            "memory_free": self.memory_free,
            "memory_total_mb": round(self.memory_total / MB, 1),
            "memory_used_mb": round(self.memory_used / MB, 1),
            "memory_free_mb": round(self.memory_free / MB, 1),
            "memory_usage_percent": round(self.memory_usage_percent, 2),
            "utilization_percent": self.utilization_percent,
            "memory_utilization_percent": self.memory_utilization_percent,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
            "power_limit_w": self.power_limit_w,
            **self.extra,
        }


@runtime_checkable
class DeviceBackend(Protocol):
    """What the GPU code needs to know about devices. Calls are cheap and blocking."""

    kind: str

    def device_count(self) -> int: ...

    def device_info(self, index: int) -> DeviceInfo: ...

    def close(self) -> None: ...


class NullBackend:
    """No device: count 0. `reason` says why (no NVML library, no driver, no GPU)."""

    kind = "none"

    def __init__(self, reason: str = "no GPU") -> None:
        self.reason = reason

    def device_count(self) -> int:
        return 0

    def device_info(self, index: int) -> DeviceInfo:
        raise IndexError(f"no GPU device {index}: {self.reason}")

    def close(self) -> None:
        pass


class NVMLBackend:
    """NVIDIA devices through NVML. Raises `RuntimeError` at construction without NVML.

    Figures a device does not support (power on some boards, temperature in a
    MIG slice) are None rather than an error.
    """

    kind = "nvml"

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise RuntimeError("nvidia-ml-py is not installed (overdrive[gpu])") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise RuntimeError(f"NVML is not available: {exc}") from exc
        self._nvml = pynvml
        self._lock = threading.Lock()
        self._closed = False
        self._count = int(pynvml.nvmlDeviceGetCount())
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(self._count)]

    def device_count(self) -> int:
        return self._count

    def _optional(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def device_info(self, index: int) -> DeviceInfo:
        nv = self._nvml
        if not 0 <= index < self._count:
            raise IndexError(f"no GPU device {index}: NVML sees {self._count}")
        handle = self._handles[index]
        with self._lock:
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            name = nv.nvmlDeviceGetName(handle)
            util = self._optional(nv.nvmlDeviceGetUtilizationRates, handle)
            temp = self._optional(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU)
            power = self._optional(nv.nvmlDeviceGetPowerUsage, handle)
            limit = self._optional(nv.nvmlDeviceGetEnforcedPowerLimit, handle)
        return DeviceInfo(
            index=index,
            name=name.decode() if isinstance(name, bytes) else str(name),
            memory_total=int(mem.total),
            memory_used=int(mem.used),
            memory_free=int(mem.free),
            utilization_percent=float(util.gpu) if util is not None else None,
            memory_utilization_percent=float(util.memory) if util is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            power_w=power / 1000.0 if power is not None else None,
            power_limit_w=limit / 1000.0 if limit is not None else None,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()


class SimulatedBackend:
    """`devices` pretend devices of `memory_mb` each, with a tiny allocator.

    ``allocate(device, nbytes)`` / ``free(device, nbytes)`` move the used figure
    and the peak, like torch's caching allocator would; `external_mb` is memory
    "another process" holds (it shows in used, as NVML would show it).
    """

    kind = "simulated"

    def __init__(self, devices: int = 1, memory_mb: int = 24576, name: str = "Simulated GPU"):
        if devices < 0:
            raise ValueError(f"devices: expected >= 0, got {devices}")
        if memory_mb <= 0:
            raise ValueError(f"memory_mb: expected > 0, got {memory_mb}")
        self.name = name
        self.total = [memory_mb * MB] * devices
        self.used = [0] * devices
        self.peak = [0] * devices
        self.external = [0] * devices
        self._lock = threading.Lock()

    def device_count(self) -> int:
        return len(self.total)

    def device_info(self, index: int) -> DeviceInfo:
        if not 0 <= index < len(self.total):
            raise IndexError(f"no simulated device {index}: there are {len(self.total)}")
        used = self.used[index] + self.external[index]
        total = self.total[index]
        return DeviceInfo(
            index=index,
            name=self.name,
            memory_total=total,
            memory_used=used,
            memory_free=max(0, total - used),
            utilization_percent=0.0 if not self.used[index] else 100.0,
            extra={"simulated": True},
        )

    def set_external(self, index: int, nbytes: int) -> None:
        """Pretend another process holds `nbytes` on device `index`."""
        self.external[index] = nbytes

    def allocate(self, index: int, nbytes: int) -> None:
        """The app "uses" `nbytes` on `index`; raises MemoryError past the device size."""
        with self._lock:
            free = self.total[index] - self.used[index] - self.external[index]
            if nbytes > free:
                raise MemoryError(
                    f"simulated out of memory on device {index}: "
                    f"{nbytes / MB:.0f} MB asked, {free / MB:.0f} MB free"
                )
            self.used[index] += nbytes
            self.peak[index] = max(self.peak[index], self.used[index])

    def free(self, index: int, nbytes: int) -> None:
        with self._lock:
            self.used[index] = max(0, self.used[index] - nbytes)

    # The same shape as the torch probe, so that "auto" sizes can be learned here.
    def memory_allocated(self, index: int) -> int:
        return self.used[index]

    def max_memory_allocated(self, index: int) -> int:
        return self.peak[index]

    def reset_peak_memory_stats(self, index: int) -> None:
        self.peak[index] = self.used[index]

    def close(self) -> None:
        pass


def open_backend(
    kind: str = "auto", *, simulated_devices: int = 0, simulated_memory_mb: int = 24576
) -> DeviceBackend:
    """``"nvml"``, ``"simulated"``, or ``"auto"``: NVML when it sees a device, else the
    simulation when `simulated_devices` > 0, else a `NullBackend` saying why.
    """
    if kind == "simulated":
        return SimulatedBackend(simulated_devices or 1, simulated_memory_mb)
    reason = "no GPU"
    try:
        backend = NVMLBackend()
    except RuntimeError as exc:
        if kind == "nvml":
            return NullBackend(str(exc))
        reason = str(exc)
    else:
        if backend.device_count() > 0 or kind == "nvml":
            return backend
        backend.close()
        reason = "NVML sees no device"
    if simulated_devices > 0:
        return SimulatedBackend(simulated_devices, simulated_memory_mb)
    return NullBackend(reason)
