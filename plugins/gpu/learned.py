"""Learned per-route GPU memory: what `memory_mb = "auto"` admits by.

Around each lease the plugin reads the allocator's peak (torch's
``torch.cuda.max_memory_allocated``, or the simulated backend's) and records
``peak - allocated at start`` for the route. The admission figure is a high
percentile of the recent samples times a headroom factor, and only once there
are enough samples; before that the caller decides (a configured first guess,
or a whole device).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["LearnedSizes", "PeakProbe"]


class LearnedSizes:
    """Per-route samples (bytes) and the admission estimate derived from them."""

    def __init__(
        self,
        percentile: float = 95.0,
        headroom: float = 1.2,
        min_samples: int = 5,
        window: int = 200,
    ) -> None:
        self.percentile = percentile
        self.headroom = headroom
        self.min_samples = min_samples
        self.window = window
        self._samples: dict[str, deque[int]] = {}
        self._estimate: dict[str, int] = {}

    def record(self, key: str, nbytes: int, settings: Any = None) -> None:
        """Add a sample; `settings` (a route's) may override percentile, headroom, min samples."""
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self.window)
        samples.append(max(0, int(nbytes)))
        percentile = getattr(settings, "auto_percentile", self.percentile)
        headroom = getattr(settings, "auto_headroom", self.headroom)
        if len(samples) >= getattr(settings, "auto_min_samples", self.min_samples):
            ordered = sorted(samples)
            rank = max(0, math.ceil(percentile / 100.0 * len(ordered)) - 1)
            self._estimate[key] = int(ordered[rank] * headroom)

    def estimate(self, key: str) -> int | None:
        """Bytes to admit a request of `key` by, or None while there are too few samples."""
        return self._estimate.get(key)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, samples in self._samples.items():
            est = self._estimate.get(key)
            out[key] = {
                "samples": len(samples),
                "max_mb": round(max(samples) / 2**20, 1) if samples else 0.0,
                "admit_mb": round(est / 2**20, 1) if est is not None else None,
            }
        return out


class PeakProbe:
    """Reads an allocator's peak around a lease.

    `allocator` has ``memory_allocated(i)``, ``max_memory_allocated(i)`` and
    ``reset_peak_memory_stats(i)``: ``torch.cuda`` itself, or a `SimulatedBackend`.
    The peak is reset only when no other lease of this process is active on the
    device; with overlapping leases the sample includes their growth too, so it
    errs on the large (safe) side.
    """

    def __init__(self, allocator: Any) -> None:
        self.allocator = allocator
        self.active: dict[int, int] = {}

    def start(self, device: int) -> int:
        a = self.allocator
        if not self.active.get(device):
            a.reset_peak_memory_stats(device)
        self.active[device] = self.active.get(device, 0) + 1
        return int(a.memory_allocated(device))

    def finish(self, device: int, at_start: int) -> int:
        self.active[device] = max(0, self.active.get(device, 1) - 1)
        return max(0, int(self.allocator.max_memory_allocated(device)) - at_start)
