"""`Job` (one job's record) and `JobStore` (all of them, bounded in count, time and bytes).

In-process: jobs do not survive a restart of this process, and a status monitor
is answered only by the process that took the submission (the 202's body says
``"durable": false``). Finished results are kept `result_ttl` seconds within
`result_budget_bytes`; past the budget the oldest results are dropped first and
their monitors answer 410 Gone. Past `max_jobs` records, the oldest finished
record is forgotten (its monitor answers 404).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import anyio

__all__ = ["DONE", "Job", "JobStore", "Result", "new_job_id"]

DONE = frozenset({"succeeded", "failed", "cancelled"})


def new_job_id() -> str:
    """128 random bits, URL-safe (22 characters): unguessable, so ids never leak jobs."""
    return secrets.token_urlsafe(16)


@dataclass(slots=True)
class Result:
    """The response the replayed request produced, as the client would have seen it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(eq=False)
class Job:
    id: str
    principal: str  # hash of the submitter's credentials: only they see the monitor
    tenant: str
    priority: str
    request: Any  # the captured request (replay.CapturedRequest)
    state: str = "queued"  # queued -> running -> succeeded | failed | cancelled
    progress: float | None = None
    message: str = ""
    error: str | None = None
    result: Result | None = None
    evicted: bool = False  # the result was dropped to stay within the byte budget
    too_large: bool = False  # the result exceeded max_result_bytes
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    cancel: Any = None  # set while running: call it to cancel the run
    # Replaced on each change; waiters (Prefer: wait, SSE) wait on the current one.
    changed: anyio.Event | None = None
    version: int = 0

    @property
    def done(self) -> bool:
        return self.state in DONE

    def touch(self) -> None:
        self.version += 1
        if self.changed is not None:
            self.changed.set()
            self.changed = None

    async def wait_change(self, seen: int) -> None:
        """Return once `version` differs from `seen` (at once if it already does)."""
        if self.version != seen:
            return
        if self.changed is None:
            self.changed = anyio.Event()
        await self.changed.wait()

    def set_progress(self, fraction: float, message: str) -> None:
        if self.state != "running":
            return
        try:
            f = float(fraction)
        except (TypeError, ValueError):
            return
        if f != f:  # NaN
            return
        self.progress = min(1.0, max(0.0, f))
        self.message = str(message)[:500]
        self.touch()

    def status(self, position: int | None, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "monitor": prefix + self.id,
            "position": position,
            "progress": None
            if self.progress is None
            else {"fraction": round(self.progress, 4), "message": self.message},
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "durable": False,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.result is not None:
            out["result"] = {"status": self.result.status, "bytes": len(self.result.body)}
        return out


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class JobStore:
    def __init__(self, max_jobs: int, result_ttl: float, budget: int) -> None:
        self.max_jobs = max_jobs
        self.result_ttl = result_ttl
        self.budget = budget
        self.jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()  # id -> finished_at, in order
        self.result_bytes = 0
        self.evictions = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self.jobs)

    def has_room(self) -> bool:
        self.expire()
        if len(self.jobs) < self.max_jobs:
            return True
        if self._finished:  # forget the oldest finished record to make room
            self._forget(next(iter(self._finished)))
            return True
        return False

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        self.expire()
        return self.jobs.get(job_id)

    def finish(self, job: Job) -> None:
        """Record that `job` ended; keep its result within the budget."""
        job.finished_at = time.time()
        self._finished[job.id] = job.finished_at
        if job.result is not None:
            self.result_bytes += len(job.result.body)
            while self.result_bytes > self.budget:
                if not self._evict_oldest():
                    break

    def _evict_oldest(self) -> bool:
        for job_id in self._finished:
            old = self.jobs[job_id]
            if old.result is not None:
                self.result_bytes -= len(old.result.body)
                old.result = None
                old.evicted = True
                self.evictions += 1
                return True
        return False

    def _forget(self, job_id: str) -> None:
        self._finished.pop(job_id, None)
        job = self.jobs.pop(job_id, None)
        if job is not None and job.result is not None:
            self.result_bytes -= len(job.result.body)
            job.result = None

    def expire(self, now: float | None = None) -> None:
        horizon = (time.time() if now is None else now) - self.result_ttl
        while self._finished:
            job_id, at = next(iter(self._finished.items()))
            if at > horizon:
                break
            self._forget(job_id)
            self.expired += 1

    def by_state(self) -> dict[str, int]:
        out = {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
        for job in self.jobs.values():
            out[job.state] += 1
        return out
