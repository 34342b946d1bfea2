"""The trace of one generation request to the reference service, as text (docs/observability.md).

    .venv/bin/python -m examples.video_service.trace_dump

Serves the app in process with every plugin on, the OpenTelemetry SDK
recording into memory, sends ``POST /api/videos/generate`` with a W3C
``traceparent`` as a gateway would, and prints the spans as a tree with
their attributes and events.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from overdrive.contrib.testing import serve

from . import external
from .app import create_app


def tree(spans: list[Any]) -> str:
    by_parent: dict[int | None, list[Any]] = {}
    ids = {s.context.span_id for s in spans}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in sorted(by_parent.get(parent, []), key=lambda s: s.start_time):
            ms = (s.end_time - s.start_time) / 1e6
            pad = "  " * depth
            lines.append(
                f"{pad}{s.name}  [{s.kind.name}, {ms:.1f} ms, {s.status.status_code.name}]"
            )
            for key, value in sorted((s.attributes or {}).items()):
                lines.append(f"{pad}    {key} = {value!r}")
            for e in s.events:
                attrs = ", ".join(f"{k}={v!r}" for k, v in (e.attributes or {}).items())
                offset = (e.timestamp - s.start_time) / 1e6
                lines.append(f"{pad}    @{offset:.1f} ms event {e.name} {attrs}")
            walk(s.context.span_id, depth + 1)

    walk(None, 0)
    trace_ids = sorted({f"{s.context.trace_id:032x}" for s in spans})
    return "\n".join([f"trace {', '.join(trace_ids)}", *lines])


async def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "video-service"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    from tests.support.server import serving

    with serving(external.app, lifespan="off") as recommender:
        env = {
            "DATABASE_URL": f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp()) / 'videos.db'}",
            "RECOMMENDER_URL": recommender,
            "OVERDRIVE_STATS__TOKEN": "trace-dump-token",
            "OVERDRIVE_ACCESS_LOG__ENABLED": "false",
        }
        async with serve(create_app(env)) as h:
            await h.client.get("/api/videos/1/recommendations")  # warm: the model, the pool
            exporter.clear()
            parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            await h.client.post(
                "/api/videos/generate",
                json={"prompt": "a cat surfing at sunset", "frames": 8},
                headers={"traceparent": parent},
            )
            await h.client.get("/api/videos/1/recommendations", headers={"traceparent": parent})
            await asyncio.sleep(0.2)  # the background job
    print(tree(list(exporter.get_finished_spans())))


if __name__ == "__main__":
    asyncio.run(main())
