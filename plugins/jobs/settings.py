"""`JobsSettings`: the ``[jobs]`` table and its per-route overrides.

Queue-wide settings (workers, bounds, budgets, the store) are read from the
``[jobs]`` table only; the per-route ones (``job``, ``async_default``,
``idempotency``, ``priority``, ``tenant``) may be set by a ``[[routes]]`` rule or
``@policy(jobs={...})``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from overdrive.errors import ConfigError

__all__ = ["JobsSettings"]

_TENANT_FORMS = "'principal', 'header:<name>' or 'path:<name>'"


@dataclass
class JobsSettings:
    # -- per route ------------------------------------------------------------------
    job: bool = False  # the route may run as a job (Prefer: respond-async / wait=N)
    async_default: bool = False  # run as a job even without Prefer: respond-async
    idempotency: Literal["off", "optional", "required"] = "off"  # Idempotency-Key handling
    priority: Literal["interactive", "batch"] = "interactive"  # class in the job queue
    tenant: str = "principal"  # who a job is queued for (fair queuing, per-tenant cap)
    # -- the queue ----------------------------------------------------------------------
    workers: int = 4  # jobs run at once in this process (admission still applies to each)
    max_queue: int = 1000  # queued jobs in all; past it a submission gets 503
    max_queued_per_tenant: int = 100  # queued jobs per tenant; past it 429
    fairness: Literal["fair", "fifo"] = "fair"  # weighted fair queuing across tenants, or FIFO
    weights: dict[str, float] = field(default_factory=dict)  # tenant -> weight (default 1)
    max_body: int = 1 << 20  # bytes of a request body captured for a job or a key
    max_wait: float = 60.0  # the longest Prefer: wait=N honoured, in seconds
    retry_after: float = 1.0  # polling hint (Retry-After) while a job is not done
    # -- results ------------------------------------------------------------------------
    result_ttl: float = 86_400.0  # seconds a finished job's result is kept
    max_result_bytes: int = 16 << 20  # one result's body; larger: the job fails (507)
    result_budget_bytes: int = 256 << 20  # all results kept; the oldest go first (410)
    max_jobs: int = 10_000  # job records kept (queued, running, finished)
    monitor_prefix: str = "/_jobs/"  # status monitors live under it
    # -- idempotency keys ---------------------------------------------------------------
    idempotency_ttl: float = 86_400.0  # seconds a key and its response are kept
    idempotency_conflict: Literal["join", "409"] = "join"  # a repeat while the first runs
    join_timeout: float = 30.0  # seconds a joining repeat waits before 409
    lock_ttl: float = 600.0  # seconds a key stays claimed by a request that never finishes
    store: Literal["memory", "redis"] = "memory"  # where keys live (redis: all workers)
    redis_url: str | None = None  # default: the host's redis_url
    key_prefix: str = "overdrive:idem:"
    principal_headers: list[str] = field(
        default_factory=lambda: ["authorization", "cookie", "x-api-key"]
    )

    def __post_init__(self) -> None:
        w = "jobs"
        for key in ("workers", "max_queue", "max_queued_per_tenant", "max_body", "max_jobs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{w}.{key}: expected >= 1, got {getattr(self, key)!r}")
        for key in ("max_result_bytes", "result_budget_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{w}.{key}: expected >= 1, got {getattr(self, key)!r}")
        for key in (
            "max_wait",
            "retry_after",
            "result_ttl",
            "idempotency_ttl",
            "join_timeout",
            "lock_ttl",
        ):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{w}.{key}: expected > 0, got {getattr(self, key)!r}")
        t = self.tenant
        if not (
            t == "principal"
            or (t.startswith("header:") and len(t) > 7)
            or (t.startswith("path:") and len(t) > 5)
        ):
            raise ConfigError(f"{w}.tenant: expected {_TENANT_FORMS}, got {t!r}")
        for name, weight in self.weights.items():
            if not isinstance(weight, (int, float)) or not weight > 0:
                raise ConfigError(f"{w}.weights.{name}: expected a number > 0, got {weight!r}")
        p = self.monitor_prefix
        if not (p.startswith("/") and p.endswith("/") and len(p) > 2):
            raise ConfigError(f"{w}.monitor_prefix: expected '/<path>/', got {p!r}")
