"""GPU: device facts (NVML or simulated), the seed's `GPUOptimizer`, and the `gpu`
admission plugin (budgets per device, best-fit placement, a bounded FIFO queue,
leases released exactly once, Redis coordination between workers, learned sizes).
"""

from __future__ import annotations

from .admission import Admission, AdmissionRejected, Grant, LocalLedger, RedisLedger, place
from .backends import (
    DeviceBackend,
    DeviceInfo,
    NullBackend,
    NVMLBackend,
    SimulatedBackend,
    open_backend,
)
from .learned import LearnedSizes, PeakProbe
from .optimizer import DEFAULT_THRESHOLDS as DEFAULT_THRESHOLDS
from .optimizer import GPUOptimizer, GPUUnavailableError
from .plugin import GPUPlugin, GPUSettings, Unavailable

__all__ = [
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
