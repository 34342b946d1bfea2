"""`JobsPlugin` (``jobs``): any endpoint as an async job, idempotency keys, fair queuing.

Read top to bottom: the submission (``before_request``, first of all plugins so
that admission applies when the job runs, not when it is queued), the status
monitor, the workers that replay captured requests through the middleware, and
the idempotency bookkeeping (``after_request``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from typing import Any, ClassVar

import anyio
import structlog

from overdrive import Plugin, hookimpl
from overdrive.errors import ConfigError
from overdrive.metrics import MetricFamily as F

from .http import (
    BodyTooLarge,
    CapturedRequest,
    ClientGone,
    MalformedPrefer,
    ReplayReceive,
    json_response,
    parse_prefer,
    principal_of,
    read_body,
    tenant_of,
)
from .idempotency import MemoryKeys, Record, RedisKeys, fingerprint, new_owner, storable, valid_key
from .monitor import EventStream, ResultResponse, state_header, status_response
from .queue import FairQueue, QueueFull, TenantFull
from .settings import JobsSettings
from .store import Job, JobStore, Result, new_job_id

__all__ = ["JOB_EXTENSION", "JobsPlugin", "is_job"]

logger = structlog.get_logger("overdrive.jobs")

JOB_EXTENSION = "overdrive.job"  # on the scope of a replayed request: {"id": ..., "job": Job}
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_MAX_TENANTS = 1000  # tenants whose recent waits are remembered (LRU)


def is_job(scope: Any) -> bool:
    """Whether this request is a job being run (a replay), not a client's request."""
    ext = scope.get("extensions")
    return ext is not None and JOB_EXTENSION in ext


def _error(status: int, text: str, retry_after: float | None = None, **extra: Any) -> Any:
    return json_response(status, {"error": text, **extra}, retry_after=retry_after)


