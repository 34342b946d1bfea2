"""The status monitor's answers: JSON status, the stored result, server-sent events.

``GET {prefix}{id}`` answers the job's status as JSON while it is queued or
running (with ``Retry-After``), and once it succeeded the original response
inline: status, headers and body exactly as the synchronous call returned them
(the middleware adds its own request id). Inline, not a link: the result is
already in memory and bounded by ``max_result_bytes``, and one round trip fewer
is what a polling client wants. Large files are not results: the endpoint writes
the file and returns its URL (docs/plugins/jobs.md). Every monitor answer carries
``Overdrive-Job-State`` so a client can tell a status from a result.
"""

from __future__ import annotations

import json
from typing import Any

import anyio

from .http import json_response
from .store import Job, Result

__all__ = ["EventStream", "ResultResponse", "state_header"]

_NO_STORE = (b"cache-control", b"no-store")


def state_header(job: Job) -> tuple[bytes, bytes]:
    return (b"overdrive-job-state", job.state.encode())


class ResultResponse:
    """Send a stored `Result` as it was produced, plus `extra` headers."""

    __slots__ = ("extra", "result")

    def __init__(self, result: Result, extra: list[tuple[bytes, bytes]]) -> None:
        self.result = result
        self.extra = extra

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        r = self.result
        headers = [*r.headers, *self.extra]
        await send({"type": "http.response.start", "status": r.status, "headers": headers})
        await send({"type": "http.response.body", "body": r.body})


def status_response(job: Job, position: int | None, prefix: str, retry_after: float) -> Any:
    """The monitor's JSON answer for `job` (not its result)."""
    data = job.status(position, prefix)
    headers = [state_header(job), _NO_STORE]
    if job.state in ("queued", "running"):
        return json_response(200, data, headers, retry_after=retry_after)
    if job.state == "cancelled":
        return json_response(200, data, headers)
    if job.too_large:
        data["hint"] = "the response was larger than jobs.max_result_bytes: return a URL instead"
        return json_response(507, data, headers)
    if job.evicted:
        data["hint"] = "the result was dropped to stay within jobs.result_budget_bytes"
        return json_response(410, data, headers)
    return json_response(500 if job.state == "failed" else 200, data, headers)


class EventStream:
    """``Accept: text/event-stream``: one ``status`` event per change until the job ends.

    A comment line every `heartbeat` seconds keeps proxies from closing an idle
    stream; a client that disconnects ends the stream at once (nothing is left
    waiting on the job).
    """

    heartbeat = 15.0

    def __init__(self, job: Job, position: Any, prefix: str) -> None:
        self.job = job
        self.position = position  # callable: job -> position in queue or None
        self.prefix = prefix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        job = self.job
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            _NO_STORE,
            (b"x-accel-buffering", b"no"),
            state_header(job),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            while True:
                seen = job.version
                data = json.dumps(job.status(self.position(job), self.prefix))
                event = f"id: {seen}\nevent: status\ndata: {data}\n\n".encode()
                await send({"type": "http.response.body", "body": event, "more_body": True})
                if job.done:
                    break
                while job.version == seen:
                    with anyio.move_on_after(self.heartbeat):
                        await job.wait_change(seen)
                    if job.version == seen:
                        await send(
                            {"type": "http.response.body", "body": b": .\n\n", "more_body": True}
                        )
            await send({"type": "http.response.body", "body": b""})
            tg.cancel_scope.cancel()
