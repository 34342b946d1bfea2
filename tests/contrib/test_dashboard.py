"""The live dashboard in a real headless browser (Debian's chromium, driven by Playwright).

A uvicorn server on a loopback port serves an app with the `profiler` and
`stats` plugins and stand-ins for the other plugins' stats sections. The page
must load with no console error, draw its charts once there is traffic, show
"not enabled" where a section is missing, and leave a screenshot in artifacts/.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive import hookimpl
from overdrive.contrib.testing import make_host
from overdrive.middleware import OverdriveMiddleware

TOKEN = "dashboard-test-token"
CHROMIUM = os.environ.get("OVERDRIVE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHART_IDS = ("latency", "throughput", "errors", "cache", "breakers", "gpu", "workers", "memory")


def _need_browser() -> Any:
    missing = None
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        missing = f"chromium is not installed ({CHROMIUM})"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} (CI=true: ./run test installs it)")
        pytest.skip(missing)
    return sync_playwright


class Section:
    """A stand-in plugin reporting one stats section, figures changing with time."""

    def __init__(self, name: str, figures: Callable[[float], dict[str, Any]]) -> None:
        self.name = name
        self.figures = figures

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        return self.figures(time.time())


class Broken:
    name = "broken"

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        raise RuntimeError("stats exploded")


def _sections() -> list[Any]:
    return [
        Section("cache", lambda t: {"hit_rate": 0.5 + (t % 10) / 40, "hits": 10, "misses": 5}),
        Section(
            "breaker",
            lambda t: {  # the breaker plugin's shape: one table per breaker
                "payments": {"name": "payments", "state": "open", "failure_count": 5},
                "render": {"name": "render", "state": "closed", "failure_count": 0},
            },
        ),
        Section(
            "gpu",
            lambda t: {  # the gpu plugin's shape: a figure per device in lists
                "devices": 2,
                "budgets_mb": [8000.0, 8000.0],
                "reserved_mb": [4000 + (t % 5) * 100, 1500.0],
            },
        ),
        Section("tasks", lambda t: {"current_workers": 3, "queue_depth": int(t) % 4}),
        Section("memory", lambda t: {"rss_mb": 300.0, "percent": 40.0}),
        Broken(),
    ]


async def video(request):  # type: ignore[no-untyped-def]
    await asyncio.sleep(0.002)
    return PlainTextResponse("v")


@contextmanager
def running(
    plugins: list[Any], names: list[str], config: dict[str, Any] | None = None
) -> Iterator[str]:
    import uvicorn

    host = make_host(
        *plugins,
        config=config
        or {
            "plugins": ["profiler", "stats", *names],
            "stats": {"token": TOKEN, "refresh_seconds": 0.25},
        },
    )
    app = OverdriveMiddleware(Starlette(routes=[Route("/videos/{video_id}", video)]), host=host)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _launch(p: Any) -> Any:
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )


def _watch(page: Any) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


INKED = """(id) => {
  const c = document.querySelector('#chart-' + id + ' canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
  return n;
}"""


def test_dashboard_charts_every_section_after_traffic() -> None:
    sync_playwright = _need_browser()
    names = ["cache", "breaker", "gpu", "tasks", "memory", "broken"]
    with running(_sections(), names) as url, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors = _watch(page)
            response = page.goto(f"{url}/overdrive/?token={TOKEN}")
            assert response is not None and response.status == 200
            with httpx.Client(base_url=url) as client:
                for round_ in range(4):
                    for i in range(25):
                        client.get(f"/videos/{round_ * 25 + i}")
                    page.wait_for_timeout(300)
            page.wait_for_function("Number(document.body.dataset.updates) >= 6")
            page.wait_for_timeout(600)  # a few polls after the last request
            assert "token=" not in page.url  # dropped from the address bar
            for chart in CHART_IDS:
                legend = page.inner_text(f"#chart-{chart} .legend")
                assert legend.strip(), f"{chart}: no legend, the chart did not draw"
                # Far more ink than the "not enabled" caption alone.
                assert page.evaluate(INKED, chart) > 800, chart
            assert "p95" in page.inner_text("#chart-latency .legend")
            assert "gpu 1 budget" in page.inner_text("#chart-gpu .legend")
            assert "payments: open" in page.inner_text("#breakers")
            assert "/videos/{video_id}" in page.inner_text("#routes")
            # The failing plugin is shown (as failed, then quarantined by the host).
            assert "broken" in page.inner_text("#summary")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()


def test_dashboard_tolerates_missing_sections() -> None:
    sync_playwright = _need_browser()
    with running([], []) as url, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page()
            errors = _watch(page)
            page.goto(f"{url}/overdrive/?token={TOKEN}")
            with httpx.Client(base_url=url) as client:
                for i in range(10):
                    client.get(f"/videos/{i}")
            page.wait_for_function("Number(document.body.dataset.updates) >= 3")
            assert page.inner_text("#chart-latency .legend").strip()
            for chart in ("cache", "breakers", "gpu", "workers"):
                assert page.inner_text(f"#chart-{chart} .legend") == ""
                assert page.evaluate(INKED, chart) < 800  # only the "not enabled" caption
            assert "not enabled" in page.inner_text("#breakers")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-minimal.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()


async def test_the_seeds_dashboard_shape() -> None:
    import overdrive.contrib.dashboard as dashboard

    assert dashboard.__all__ == sorted(dashboard.__all__)
    host = make_host(*_sections(), config={"plugins": ["profiler", "cache", "breaker", "tasks"]})
    host.profiler.record("video_processing", 1.5)
    board = await dashboard.generate_performance_dashboard(host)
    assert set(board) == {
        "timestamp",
        "system_health",
        "performance_metrics",
        "circuit_breakers",
        "profiles",
    }
    assert board["system_health"]["cpu_usage"] >= 0
    assert 0.5 <= board["performance_metrics"]["cache_hit_rate"] <= 1
    assert board["performance_metrics"]["active_workers"] == 3
    assert board["circuit_breakers"]["payments"]["state"] == "open"
    assert board["profiles"]["video_processing"]["count"] == 1
    other_shape = {"breaker": {"breakers": {"api": {"state": "half_open"}}}}
    assert dashboard.performance_dashboard(other_shape)["circuit_breakers"] == {
        "api": {"state": "half_open"}
    }
    empty = dashboard.performance_dashboard({})
    assert empty["performance_metrics"] == {
        "cache_hit_rate": 0,
        "avg_response_time": 0,
        "active_workers": 0,
    }


def test_dashboard_with_every_builtin_plugin() -> None:
    """The real plugins' stats shapes (breaker, gpu, tasks, memory...), not stand-ins."""
    from overdrive.contrib.demo import demo_config

    sync_playwright = _need_browser()
    config = demo_config()
    config["stats"] = {"token": TOKEN, "refresh_seconds": 0.25}
    with running([], [], config) as url, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors = _watch(page)
            page.goto(f"{url}/overdrive/?token={TOKEN}")
            with httpx.Client(base_url=url) as client:
                for i in range(20):
                    client.get(f"/videos/{i}")
            page.wait_for_function("Number(document.body.dataset.updates) >= 4")
            for chart in ("latency", "throughput", "memory"):
                assert page.evaluate(INKED, chart) > 800, chart
            if "tasks" in config["plugins"]:
                assert "workers" in page.inner_text("#chart-workers .legend")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-builtins.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
