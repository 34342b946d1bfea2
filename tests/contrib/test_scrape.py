"""The `/metrics` endpoint is safe and cheap: methods, token, rate, cache, a port of its own.

Also: the directly written text exposition says what prometheus_client's own
encoder says (the same samples and values), and a scrape works under trio.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import httpx
import pytest
import sniffio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from overdrive import ConfigError
from overdrive.contrib.testing import make_host, serve

TOKEN = "scrape-token-123"


async def video(request: Any) -> PlainTextResponse:
    return PlainTextResponse("v")


APP = Starlette(routes=[Route("/videos/{video_id}", video)])


def config(**prometheus: Any) -> dict[str, Any]:
    return {"plugins": ["profiler", "prometheus"], "prometheus": prometheus}


def samples(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {
        (s.name, tuple(sorted(s.labels.items())), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_only_get_and_head() -> None:
    async with serve(APP, config=config()) as h:
        await h.client.get("/videos/1")
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            r = await h.client.request(method, "/metrics")
            assert r.status_code == 405, method
            assert r.headers["allow"] == "GET, HEAD"
        head = await h.client.head("/metrics")
        get = await h.client.get("/metrics")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0
    assert get.status_code == 200 and b"overdrive_http_requests_total" in get.content


async def test_a_token_when_configured() -> None:
    async with serve(APP, config=config(token=TOKEN)) as h:
        assert (await h.client.get("/metrics")).status_code == 401
        wrong = await h.client.get("/metrics", headers={"authorization": "Bearer wrong-token"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
        assert b"overdrive_" not in wrong.content
        right = await h.client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200 and b"overdrive_http" in right.content


async def test_scrapes_have_a_rate_limit_of_their_own() -> None:
    settings = config(max_scrapes_per_second=0.01, scrape_burst=2, cache_seconds=0)
    async with serve(APP, config=settings) as h:
        first = [(await h.client.get("/metrics")).status_code for _ in range(2)]
        third = await h.client.get("/metrics")
        exporter = h.host.get_plugin("prometheus").exporter
        renders = exporter.cache.renders
        # Other requests are not limited by it.
        assert (await h.client.get("/videos/1")).status_code == 200
    assert first == [200, 200]
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert renders == 2  # the refused scrape rendered nothing


async def test_a_scrape_is_served_from_the_cache_and_concurrent_ones_share_a_render() -> None:
    async with serve(APP, config=config(cache_seconds=60)) as h:
        exporter = h.host.get_plugin("prometheus").exporter
        await h.client.get("/videos/1")
        one = (await h.client.get("/metrics")).text
        await h.client.get("/videos/2")  # not in the cached body yet
        two = (await h.client.get("/metrics")).text
        assert one == two and exporter.cache.renders == 1
        exporter.cache.clear()
        bodies = await asyncio.gather(*(exporter.render() for _ in range(8)))
        assert exporter.cache.renders == 2  # eight concurrent scrapes, one render
        assert len({body for body, _ in bodies}) == 1
    async with serve(APP, config=config(cache_seconds=0)) as h:
        exporter = h.host.get_plugin("prometheus").exporter
        await h.client.get("/metrics")
        await h.client.get("/metrics")
        assert exporter.cache.renders == 2


async def test_the_text_is_what_prometheus_clients_encoder_writes() -> None:
    """The direct writer against prometheus_client's generate_latest of the same collector."""
    async with serve(APP, config=config(include_default_registry=False, cache_seconds=0)) as h:
        for i in range(5):
            await h.client.get(f"/videos/{i}")
        await h.client.get("/nope")
        h.host.profiler.record('op "quoted"\nline', 0.2)  # escaping in label values
        exporter = h.host.get_plugin("prometheus").exporter
        await exporter.refresh()
        ours = exporter._text().decode()
        theirs = generate_latest(exporter.registry).decode()
    assert samples(ours) == samples(theirs)
    type_lines = sorted(line for line in ours.splitlines() if line.startswith("# TYPE"))
    assert type_lines == sorted(line for line in theirs.splitlines() if line.startswith("# TYPE"))


async def test_a_port_of_its_own() -> None:
    settings = config(port=0, token=TOKEN)
    async with serve(APP, config=settings) as h:
        await h.client.get("/videos/1")
        # The app's port does not serve the scrape (the app answers 404).
        assert (await h.client.get("/metrics")).status_code == 404
        port = h.host.get_plugin("prometheus").server.port
        auth = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            refused = await c.get("/metrics")
            scraped = await c.get("/metrics", headers=auth)
            posted = await c.post("/metrics", headers=auth)
    assert refused.status_code == 401
    assert posted.status_code == 405
    assert scraped.status_code == 200
    assert 'overdrive_http_requests_total{method="GET",route="/videos/{video_id}"' in scraped.text


@pytest.mark.parametrize(
    "bad",
    [{"cache_seconds": -1}, {"token": "short"}, {"max_scrapes_per_second": 0}, {"port": 70000}],
)
def test_bad_scrape_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="prometheus"):
        make_host(config={"plugins": ["prometheus"], "prometheus": bad})


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_scrape_renders_off_the_loop_under_any_event_loop(backend: str) -> None:
    async def scenario() -> None:
        assert sniffio.current_async_library() == backend
        async with serve(APP, config=config()) as h:
            await h.client.get("/videos/1")
            r = await h.client.get("/metrics")
            assert r.status_code == 200 and b"overdrive_http_requests_total" in r.content
            faults = {n: i.last_error for n, i in h.host.plugins.items() if i.errors}
            assert faults == {}

    anyio.run(scenario, backend=backend)
