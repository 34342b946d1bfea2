"""Declared metric families: the conventions, promtool on the reference service, bounded labels.

promtool (Debian package `prometheus`; ./run test installs it) is the oracle:
locally a missing promtool skips with a message, under CI=true it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from examples.video_service import external
from examples.video_service.app import create_app
from overdrive import Plugin, hookimpl
from overdrive.contrib.prometheus.families import all_families, render_table
from overdrive.contrib.testing import serve
from overdrive.metrics import MetricFamily, check_family
from tests.support.server import serving

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "metric-families-token"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (Debian package 'prometheus'; ./run test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: a missing oracle is a failure)")
        pytest.skip(message)
    return found


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_declared_family_follows_the_conventions() -> None:
    problems = [p for _, family in all_families() for p in check_family(family)]
    assert problems == []
    names = [family.name for _, family in all_families()]
    assert len(names) == len(set(names)), "two plugins declare the same family"


@pytest.mark.parametrize(
    ("family", "complaint"),
    [
        (MetricFamily("cache_hit_rate", "gauge", "x"), "_rate"),
        (MetricFamily("http_requests_per_second", "gauge", "x"), "_per_second"),
        (MetricFamily("calls_total", "counter", "x"), "_total"),
        (MetricFamily("latency_ms", "gauge", "x"), "_ms"),
        (MetricFamily("wait", "gauge", "x", unit="seconds"), "_seconds"),
        (MetricFamily("pools_pool_pool_size", "gauge", "x"), "stutters"),
        (MetricFamily("last_change_timestamp", "gauge", "x"), "_timestamp_seconds"),
        (MetricFamily("size", "gauge", "x", labels=("le",)), "reserved"),
    ],
)
def test_the_convention_check_catches_what_the_issue_names(
    family: MetricFamily, complaint: str
) -> None:
    assert any(complaint in p for p in check_family(family))


def test_the_docs_table_is_generated_from_the_declarations() -> None:
    page = (ROOT / "docs/observability.md").read_text(encoding="utf-8")
    found = re.search(
        r"<!-- metric-families:start -->\n(.*?)<!-- metric-families:end -->", page, re.S
    )
    assert found is not None
    assert found.group(1) == render_table(), (
        "docs/observability.md's metric table is out of date: replace it with "
        "overdrive.contrib.prometheus.families.render_table()"
    )


class Uploads(Plugin):
    """The example of docs/observability.md."""

    name = "uploads"
    metric_families = (
        MetricFamily("uploads_received", "counter", "Uploads received", "received"),
        MetricFamily(
            "uploads_stored_bytes",
            "gauge",
            "Bytes stored, per bucket",
            "buckets.*.stored_mb",
            unit="bytes",
            labels=("bucket",),
            scale=2**20,
        ),
    )

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        return {"received": 12, "buckets": {"raw": {"stored_mb": 3.5}}, "hit_rate": 0.5}


async def hello(request: Any) -> PlainTextResponse:
    return PlainTextResponse("hi", status_code=int(request.query_params.get("status", 200)))


async def test_a_plugins_declaration_is_what_it_exports() -> None:
    app = Starlette(routes=[Route("/hello", hello)])
    async with serve(app, plugins=[Uploads()], config={"plugins": ["prometheus"]}) as h:
        text = (await h.client.get("/metrics")).text
    assert "overdrive_uploads_received_total 12.0" in text
    assert 'overdrive_uploads_stored_bytes{bucket="raw"} 3670016.0' in text
    assert "hit_rate" not in text  # not declared: not exported
    config = {"plugins": ["prometheus"], "prometheus": {"undeclared": True}}

    class Legacy:
        name = "legacy"

        @hookimpl
        def collect_stats(self, host: Any) -> dict[str, Any]:
            return {"hits": 3}

    async with serve(app, plugins=[Legacy()], config=config) as h:
        text = (await h.client.get("/metrics")).text
    assert "overdrive_legacy_hits_total 3.0" in text


async def test_mount_path_parameters_never_become_label_values() -> None:
    inner = Starlette(routes=[Route("/items/{item_id}", hello)])
    app = Starlette(routes=[Mount("/t/{tenant}", app=inner)])
    async with serve(app, config={"plugins": ["profiler", "prometheus"]}) as h:
        for tenant in ("acme", "globex", "initech", "items"):
            assert (await h.client.get(f"/t/{tenant}/items/7")).status_code == 200
        fams = _families((await h.client.get("/metrics")).text)
    routes = {
        s.labels["route"]
        for s in fams["overdrive_http_requests"].samples
        if s.name == "overdrive_http_requests_total"
    }
    assert routes == {"/t/{tenant}/items/{item_id}"}


async def test_exact_status_codes_on_request() -> None:
    app = Starlette(routes=[Route("/hello", hello)])
    for option, expected in (("class", {"2xx", "4xx"}), ("exact", {"200", "404", "418"})):
        config = {"plugins": ["profiler", "prometheus"], "profiler": {"status_codes": option}}
        async with serve(app, config=config) as h:
            for status in (200, 404, 418):
                await h.client.get(f"/hello?status={status}")
            fams = _families((await h.client.get("/metrics")).text)
        statuses = {
            s.labels["status"]
            for s in fams["overdrive_http_requests"].samples
            if s.labels.get("route") == "/hello"
        }
        assert statuses == expected, option


@pytest.fixture
def recommender() -> Iterator[str]:
    saved = dict(external.BEHAVIOUR)
    with serving(external.app, lifespan="off") as url:
        yield url
    external.BEHAVIOUR.clear()
    external.BEHAVIOUR.update(saved)


async def test_promtool_passes_on_the_reference_service_with_every_plugin(
    tmp_path: Path, recommender: str
) -> None:
    tool = promtool()
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'videos.db'}",
        "RECOMMENDER_URL": recommender,
        "OVERDRIVE_STATS__TOKEN": TOKEN,
        "OVERDRIVE_ACCESS_LOG__ENABLED": "false",
    }
    async with serve(create_app(env)) as h:
        plugins = set(h.host.plugins)
        for i in (1, 2, 3):
            await h.client.get(f"/api/videos/{i}")
            await h.client.get(f"/api/videos/{i}/thumbnail")
            await h.client.get(f"/api/videos/{i}/recommendations")
        await h.client.get("/api/videos/1/stream", headers={"range": "bytes=0-99"})
        generated = await h.client.post("/api/videos/generate", json={"prompt": "a cat"})
        assert generated.status_code in (200, 201, 202)
        await h.client.get("/health")
        text_response = await h.client.get("/metrics")
        om_response = await h.client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
    text = text_response.text
    checked = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stderr
    # Every plugin of the reference service that declares families shows in the scrape.
    exported = set(_families(text))
    for owner, family in all_families():
        plain = family.source is not None and not set("*(.") & set(family.source)
        if owner in plugins and plain:  # a top-level figure: always in the stats
            assert f"overdrive_{family.name}" in exported, (owner, family.name)
    # The OpenMetrics exposition parses (prometheus_client's strict parser) and has units.
    assert om_response.headers["content-type"].startswith("application/openmetrics-text")
    om = {f.name: f for f in om_families(om_response.text)}
    assert om["overdrive_http_request_duration_seconds"].unit == "seconds"
