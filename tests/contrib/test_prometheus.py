"""`overdrive.contrib.prometheus`: every plugin's figures as Prometheus metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import overdrive.contrib.prometheus as prometheus_module
from overdrive import hookimpl
from overdrive.contrib.prometheus import PrometheusPlugin, flatten_stats, make_asgi_app
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.metrics import MetricFamily


async def video(request):  # type: ignore[no-untyped-def]
    return PlainTextResponse("v" * 10)


APP = Starlette(routes=[Route("/videos/{video_id}", video)])


class Figures:
    """Stands in for other plugins' collect_stats shapes (cache, breaker, gpu, tasks)."""

    name = "figures"
    metric_families = (
        MetricFamily(
            "figures_lookups", "counter", "Lookups", "(hits=hit|misses=miss)", labels=("result",)
        ),
        MetricFamily("figures_size_bytes", "gauge", "Size", "size_mb", unit="bytes", scale=2**20),
        MetricFamily(
            "figures_breaker_state",
            "gauge",
            "State",
            "breakers.*.state",
            labels=("breaker", "state"),
            states=("closed", "open", "half_open"),
        ),
        MetricFamily(
            "figures_device_used_bytes",
            "gauge",
            "Used",
            "devices.*.memory_used_mb",
            unit="bytes",
            labels=("device",),
            scale=2**20,
        ),
    )

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        return {
            "hits": 7,
            "misses": 3,
            "hit_rate": 0.7,
            "size_mb": 2.0,
            "latency_ms": 250.0,
            "breakers": {"payments": {"state": "open", "failure_count": 5}},
            "devices": [{"index": 0, "memory_used_mb": 1.0, "utilization_percent": 50.0}],
        }


class Broken:
    name = "broken"

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        raise RuntimeError("stats exploded")


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample_name} {labels}")


def test_public_names_are_pinned() -> None:
    assert prometheus_module.__all__ == sorted(prometheus_module.__all__)
    assert prometheus_module.__all__ == [
        "DEFAULT_BUCKETS",
        "PrometheusExporter",
        "PrometheusPlugin",
        "flatten_stats",
        "make_asgi_app",
    ]


def test_plugin_meets_the_hook_contract() -> None:
    check_plugin(PrometheusPlugin)


async def test_metrics_endpoint_has_request_and_plugin_figures() -> None:
    async with serve(
        APP,
        plugins=[Figures(), Broken()],
        config={"plugins": ["profiler", "prometheus", "figures", "broken"]},
    ) as h:
        for i in range(3):
            await h.client.get(f"/videos/{i}")
        await h.client.get("/nope/1")
        r = await h.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
    fams = _families(r.text)
    route = {"route": "/videos/{video_id}", "method": "GET", "status": "2xx"}
    assert _value(fams, "overdrive_http_requests_total", **route) == 3
    assert _value(fams, "overdrive_http_request_duration_seconds_count", **route) == 3
    assert _value(fams, "overdrive_http_request_duration_seconds_bucket", le="+Inf", **route) == 3
    assert _value(fams, "overdrive_http_request_duration_seconds_bucket", le="3600.0", **route) == 3
    assert _value(fams, "overdrive_http_response_size_bytes_total", **route) == 30
    assert _value(fams, "overdrive_http_request_phase_seconds_total", phase="app", **route) > 0
    assert _value(fams, "overdrive_http_requests_total", route="<unmatched>") == 1
    assert fams["overdrive_http_requests_in_flight"].type == "gauge"
    # Other plugins' figures: what they declare, and nothing else.
    assert fams["overdrive_figures_lookups"].type == "counter"
    assert _value(fams, "overdrive_figures_lookups_total", result="hit") == 7
    assert _value(fams, "overdrive_figures_lookups_total", result="miss") == 3
    assert _value(fams, "overdrive_figures_size_bytes") == 2 * 2**20
    assert _value(fams, "overdrive_figures_breaker_state", breaker="payments", state="open") == 1
    assert _value(fams, "overdrive_figures_breaker_state", breaker="payments", state="closed") == 0
    assert _value(fams, "overdrive_figures_device_used_bytes", device="0") == 2**20
    assert not any("hit_rate" in name or "latency" in name for name in fams)  # undeclared
    assert _value(fams, "overdrive_system_process_resident_memory_bytes") > 0
    # A plugin whose collect_stats raised is shown, and the others still appear.
    assert _value(fams, "overdrive_plugin_stats_failed", plugin="broken") == 1


