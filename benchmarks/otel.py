"""Per-request cost of the `otel` plugin beside opentelemetry-instrumentation-asgi, one run.

In process (the ASGI app called directly, as benchmarks/observability.py does),
Starlette, a route with a path parameter, the OpenTelemetry SDK's
TracerProvider with a span processor that exports to nowhere (so the cost is
the spans' own: creation, attributes, events, ending, the processor call):

- the bare app;
- opentelemetry-instrumentation-asgi alone (its OpenTelemetryMiddleware);
- Overdrive with the `otel` plugin alone;
- Overdrive with `otel` beside the ASGI instrumentation (one span: ours attaches);
- Overdrive with no plugin, for the middleware's own share.

    ./run bench otel [--requests 4000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from observability import drive, lifespan, starlette_app  # type: ignore[import-not-found]

from overdrive import Overdrive
from overdrive.middleware import OverdriveMiddleware


def sdk() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Nowhere(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Nowhere()))
    trace.set_tracer_provider(provider)


def ours(plugins: list[str]) -> Callable[[Any], Any]:
    def wrap(app: Any) -> Any:
        from overdrive.plugins.otel import OtelPlugin

        objects = (OtelPlugin(),) if "otel" in plugins else ()
        host = Overdrive({"plugins": plugins}, plugins=objects, env={})
        app.add_middleware(OverdriveMiddleware, host=host)
        return app

    return wrap


def asgi_instrumentation(app: Any) -> Any:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app)


def both(app: Any) -> Any:
    return asgi_instrumentation(ours(["otel"])(app))


async def main(requests: int, repeats: int) -> None:
    sdk()
    variants: list[tuple[str, Callable[[Any], Any] | None]] = [
        ("bare app", None),
        ("overdrive, no plugin", ours([])),
        ("opentelemetry-instrumentation-asgi", asgi_instrumentation),
        ("overdrive otel", ours(["otel"])),
        ("asgi instrumentation + overdrive otel", both),
    ]
    apps = []
    for label, wrap in variants:
        app = starlette_app()
        app = wrap(app) if wrap is not None else app
        await lifespan(app)
        await drive(app, 300)  # warm up
        apps.append((label, app))
    timings: dict[str, list[float]] = {label: [] for label, _ in apps}
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for label, app in apps:
            timings[label].append(await drive(app, requests))
    best = {label: min(ts) for label, ts in timings.items()}
    bare = best["bare app"]
    print("Per-request cost with the OpenTelemetry SDK, spans exported nowhere")
    print(f"({requests} requests, best of {repeats}, Starlette, in process)")
    print(f"{'variant':<40} {'us/req':>8} {'+us':>8} {'x bare':>7}")
    for label, t in best.items():
        print(f"{label:<40} {t * 1e6:8.2f} {(t - bare) * 1e6:+8.2f} {t / bare:7.2f}")
    ours_t = best["overdrive otel"] - bare
    theirs = best["opentelemetry-instrumentation-asgi"] - bare
    print(
        f"\nthe otel plugin adds {ours_t * 1e6:.1f} us a request; the ASGI instrumentation "
        f"{theirs * 1e6:.1f} us (ours is {ours_t / theirs:.2f}x of it)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.repeats))
