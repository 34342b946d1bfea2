"""The acceptance check of `./run demo` + `./run load`: the dashboard shows the traffic.

The video service (every plugin on) runs on a real port, the load generator
drives the default mix at it, and headless chromium (the dashboard test's
harness) opens the dashboard meanwhile: its charts draw, no console error, and
a screenshot is left in artifacts/video-service-dashboard.png.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.video_service import external
from examples.video_service.__main__ import with_token
from examples.video_service.app import create_app
from overdrive.contrib.load import VIDEO_SERVICE, LoadResult, run_load
from tests.contrib import test_dashboard as dashboard  # the browser harness
from tests.support.server import serving

TOKEN = "dashboard-under-load-token"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture
def recommender() -> Iterator[str]:
    with serving(external.app, lifespan="off") as url:
        yield url


def test_the_dashboard_charts_the_load(tmp_path: Path, recommender: str) -> None:
    sync_playwright = dashboard._need_browser()
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'videos.db'}",
        "RECOMMENDER_URL": recommender,
        "OVERDRIVE_STATS__TOKEN": TOKEN,
        "OVERDRIVE_STATS__REFRESH_SECONDS": "0.25",
        "OVERDRIVE_ACCESS_LOG__ENABLED": "false",
    }
    results: list[LoadResult] = []
    with serving(create_app(env)) as url, sync_playwright() as p:
        browser: Any = dashboard._launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors = dashboard._watch(page)
            response = page.goto(f"{url}/overdrive/?token={TOKEN}")
            assert response is not None and response.status == 200

            def drive() -> None:
                load = run_load(url, with_token(VIDEO_SERVICE, TOKEN), duration=4.0, concurrency=6)
                results.append(asyncio.run(load))

            load = threading.Thread(target=drive)
            load.start()
            try:
                page.wait_for_function("Number(document.body.dataset.updates) >= 8")
                page.wait_for_timeout(1000)  # a few more polls, still under load
                for chart in ("latency", "throughput", "cache", "breakers", "gpu", "workers"):
                    assert page.evaluate(dashboard.INKED, chart) > 800, chart
                assert "p95" in page.inner_text("#chart-latency .legend")
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "video-service-dashboard.png"), full_page=True)
            finally:
                load.join()
            assert errors == []
        finally:
            browser.close()
    figures = results[0].figures()
    assert figures["requests"] > 0 and figures["errors"] == 0
    assert figures["hit_rate"] is not None and figures["hit_rate"] > 0