class JobsPlugin(Plugin):
    name = "jobs"
    # Per-tenant figures stay on the stats endpoint: a tenant id is not a label value.
    metric_families = (
        F("jobs_stored", "gauge", "Jobs the store holds, by state", "jobs.*", labels=("state",)),
        F("jobs_queue_depth", "gauge", "Jobs waiting to run", "queued"),
        F(
            "jobs_stored_result_bytes",
            "gauge",
            "Bytes of kept results",
            "result_bytes",
            unit="bytes",
        ),
        F(
            "jobs_evicted_results",
            "counter",
            "Results evicted to keep the byte bound",
            "results_evicted",
        ),
        F("jobs_submitted", "counter", "Jobs submitted", "submitted"),
        F(
            "jobs_refused_submissions",
            "counter",
            "Submissions refused, by reason",
            "(queue_full|tenant_full|body_too_large)",
            labels=("reason",),
        ),
        F(
            "jobs_idempotent_requests",
            "counter",
            "Requests with an Idempotency-Key, by outcome",
            "(replayed|joined|conflicts=conflict|mismatches=mismatch)",
            labels=("outcome",),
        ),
        F("jobs_key_store_errors", "counter", "Idempotency key store errors", "key_store_errors"),
    )
    Settings = JobsSettings
    provides: ClassVar[dict[str, str]] = {"jobs": "self_"}

    def __init__(self, settings: JobsSettings | None = None) -> None:
        super().__init__(settings)
        self.self_ = self
        self._host: Any = None
        self._entry: Any = None  # a second middleware over the same app: jobs run through it
        self.queue: FairQueue | None = None
        self.store: JobStore | None = None
        self.keys: Any = None
        self._workers: list[asyncio.Task[None]] = []
        self._principal_names: frozenset[bytes] = frozenset()
        self._rid: bytes = b"x-request-id"
        self.waits: OrderedDict[str, deque[float]] = OrderedDict()  # tenant -> queue waits
        self.counts = {
            "submitted": 0,
            "queue_full": 0,
            "tenant_full": 0,
            "body_too_large": 0,
            "replayed": 0,
            "joined": 0,
            "conflicts": 0,
            "mismatches": 0,
            "key_store_errors": 0,
        }

    # -- configuration ------------------------------------------------------------------

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: JobsSettings = self.settings
        self._host = host
        self._principal_names = frozenset(n.lower().encode("latin-1") for n in s.principal_headers)
        self._rid = host.settings.request_id_header.lower().encode("latin-1")
        self.queue = FairQueue(
            s.max_queue, s.max_queued_per_tenant, s.weights, fifo=s.fairness == "fifo"
        )
        self.store = JobStore(s.max_jobs, s.result_ttl, s.result_budget_bytes)
        if s.store == "redis":
            url = s.redis_url or host.redis_url
            if not url:
                raise ConfigError("jobs.store: 'redis' needs jobs.redis_url or redis_url")
            self.keys = RedisKeys(url, s.key_prefix)
        else:
            self.keys = MemoryKeys()

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        for _ in range(self.settings.workers):
            self._workers.append(asyncio.ensure_future(self._work()))

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        assert self.store is not None
        for job in list(self.store.jobs.values()):
            if job.state == "running" and job.cancel is not None:
                job.cancel()
        for task in self._workers:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        with contextlib.suppress(Exception):
            await self.keys.close()

    # -- submission -----------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    async def before_request(self, ctx: Any) -> Any:
        ext = ctx.scope.get("extensions")
        if ext and JOB_EXTENSION in ext:  # a job being run: progress goes to its monitor
            ctx.progress_sink = ext[JOB_EXTENSION]["job"].set_progress
            return None
        if ctx.path.startswith(self.settings.monitor_prefix):
            return self._monitor(ctx)
        rs: JobsSettings | None = ctx.settings("jobs")
        if rs is None or not (rs.job or rs.idempotency != "off"):
            return None
        prefs = None
        if rs.job:
            prefer = [v for n, v in ctx.raw_headers if n.lower() == b"prefer"]
            try:
                prefs = parse_prefer(prefer) if prefer else None
            except MalformedPrefer as exc:
                return _error(400, str(exc))
        as_job = rs.job and (
            rs.async_default
            or (prefs is not None and (prefs.respond_async or prefs.wait is not None))
        )
        key = None
        if rs.idempotency != "off" and ctx.method not in _SAFE:
            raw = [v for n, v in ctx.raw_headers if n.lower() == b"idempotency-key"]
            if raw:
                key = valid_key(raw[0]) if len(raw) == 1 else None
                if key is None:
                    return _error(
                        400, "Idempotency-Key: expected one key of 1-255 visible characters"
                    )
            elif rs.idempotency == "required":
                return _error(400, "this endpoint requires an Idempotency-Key header")
        if not as_job and key is None:
            return None
        try:
            body = await read_body(ctx.receive, self.settings.max_body)
        except BodyTooLarge:
            self.counts["body_too_large"] += 1
            return _error(413, f"request body over jobs.max_body ({self.settings.max_body} bytes)")
        except ClientGone:
            return _error(400, "the client left before its body arrived")
        principal = principal_of(ctx.raw_headers, self._principal_names)
        claim = None
        if key is not None:
            scoped = f"{principal}:{key}"
            fp = fingerprint(
                ctx.method, ctx.path, ctx.query_string, ctx.headers.get("content-type", ""), body
            )
            record = Record(fp, new_owner())
            answer = await self._claim(scoped, record)
            if answer is not None:
                return answer
            claim = (scoped, record)
        if as_job:
            assert prefs is not None or rs.async_default
            wait = None if prefs is None else prefs.wait
            return await self._submit(ctx, rs, body, principal, wait, claim)
        # A synchronous request with a key: it runs now, its response is kept (after_request).
        ctx.receive = ReplayReceive(body, ctx.receive)
        ctx.state["jobs"] = claim
        ctx.capture_response(self.settings.max_result_bytes)
        return None

    async def _claim(self, scoped: str, record: Record) -> Any:
        """None: `record` holds the key now (run the request). Else the answer to give."""
        s: JobsSettings = self.settings
        try:
            held = await self.keys.claim(scoped, record, s.lock_ttl)
            if held is None:
                return None
            if held.fingerprint != record.fingerprint:
                self.counts["mismatches"] += 1
                return _error(422, "this Idempotency-Key was used with a different request")
            if held.result is None:
                if s.idempotency_conflict == "409":
                    self.counts["conflicts"] += 1
                    return _error(409, "a request with this Idempotency-Key is in progress", 1.0)
                held = await self.keys.wait(scoped, s.join_timeout)
                if not held or held.result is None:
                    self.counts["conflicts"] += 1
                    return _error(409, "a request with this Idempotency-Key is in progress", 1.0)
                self.counts["joined"] += 1
            else:
                self.counts["replayed"] += 1
            assert held.result is not None
            return ResultResponse(held.result, [(b"idempotent-replayed", b"true")])
        except Exception as exc:  # the key store is down: degrade to no idempotency
            self.counts["key_store_errors"] += 1
            logger.warning("idempotency key store failed", error=repr(exc))
            return None

    async def _submit(
        self,
        ctx: Any,
        rs: JobsSettings,
        body: bytes,
        principal: str,
        wait: float | None,
        claim: tuple[str, Record] | None,
    ) -> Any:
        s: JobsSettings = self.settings
        assert self.queue is not None and self.store is not None
        tenant = tenant_of(rs.tenant, ctx, principal)
        job = Job(new_job_id(), principal, tenant, rs.priority, CapturedRequest.of(ctx.scope, body))
        refused = None
        if not self.store.has_room():
            self.counts["queue_full"] += 1
            refused = _error(503, "too many jobs are kept; try later", s.retry_after * 5)
        else:
            try:
                self.queue.push(job, tenant, rs.priority)
            except QueueFull:
                self.counts["queue_full"] += 1
                refused = _error(503, "the job queue is full", s.retry_after * 5)
            except TenantFull:
                self.counts["tenant_full"] += 1
                refused = _error(
                    429,
                    "too many queued jobs for this tenant",
                    s.retry_after * 5,
                    tenant_cap=s.max_queued_per_tenant,
                )
        if refused is not None:
            if claim is not None:
                await self._release(claim)
            return refused
        self.store.add(job)
        self.counts["submitted"] += 1
        prefix = ctx.scope.get("root_path", "") + s.monitor_prefix
        accepted = json_response(
            202,
            job.status(self.queue.position(job), prefix),
            [
                (b"location", (prefix + job.id).encode()),
                (b"preference-applied", b"respond-async"),
                state_header(job),
            ],
            retry_after=s.retry_after,
        )
        if claim is not None:
            claim[1].result = Result(202, accepted.headers, accepted.body)
            await self._complete(claim)
        if wait:
            with anyio.move_on_after(min(wait, s.max_wait)):
                while not job.done:
                    await job.wait_change(job.version)
            if job.done:
                return self._done_answer(job, prefix)
        return accepted

    # -- the status monitor --------------------------------------------------------------

    def _monitor(self, ctx: Any) -> Any:
        s: JobsSettings = self.settings
        assert self.store is not None and self.queue is not None
        rest = ctx.path[len(s.monitor_prefix) :]
        job_id, _, view = rest.partition("/")
        job = self.store.get(job_id) if len(job_id) == 22 and view in ("", "status") else None
        if job is None or principal_of(ctx.raw_headers, self._principal_names) != job.principal:
            return _error(404, "no such job")  # another principal's job is not theirs to know of
        prefix = ctx.scope.get("root_path", "") + s.monitor_prefix
        if ctx.method == "DELETE" and not view:
            return self._cancel(job, prefix)
        if ctx.method != "GET":
            return json_response(405, {"error": "GET or DELETE"}, [(b"allow", b"GET, DELETE")])
        if "text/event-stream" in ctx.headers.get("accept", ""):
            return EventStream(job, self.queue.position, prefix)
        if view or not job.done:
            return status_response(job, self.queue.position(job), prefix, s.retry_after)
        return self._done_answer(job, prefix)

    def _done_answer(self, job: Job, prefix: str) -> Any:
        if job.result is not None:
            return ResultResponse(job.result, [state_header(job)])
        return status_response(job, None, prefix, self.settings.retry_after)

    def _cancel(self, job: Job, prefix: str) -> Any:
        assert self.queue is not None and self.store is not None
        if job.done:
            data = job.status(None, prefix)
            data["error"] = f"the job is already {job.state}"
            return json_response(409, data, [state_header(job)])
        if job.state == "queued":
            self.queue.remove(job)
            job.state = "cancelled"
            self.store.finish(job)
        else:
            job.state = "cancelled"  # the worker finishes the record once the task ends
            if job.cancel is not None:
                job.cancel()
        job.touch()
        return json_response(200, job.status(None, prefix), [state_header(job)])

    # -- workers: replay the captured request through the middleware -------------------

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            job = await self.queue.pop()
            if job.state != "queued":
                continue
            try:
                await self._run(job)
            except Exception:
                logger.exception("job runner failed", job=job.id)

    async def _run(self, job: Job) -> None:
        assert self.store is not None
        job.state = "running"
        job.started_at = time.time()
        self._record_wait(job.tenant, job.started_at - job.created_at)
        job.touch()
        task = asyncio.ensure_future(self._replay(job))
        # Retrieved here even when this worker is cancelled first (shutdown).
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        job.cancel = task.cancel
        try:
            await asyncio.wait([task])
        finally:
            job.cancel = None
            if not task.done():
                task.cancel()
        if job.state == "cancelled" or task.cancelled():
            job.state = "cancelled"
        elif (exc := task.exception()) is not None and job.result is None:
            job.state = "failed"
            job.error = f"the endpoint raised {type(exc).__name__}"
        elif job.too_large:
            job.state, job.error = "failed", "result_too_large"
        elif job.result is not None:
            job.state = "succeeded" if job.result.status < 500 else "failed"
            if job.state == "succeeded":
                job.progress = 1.0
        else:
            job.state, job.error = "failed", "the endpoint sent no response"
        self.store.finish(job)
        job.touch()

    async def _replay(self, job: Job) -> None:
        if self._entry is None:
            from overdrive.middleware import OverdriveMiddleware

            app = self._host.state.get("app")
            if app is None:
                raise RuntimeError("no app in host.state['app'] (is the middleware in use?)")
            self._entry = OverdriveMiddleware(app, host=self._host)
        limit = self.settings.max_result_bytes
        rid = self._rid
        done = anyio.Event()
        start: dict[str, Any] = {}
        chunks: list[bytes] = []
        size = 0

        async def send(message: Any) -> None:
            nonlocal size
            if message["type"] == "http.response.start":
                start["status"] = message["status"]
                start["headers"] = [
                    (n, v) for n, v in message.get("headers") or () if n.lower() != rid
                ]
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if not job.too_large:
                    size += len(body)
                    if size > limit:
                        job.too_large = True
                        chunks.clear()
                    else:
                        chunks.append(body)
                if not message.get("more_body", False):
                    done.set()

        scope = job.request.scope({JOB_EXTENSION: {"id": job.id, "job": job}})
        try:
            await self._entry(scope, ReplayReceive(job.request.body, done=done), send)
        finally:
            done.set()
            # The outcome is the worker's to record (_run), in one step with the touch.
            if "status" in start and not job.too_large and job.state != "cancelled":
                job.result = Result(start["status"], start["headers"], b"".join(chunks))

    def _record_wait(self, tenant: str, seconds: float) -> None:
        waits = self.waits.get(tenant)
        if waits is None:
            waits = self.waits[tenant] = deque(maxlen=200)
            if len(self.waits) > _MAX_TENANTS:
                self.waits.popitem(last=False)
        else:
            self.waits.move_to_end(tenant)
        waits.append(seconds)

    # -- idempotency: keep the response of a synchronous request with a key --------------

    @hookimpl
    async def after_request(self, ctx: Any) -> None:
        state = ctx._state
        claim = state.get("jobs") if state else None
        if claim is None:
            return
        capture = ctx.capture
        status = ctx.status
        if (
            capture is not None
            and capture.complete
            and status is not None
            and storable(status)
            and ctx.error is None
            and not ctx.replaced
        ):
            headers = [(n, v) for n, v in ctx.response_headers or () if n.lower() != self._rid]
            claim[1].result = Result(status, headers, capture.body)
            await self._complete(claim)
        else:
            await self._release(claim)

    async def _complete(self, claim: tuple[str, Record]) -> None:
        try:
            await self.keys.complete(claim[0], claim[1], self.settings.idempotency_ttl)
        except Exception as exc:
            self.counts["key_store_errors"] += 1
            logger.warning("idempotency key store failed", error=repr(exc))

    async def _release(self, claim: tuple[str, Record]) -> None:
        try:
            await self.keys.release(claim[0], claim[1].owner)
        except Exception as exc:
            self.counts["key_store_errors"] += 1
            logger.warning("idempotency key store failed", error=repr(exc))

    # -- figures --------------------------------------------------------------------------

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        assert self.store is not None and self.queue is not None
        waits = {}
        for tenant, ws in list(self.waits.items())[-20:]:
            ordered = sorted(ws)
            waits[tenant[:12]] = {
                "p50": round(ordered[len(ordered) // 2], 3),
                "p95": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 3),
                "n": len(ordered),
            }
        return {
            "jobs": self.store.by_state(),
            "queued": len(self.queue),
            "queue_by_tenant": {t[:12]: n for t, n in self.queue.depths().items()},
            "wait_by_tenant": waits,
            "result_bytes": self.store.result_bytes,
            "results_evicted": self.store.evictions,
            **self.counts,
        }
