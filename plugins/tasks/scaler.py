"""`AutoScaler` and `ScalingConfig`: grow and shrink a worker pool from its load.

Why it exists: a fixed pool is either too small for a burst of renders or idle
most of the day. Every `check_interval` the scaler measures, over the interval
just past, the workers' utilization (busy worker-seconds over available
worker-seconds) and the queue depth, and applies Kubernetes' HPA rule
``desired = ceil(current * metric / target)`` with utilization as the metric,
where queued jobs count as load waiting for a worker (as Celery's autoscale
counts reserved jobs). The two thresholds form a dead band (HPA has a fixed
10 % tolerance instead); cooldowns keep it from flapping. See docs/plugins/tasks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from overdrive.redact import plain_traceback

from ..scaling import ScalingConfig, desired_size
from .processor import BackgroundTaskProcessor, logger

__all__ = ["AutoScaler", "ScalingConfig", "ScalingDecision"]


@dataclass
class ScalingDecision:
    """One evaluation: what was measured and what the scaler chose."""

    at: float
    workers: int
    desired: int
    utilization: float
    queue_depth: int
    load: float  # busy workers (average over the interval) + queued jobs
    reason: str


class AutoScaler:
    """Scales a `BackgroundTaskProcessor` between ``min_workers`` and ``max_workers``.

    ::

        auto_scaler = AutoScaler(ScalingConfig(min_workers=2, max_workers=10))
        await auto_scaler.start()          # starts its own processor at min_workers
        await auto_scaler.add_task(render, video_id="1")
        auto_scaler.get_stats()["current_workers"]

    Pass ``processor=`` to scale a processor you own instead.
    """

    def __init__(
        self,
        config: ScalingConfig | None = None,
        processor: BackgroundTaskProcessor | None = None,
    ) -> None:
        self.config = config if config is not None else ScalingConfig()
        self._owns = processor is None
        self.processor = processor or BackgroundTaskProcessor(
            max_workers=self.config.min_workers, name="autoscaled"
        )
        self._task: asyncio.Task[None] | None = None
        self._mark: tuple[float, float, float] | None = None  # (time, busy, capacity)
        self._last_up = -math.inf
        self._last_change = -math.inf
        self.scale_ups = 0
        self.scale_downs = 0
        self.last: ScalingDecision | None = None
        self.decisions: deque[ScalingDecision] = deque(maxlen=256)

    async def start(self) -> None:
        """Start the processor (if this scaler owns it) and the decision loop."""
        if self._task is not None:
            return
        c = self.config
        if self._owns:
            await self.processor.start(workers=c.min_workers)
        elif not self.processor.running:
            await self.processor.start()
        workers = self.processor.workers
        if workers < c.min_workers or workers > c.max_workers:
            self.processor.resize(min(max(workers, c.min_workers), c.max_workers))
        self._reset_mark()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="autoscaler")

    async def stop(self, timeout: float | None = None) -> None:
        """Stop deciding; stop the processor too if this scaler owns it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns:
            await self.processor.stop(timeout)

    async def add_task(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.processor.add_task(fn, *args, **kwargs)

    def _reset_mark(self) -> None:
        busy, capacity = self.processor.busy_and_capacity()
        self._mark = (time.monotonic(), busy, capacity)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval)
            try:
                self.step()
            except Exception as exc:  # a bad decision must not end the loop
                logger.error("autoscaler step failed", traceback=plain_traceback(exc))

    def step(self, now: float | None = None) -> ScalingDecision:
        """Measure, decide and apply once (the loop calls this every `check_interval`)."""
        now = time.monotonic() if now is None else now
        busy, capacity = self.processor.busy_and_capacity(now)
        if self._mark is None:
            self._mark = (now, busy, capacity)
        _, busy0, cap0 = self._mark
        self._mark = (now, busy, capacity)
        d_cap = capacity - cap0
        utilization = min(1.0, (busy - busy0) / d_cap) if d_cap > 0 else 0.0
        decision = self.decide(self.processor.workers, utilization, self.processor.queue_depth, now)
        if decision.desired != decision.workers:
            self.processor.resize(decision.desired)
            self._last_change = now
            if decision.desired > decision.workers:
                self._last_up = now
                self.scale_ups += 1
            else:
                self.scale_downs += 1
            logger.info(
                "autoscaler resized",
                workers=decision.workers,
                desired=decision.desired,
                utilization=round(utilization, 3),
                queue_depth=decision.queue_depth,
                reason=decision.reason,
            )
        self.last = decision
        self.decisions.append(decision)
        return decision

    def decide(
        self, workers: int, utilization: float, queue_depth: int, now: float
    ) -> ScalingDecision:
        """The rule (`overdrive.plugins.scaling.desired_size`), without side effects,
        with load = utilization * workers + queue_depth (busy workers plus jobs waiting)."""
        load = utilization * workers + queue_depth
        desired, reason = desired_size(
            self.config, workers, load, now, self._last_up, self._last_change
        )
        return ScalingDecision(
            round(now, 3), workers, desired, round(utilization, 4), queue_depth, load, reason
        )

    def get_stats(self) -> dict[str, Any]:
        c = self.config
        last = self.last
        return {
            "current_workers": self.processor.workers,
            "min_workers": c.min_workers,
            "max_workers": c.max_workers,
            "scale_up_threshold": c.scale_up_threshold,
            "scale_down_threshold": c.scale_down_threshold,
            "utilization": last.utilization if last else 0.0,
            "queue_depth": self.processor.queue_depth,
            "scale_ups": self.scale_ups,
            "scale_downs": self.scale_downs,
            "last_decision": last.reason if last else None,
            "running": self._task is not None,
            "history": list(self.processor.history),
        }