async def test_make_asgi_app_mounts_at_metrics() -> None:
    host = make_host(config={"plugins": ["profiler"]})
    app = Starlette(
        routes=[Route("/videos/{video_id}", video), Mount("/metrics", app=make_asgi_app(host))]
    )
    async with serve(app, host=host) as h:
        await h.client.get("/videos/1")
        r = await h.client.get("/metrics/")
    fams = _families(r.text)
    assert _value(fams, "overdrive_http_requests_total", route="/videos/{video_id}") == 1


async def test_profiled_operations_become_a_histogram() -> None:
    async with serve(APP, config={"plugins": ["profiler", "prometheus"]}) as h:
        h.host.profiler.record("video_generation", 2.0, error=True)
        r = await h.client.get("/metrics")
    fams = _families(r.text)
    op = {"operation": "video_generation"}
    assert _value(fams, "overdrive_operation_duration_seconds_count", **op) == 1
    assert _value(fams, "overdrive_operation_duration_seconds_bucket", le="1.0", **op) == 0
    assert _value(fams, "overdrive_operation_duration_seconds_bucket", le="2.5", **op) == 1
    assert _value(fams, "overdrive_operation_errors_total", **op) == 1


def test_flatten_stats_conventions() -> None:
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s
        for s in flatten_stats(
            {
                "timestamp": 1.0,
                "profiler": {"requests": 1},  # exported natively, not flattened
                "gpu": {"devices": {"0": {"memory_used_mb": 3.0}}},
                "tasks": {"current_workers": 4, "queue_depth": 2, "busy": True, "label": "x"},
            }
        )
    }
    gpu = samples[("overdrive_gpu_device_memory_used_bytes", (("device", "0"),))]
    assert gpu.value == 3 * 2**20 and gpu.mode == "livemostrecent"
    assert samples[("overdrive_tasks_current_workers", ())].value == 4
    assert samples[("overdrive_tasks_busy", ())].value == 1.0
    assert not any(name.startswith("overdrive_profiler") for name, _ in samples)
    # The breaker plugin's shape: {name: {figures}} at the section's top.
    breaker = {
        (s.name, tuple(sorted(s.labels.items()))): s
        for s in flatten_stats(
            {"breaker": {"payments": {"name": "payments", "state": "open", "trips": 2}}}
        )
    }
    state = (("breaker", "payments"), ("state", "open"))
    assert breaker[("overdrive_breaker_state", state)].value == 1
    assert breaker[("overdrive_breaker_trips", (("breaker", "payments"),))].kind == "counter"
    # A long list of numbers is a history, not a figure per device: left out.
    assert flatten_stats({"tasks": {"history": list(range(100))}}) == []
    # The gpu plugin's shape: a figure per device in a list; counters by reason.
    gpu_samples = {
        (s.name, tuple(sorted(s.labels.items()))): s
        for s in flatten_stats(
            {
                "gpu": {
                    "reserved_mb": [1.0, 2.0],
                    "rejected": {"timeout": 3},
                    "admitted": 9,
                    "wait_max_s": 0.5,
                    "release_errors": 1,
                }
            }
        )
    }
    assert gpu_samples[("overdrive_gpu_reserved_bytes", (("device", "1"),))].value == 2 * 2**20
    rejected = gpu_samples[("overdrive_gpu_rejected", (("reason", "timeout"),))]
    assert rejected.kind == "counter" and rejected.value == 3
    assert gpu_samples[("overdrive_gpu_admitted", ())].kind == "counter"
    assert gpu_samples[("overdrive_gpu_wait_max_seconds", ())].value == 0.5
    assert gpu_samples[("overdrive_gpu_release_errors", ())].kind == "counter"
    assert not any("label" in name for name, _ in samples)


WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from overdrive import hookimpl
    from overdrive.contrib.testing import serve

    async def video(request):
        return PlainTextResponse("v")

    from overdrive.metrics import MetricFamily

    class Gpu:
        name = "gpu"
        metric_families = (
            MetricFamily(
                "gpu_device_used_bytes", "gauge", "Used", "devices.*.memory_used_mb",
                unit="bytes", labels=("device",), scale=2**20,
                multiprocess_mode="livemostrecent",
            ),
        )

        @hookimpl
        def collect_stats(self, host):
            return {"devices": [{"index": 0, "memory_used_mb": 5.0}]}

    async def main(n):
        app = Starlette(routes=[Route("/videos/{video_id}", video)])
        config = {"plugins": ["profiler", "prometheus", "gpu"]}
        async with serve(app, plugins=[Gpu()], config=config) as h:
            assert h.host.prometheus.multiprocess
            for i in range(n):
                await h.client.get(f"/videos/{i}")
            if n == 0:  # the scraping worker
                print(json.dumps((await h.client.get("/metrics")).text))

    asyncio.run(main(int(sys.argv[1])))
    """
)


def test_multiprocess_mode_sums_workers(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    for n in (3, 4):  # two workers serve, then exit (their shutdown flushes)
        subprocess.run([sys.executable, str(script), str(n)], env=env, check=True, timeout=60)
    out = subprocess.run(
        [sys.executable, str(script), "0"], env=env, check=True, timeout=60, capture_output=True
    )
    fams = _families(json.loads(out.stdout))
    route = {"route": "/videos/{video_id}", "method": "GET", "status": "2xx"}
    assert _value(fams, "overdrive_http_requests_total", **route) == 7
    assert _value(fams, "overdrive_http_request_duration_seconds_count", **route) == 7
    assert _value(fams, "overdrive_http_request_duration_seconds_bucket", le="+Inf", **route) == 7
    assert _value(fams, "overdrive_gpu_device_used_bytes", device="0") == 5 * 2**20


@pytest.mark.parametrize("bad", [{"flush_seconds": 0}, {"path": "metrics"}, {"buckets": [-1]}])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    from overdrive import ConfigError

    with pytest.raises(ConfigError, match="prometheus"):
        make_host(config={"plugins": ["prometheus"], "prometheus": bad})


async def test_the_apps_own_metrics_are_exposed_too() -> None:
    from prometheus_client import REGISTRY, Counter

    mine = Counter("test_app_videos_rendered", "the app's own metric")
    try:
        mine.inc(2)
        async with serve(APP, config={"plugins": ["profiler", "prometheus"]}) as h:
            text = (await h.client.get("/metrics")).text
        assert _value(_families(text), "test_app_videos_rendered_total") == 2
        config = {"plugins": ["prometheus"], "prometheus": {"include_default_registry": False}}
        async with serve(APP, config=config) as h:
            text = (await h.client.get("/metrics")).text
        assert "test_app_videos_rendered" not in text
    finally:
        REGISTRY.unregister(mine)


async def test_openmetrics_when_asked() -> None:
    async with serve(APP, config={"plugins": ["profiler", "prometheus"]}) as h:
        await h.client.get("/videos/1")
        r = await h.client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


async def test_every_builtin_plugins_figures_are_valid_metrics() -> None:
    """The demo app runs every built-in plugin on its defaults; its scrape must parse."""
    from overdrive.contrib.demo import BUILTIN
    from overdrive.contrib.demo import app as demo_app

    async with serve(demo_app) as h:
        for path in ("/hello", "/thumbnails/1", "/thumbnails/1", "/flaky", "/flaky"):
            await h.client.get(path)
        text = (await h.client.get("/metrics")).text
    fams = _families(text)  # raises on anything malformed
    # The demo app is one module-level object: other tests may have used it too.
    assert _value(fams, "overdrive_http_requests_total", route="/hello") >= 1
    for plugin in ("breaker", "gpu", "memory", "tasks"):
        if plugin in BUILTIN:
            assert any(name.startswith(f"overdrive_{plugin}_") for name in fams), plugin
