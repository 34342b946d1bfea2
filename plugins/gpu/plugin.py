"""The `gpu` plugin: GPU memory admission for routes that say how much they need.

Route rules name the memory a request needs (``gpu = { memory_mb = 4096 }``, or
``"auto"`` to admit by what the route was measured to use). `gpu_allocate`
reserves it on the best-fitting device (waiting in a bounded FIFO queue, or
answering 503 + Retry-After) and returns a `Lease`; the middleware calls
`gpu_release` exactly once, in its ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from overdrive import ConfigError, Lease, Plugin, hookimpl
from overdrive.metrics import MetricFamily as F
from overdrive.middleware.responses import PlainResponse
from overdrive.redact import plain_traceback

from .admission import Admission, AdmissionRejected, RedisLedger
from .backends import MB, DeviceBackend, SimulatedBackend, open_backend
from .learned import LearnedSizes, PeakProbe
from .optimizer import GPUOptimizer, import_torch

__all__ = ["GPUPlugin", "GPUSettings", "Unavailable"]

logger = logging.getLogger("overdrive.gpu")


def _positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"gpu.{name}: expected {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class GPUSettings:
    """Settings of the `gpu` plugin; `memory_mb` is the per-route one."""

    #: Per route: MB a request needs, "auto" (learned), or None (no GPU needed).
    memory_mb: int | Literal["auto"] | None = None
    #: "auto": NVML when it sees a GPU, else the simulation if `simulated_devices` > 0.
    backend: Literal["auto", "nvml", "simulated"] = "auto"
    simulated_devices: int = 0
    simulated_memory_mb: int = 24576
    #: Per-device budget in MB; when unset: free memory at the first admission minus the margin.
    cap_mb: int | None = None
    safety_margin_mb: int = 1024
    placement: Literal["best_fit", "first_fit"] = "best_fit"
    #: Waiters beyond this are answered 503 at once.
    max_queue: int = 64
    #: Seconds a request may wait for memory before a 503.
    max_wait: float = 30.0
    #: How many times a blocked waiter may be passed by smaller ones (0 = strict FIFO).
    max_bypass: int = 4
    #: Retry-After (seconds) on a 503.
    retry_after: int = 2
    #: No GPU and no simulation: run with device "cpu", or answer 503.
    no_gpu: Literal["cpu", "refuse"] = "cpu"
    #: "auto" admission: percentile of recent peaks, times headroom, after min_samples.
    auto_percentile: float = 95.0
    auto_headroom: float = 1.2
    auto_min_samples: int = 5
    #: "auto" before enough samples: this many MB, or (None) a whole device.
    auto_initial_mb: int | None = None
    #: Several workers share the GPUs: a Redis URL (or "host" for the host's redis_url).
    redis_url: str | None = None
    redis_prefix: str = "overdrive:gpu"
    #: A crashed worker's leases lapse after this many seconds (renewed while held).
    lease_ttl: float = 60.0
    #: Seconds between budget re-reads of idle devices (0: measure once).
    refresh_interval: float = 0.0
    #: (route) Bytes of request body read before GPU memory is claimed (all of a
    #: smaller body), on routes with `memory_mb`: a client trickling its body holds
    #: a connection, not GPU memory. 0: claim first.
    admit_after_body: int = 1 << 20

    @property
    def body_before_admission(self) -> int:
        return self.admit_after_body if self.memory_mb is not None else 0

    def __post_init__(self) -> None:
        if isinstance(self.memory_mb, int) and self.memory_mb <= 0:
            raise ConfigError(f"gpu.memory_mb: expected > 0 or 'auto', got {self.memory_mb!r}")
        _positive("simulated_devices", self.simulated_devices, allow_zero=True)
        _positive("simulated_memory_mb", self.simulated_memory_mb)
        _positive("cap_mb", self.cap_mb)
        _positive("safety_margin_mb", self.safety_margin_mb, allow_zero=True)
        _positive("max_queue", self.max_queue, allow_zero=True)
        _positive("max_wait", self.max_wait, allow_zero=True)
        _positive("max_bypass", self.max_bypass, allow_zero=True)
        _positive("retry_after", self.retry_after, allow_zero=True)
        _positive("auto_initial_mb", self.auto_initial_mb)
        _positive("auto_min_samples", self.auto_min_samples)
        _positive("lease_ttl", self.lease_ttl)
        _positive("refresh_interval", self.refresh_interval, allow_zero=True)
        _positive("admit_after_body", self.admit_after_body, allow_zero=True)
        if not 0 < self.auto_percentile <= 100:
            raise ConfigError(
                f"gpu.auto_percentile: expected 0 < p <= 100, got {self.auto_percentile!r}"
            )
        if self.auto_headroom < 1:
            raise ConfigError(f"gpu.auto_headroom: expected >= 1, got {self.auto_headroom!r}")
        if self.backend == "simulated" and self.simulated_devices == 0:
            self.simulated_devices = 1


class Unavailable(PlainResponse):
    """503 with a reason and Retry-After (at least 1 s): a bare ASGI callable."""

    __slots__ = ()

    def __init__(self, reason: str, retry_after: float | None) -> None:
        super().__init__(
            503,
            f"GPU unavailable: {reason}".encode(),
            retry_after=None if retry_after is None else max(1, round(retry_after)),
        )


class GPUPlugin(Plugin):
    """GPU memory admission; ``host.gpu_optimizer`` is its `GPUOptimizer`."""

    name = "gpu"
    metric_families = (
        F(
            "gpu_devices",
            "gauge",
            "GPU devices admission manages",
            "devices",
            multiprocess_mode="livemostrecent",
        ),
        F(
            "gpu_budget_bytes",
            "gauge",
            "Memory admission may lease, per device",
            "budgets_mb.*",
            unit="bytes",
            labels=("device",),
            scale=2**20,
            multiprocess_mode="livemostrecent",
        ),
        F(
            "gpu_reserved_bytes",
            "gauge",
            "Memory leased now, per device",
            "reserved_mb.*",
            unit="bytes",
            labels=("device",),
            scale=2**20,
            multiprocess_mode="livemostrecent",
        ),
        F("gpu_admitted_requests", "counter", "Requests given a GPU lease", "admitted"),
        F(
            "gpu_waited_requests",
            "counter",
            "Requests that waited for memory before their lease",
            "queued",
        ),
        F(
            "gpu_waiting_requests",
            "gauge",
            "Requests waiting for a lease now",
            "queued_now",
            multiprocess_mode="livesum",
        ),
        F(
            "gpu_rejected_requests",
            "counter",
            "Requests refused a lease (503), by reason",
            "rejected.*",
            labels=("reason",),
        ),
        F("gpu_releases", "counter", "Leases released", "releases"),
        F("gpu_release_errors", "counter", "Lease releases that failed", "release_errors"),
        F("gpu_cpu_leases", "counter", "Requests served on the CPU fallback", "cpu_leases"),
        F(
            "gpu_wait_max_seconds",
            "gauge",
            "Longest wait for a lease so far",
            "wait_max_s",
            unit="seconds",
        ),
        F(
            "gpu_learned_peak_bytes",
            "gauge",
            "Peak memory learned per route rule (auto sizing)",
            "learned.*.max_mb",
            unit="bytes",
            labels=("route",),
            scale=2**20,
        ),
        F(
            "gpu_learned_samples",
            "counter",
            "Requests measured per route rule (auto sizing)",
            "learned.*.samples",
            labels=("route",),
        ),
    )
    Settings = GPUSettings
    provides: ClassVar[dict[str, str]] = {
        "gpu_optimizer": "optimizer",
        "gpu_admission": "admission",
    }

    def __init__(self, settings: GPUSettings | None = None, backend: DeviceBackend | None = None):
        super().__init__(settings)
        self.backend = backend
        self.optimizer: GPUOptimizer | None = None
        self.admission: Admission | None = None
        self.learned: LearnedSizes | None = None
        self.probe: PeakProbe | None = None
        self.redis: Any = None
        self._ledger: RedisLedger | None = None
        self._route_keys: dict[Any, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._measured = False
        self.releases = 0
        self.cpu_leases = 0
        self.release_errors = 0

    # -- lifecycle ---------------------------------------------------------------

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: GPUSettings = self.settings
        if self.backend is None:
            self.backend = open_backend(
                s.backend,
                simulated_devices=s.simulated_devices,
                simulated_memory_mb=s.simulated_memory_mb,
            )
        self.optimizer = GPUOptimizer(self.backend)
        count = self.backend.device_count()
        totals = [self.backend.device_info(i).memory_total for i in range(count)]
        if count:
            largest = max(s.cap_mb * MB if s.cap_mb else t for t in totals)
            for i, rule in enumerate(host.routes.rules):
                mb = rule.overrides.get("gpu", {}).get("memory_mb")
                if isinstance(mb, int) and mb * MB > largest:
                    raise ConfigError(
                        f"routes[{i}].gpu.memory_mb: {mb} MB is more than any device has "
                        f"(largest: {largest // MB} MB)"
                    )
        self.learned = LearnedSizes(s.auto_percentile, s.auto_headroom, s.auto_min_samples)
        if isinstance(self.backend, SimulatedBackend):
            self.probe = PeakProbe(self.backend)
        elif count:
            torch = import_torch()
            if torch is not None and torch.cuda.is_available():
                self.probe = PeakProbe(torch.cuda)
        if s.redis_url is not None:
            from overdrive.plugins.redisconn import redis_client

            url = host.redis_url if s.redis_url == "host" else s.redis_url
            if not url:
                raise ConfigError("gpu.redis_url: 'host' given but the host has no redis_url")
            try:
                # a waiting pool: a burst of releases queues for a connection instead of
                # failing with MaxConnectionsError (and leaking its memory until lease_ttl)
                self.redis = redis_client(
                    url,
                    max_connections=32,
                    pool_timeout=10.0,
                    socket_timeout=2.0,
                    connect_timeout=2.0,
                    retries=1,
                )
            except ValueError as exc:
                raise ConfigError(f"gpu.redis_url: {exc}") from None
            self._ledger = RedisLedger(self.redis, s.redis_prefix, s.lease_ttl, s.placement)
        self.admission = Admission(
            [0] * count,
            placement=s.placement,
            max_queue=s.max_queue,
            max_wait=s.max_wait,
            max_bypass=s.max_bypass,
            retry_after=s.retry_after,
            ledger=self._ledger,
        )

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        loop = asyncio.get_running_loop()
        if self.admission is not None and self.admission.budgets:
            # A first figure for stats; measured again at the first admission, after
            # the app's own startup has loaded its models.
            await asyncio.to_thread(self.measure_budgets)
            self._measured = False
        if self._ledger is not None:
            self._tasks.append(loop.create_task(self._heartbeat()))
        if self.settings.refresh_interval > 0 and self.admission and self.admission.budgets:
            self._tasks.append(loop.create_task(self._refresh_loop()))

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self.admission is not None:
            await self.admission.close()
        if self._ledger is not None and self._ledger.unreleased:
            with contextlib.suppress(Exception):
                await self._ledger.heartbeat()  # a last try for failed releases
        if self.redis is not None:
            from overdrive.plugins.redisconn import close_client

            await close_client(self.redis)

    def measure_budgets(self) -> list[int]:
        """Set each idle device's budget: the cap, or free memory minus the margin."""
        s: GPUSettings = self.settings
        assert self.admission is not None and self.backend is not None
        margin = s.safety_margin_mb * MB
        reserved = self.admission.reserved
        for i in range(len(self.admission.budgets)):
            if reserved[i]:
                continue  # our own leases are in NVML's "used": measure when idle
            info = self.backend.device_info(i)
            budget = max(0, info.memory_free - margin)
            if s.cap_mb is not None:
                budget = min(s.cap_mb * MB, max(0, info.memory_total - margin))
            self.admission.budgets[i] = budget
        self._measured = True
        return list(self.admission.budgets)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval)
            try:
                await asyncio.to_thread(self.measure_budgets)
            except Exception as exc:
                logger.error("gpu: could not re-read device memory\n%s", plain_traceback(exc))

    async def _heartbeat(self) -> None:
        ledger = self._ledger
        assert ledger is not None
        while True:
            await asyncio.sleep(ledger.heartbeat_interval)
            try:
                held = len(ledger.held)
                renewed, lost = await ledger.heartbeat()
                if lost:
                    logger.warning(
                        "gpu: Redis had lost %d of %d lease(s); written back", lost, held
                    )
                elif renewed < held:
                    logger.warning("gpu: %d lease(s) had lapsed in Redis", held - renewed)
            except Exception as exc:
                logger.warning("gpu: could not renew leases in Redis: %s", exc)

    # -- requests --------------------------------------------------------------------

    def _route_key(self, ctx: Any) -> str:
        policy = ctx.policy
        key = self._route_keys.get(policy)
        if key is None:
            key = " | ".join(r.path for r in policy.rules) or "/"
            self._route_keys[policy] = key
        return key

    @hookimpl
    async def gpu_allocate(self, ctx: Any) -> Lease | Unavailable | None:
        rs = ctx.settings(self.name)
        if rs is None or rs.memory_mb is None:
            return None
        admission = self.admission
        assert admission is not None
        if not admission.budgets:
            if self.settings.no_gpu == "refuse":
                return Unavailable("this server has no GPU", None)
            self.cpu_leases += 1
            return self._publish(ctx, Lease("cpu", 0))
        if not self._measured:
            await asyncio.to_thread(self.measure_budgets)
        if rs.memory_mb == "auto":
            key = self._route_key(ctx)
            assert self.learned is not None
            need = self.learned.estimate(key)
            if need is None:
                initial = rs.auto_initial_mb
                need = initial * MB if initial else max(admission.budgets)
        else:
            key = None
            need = rs.memory_mb * MB
        try:
            grant = await admission.acquire(need)
        except AdmissionRejected as exc:
            return Unavailable(exc.reason, exc.retry_after)
        ctx.queue_wait += grant.waited
        lease = Lease(grant.device, grant.nbytes, owner=grant.lease_id)
        lease.extra["grant"] = grant
        if self.probe is not None:
            lease.extra["route"] = key or self._route_key(ctx)
            lease.extra["at_start"] = self.probe.start(grant.device)
        return self._publish(ctx, lease)

    @staticmethod
    def _publish(ctx: Any, lease: Lease) -> Lease:
        """Put the lease where an endpoint finds it: ``request.state.gpu_lease``."""
        state = ctx.scope.get("state")
        if state is None:
            state = ctx.scope["state"] = {}
        state["gpu_lease"] = lease
        return lease

    @hookimpl
    async def gpu_release(self, ctx: Any, lease: Lease) -> None:
        grant = lease.extra.get("grant")
        if grant is None or self.admission is None:
            return  # a cpu lease, or another plugin's
        if grant.released:
            return
        self.releases += 1
        if self.probe is not None and "at_start" in lease.extra:
            peak = self.probe.finish(grant.device, lease.extra["at_start"])
            if self.learned is not None and ctx.error is None:
                self.learned.record(lease.extra["route"], peak, ctx.settings(self.name))
        try:
            await self.admission.release(grant)
        except Exception as exc:  # Redis gone: the lease lapses after lease_ttl
            self.release_errors += 1
            logger.warning("gpu: release failed (%s); the lease lapses after its TTL", exc)

    @hookimpl
    async def collect_stats(self, host: Any) -> dict[str, Any]:
        a = self.admission
        out: dict[str, Any] = {
            "backend": getattr(self.backend, "kind", None),
            "devices": len(a.budgets) if a else 0,
            "releases": self.releases,
            "cpu_leases": self.cpu_leases,
        }
        if a is not None:
            st = a.stats
            out.update(
                budgets_mb=[round(b / MB, 1) for b in a.budgets],
                reserved_mb=[round(r / MB, 1) for r in a.reserved],
                queued_now=len(a.queue),
                admitted=st.admitted,
                queued=st.queued,
                rejected={
                    "too_large": st.rejected_too_large,
                    "queue_full": st.rejected_queue_full,
                    "timeout": st.rejected_timeout,
                    "backend": st.rejected_backend,
                },
                wait_max_s=round(st.wait_max, 4),
                release_errors=self.release_errors,
            )
        if self.learned is not None:
            out["learned"] = self.learned.snapshot()
        return out
