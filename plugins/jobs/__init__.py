"""Long requests as async jobs over standard HTTP, idempotency keys, fair queuing.

- `JobsPlugin` (``jobs``): a route with ``jobs = {job = true}`` answers
  ``Prefer: respond-async`` (RFC 7240) with ``202 Accepted`` and a status
  monitor; the job replays the request through the middleware later, so
  admission (rate limits, concurrency, GPU leases) applies when it runs.
  ``jobs = {idempotency = "optional"}`` honours ``Idempotency-Key``.
- `FairQueue`: the weighted-fair, bounded queue the jobs wait in.
- `JobsSettings`: the ``[jobs]`` table.

``ctx.progress(0.4, "step 20/50")`` in an endpoint reports progress to the
monitor (a no-op outside a job). See docs/plugins/jobs.md.
"""

from __future__ import annotations

from .plugin import JobsPlugin, is_job
from .queue import FairQueue, QueueFull, TenantFull
from .settings import JobsSettings

__all__ = ["FairQueue", "JobsPlugin", "JobsSettings", "QueueFull", "TenantFull", "is_job"]
