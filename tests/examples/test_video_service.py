"""The reference video service (examples/video_service): what `./run demo` serves.

Every endpoint with every plugin on, and again with every plugin off (the
baseline of `./run load`); the recommender stub behind the breaker; the
background job; the configuration file (every built-in plugin, every key
commented); and the load generator's view of it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from examples.video_service import external
from examples.video_service.__main__ import with_token
from examples.video_service.app import (
    CONFIG_FILE,
    STREAM_BYTES,
    build_config,
    create_app,
    database_url,
    parse_range,
    stream_bytes,
)
from overdrive.contrib.load import VIDEO_SERVICE, run_load
from overdrive.contrib.reference import builtin_plugins
from overdrive.contrib.testing import Harness, serve
from tests.support.server import serving

TOKEN = "video-service-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def recommender() -> Iterator[str]:
    """The stub recommender on a real port (the app reaches it through aiohttp)."""
    saved = dict(external.BEHAVIOUR)
    with serving(external.app, lifespan="off") as url:
        yield url
    external.BEHAVIOUR.clear()
    external.BEHAVIOUR.update(saved)


def env_for(tmp_path: Path, recommender: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'videos.db'}",
        "RECOMMENDER_URL": recommender,
        "OVERDRIVE_STATS__TOKEN": TOKEN,
        "OVERDRIVE_ACCESS_LOG__ENABLED": "false",
        **extra,
    }


@pytest.fixture
async def service(tmp_path: Path, recommender: str) -> AsyncIterator[Harness]:
    async with serve(create_app(env_for(tmp_path, recommender))) as h:
        yield h


@pytest.fixture
async def bare(tmp_path: Path, recommender: str) -> AsyncIterator[Harness]:
    """The same app with every plugin off."""
    async with serve(create_app(env_for(tmp_path, recommender, OVERDRIVE_PLUGINS=""))) as h:
        yield h


def test_the_config_enables_every_builtin_plugin() -> None:
    host_plugins = build_config({})["plugins"]
    assert sorted(host_plugins) == sorted(builtin_plugins())


def test_every_setting_in_the_config_is_commented() -> None:
    """A key line has a comment on it, or its block (no blank line) starts with one."""
    uncommented = []
    block_commented = False
    for number, line in enumerate(CONFIG_FILE.read_text().splitlines(), 1):
        text = line.strip()
        if not text:
            block_commented = False
        elif text.startswith("#"):
            block_commented = True
        elif re.match(r"^[\w\"]+\s*=", text) and "#" not in text and not block_commented:
            uncommented.append(f"{number}: {text}")
    assert uncommented == []


async def test_every_endpoint_with_every_plugin_on(service: Harness) -> None:
    c = service.client
    assert sorted(service.host.plugins) == sorted(builtin_plugins())

    video = await c.get("/api/videos/7")
    assert video.status_code == 200 and video.json()["title"] == "Sample video 7"
    assert (await c.get("/api/videos/7")).headers["x-cache"] == "HIT"  # 10 s route ttl
    assert (await c.get("/api/videos/999999")).status_code == 404
    assert (await c.get("/api/videos/abc")).status_code == 422

    first = await c.get("/api/videos/3/thumbnail")
    again = await c.get("/api/videos/3/thumbnail")
    assert first.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    assert again.content == first.content

    made = await c.post("/api/videos/generate", json={"prompt": "a cat surfing", "frames": 2})
    assert made.status_code == 201, made.text
    body = made.json()
    assert isinstance(body["gpu"], int)  # a (simulated) GPU lease was granted
    assert (await c.post("/api/videos/generate", json={"prompt": ""})).status_code == 422

    stats = (await c.get("/api/system/stats", headers=AUTH)).json()
    for section in ("cache", "gpu", "breaker", "tasks", "pools", "profiler", "models"):
        assert section in stats, section
    assert stats["cache"]  # figures, not an error
    dashboard = await c.get(f"/overdrive/?token={TOKEN}")
    assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()
    assert (await c.get("/metrics")).status_code == 200


async def test_generation_queues_a_job_that_finishes_the_video(service: Harness) -> None:
    made = await service.client.post("/api/videos/generate", json={"prompt": "dawn", "frames": 1})
    video_id = made.json()["id"]
    assert made.json()["status"] == "processing"
    deadline = time.monotonic() + 20
    while True:  # the cache keeps metadata 10 s: ask for it without the cache
        status = (
            await service.client.get(
                f"/api/videos/{video_id}", headers={"cache-control": "no-cache"}
            )
        ).json()["status"]
        if status == "ready" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert status == "ready"


async def test_generation_as_an_async_job_with_an_idempotency_key(service: Harness) -> None:
    headers = {"prefer": "respond-async", "idempotency-key": "dusk-1"}
    body = {"prompt": "dusk", "frames": 1}
    submitted = await service.client.post("/api/videos/generate", json=body, headers=headers)
    assert submitted.status_code == 202
    monitor = submitted.headers["location"]
    retried = await service.client.post("/api/videos/generate", json=body, headers=headers)
    assert retried.headers["location"] == monitor  # the same job: one generation
    states = []
    for _ in range(2000):
        answer = await service.client.get(monitor)
        state = answer.headers["overdrive-job-state"]
        states.append(state)
        if state not in ("queued", "running"):
            break
        await asyncio.sleep(0.01)
    assert answer.status_code == 201, answer.text
    assert answer.json()["digest"] and answer.json()["status"] == "processing"
    stats = await service.host.get_system_stats()
    assert stats["jobs"]["jobs"]["succeeded"] == 1 and stats["jobs"]["replayed"] == 1


async def test_stream_answers_ranges(service: Harness) -> None:
    c = service.client
    part = await c.get("/api/videos/5/stream", headers={"range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{STREAM_BYTES}"
    assert part.content == stream_bytes(5, 100, 199)
    tail = await c.get("/api/videos/5/stream", headers={"range": "bytes=-10"})
    assert tail.status_code == 206 and len(tail.content) == 10
    wrong = await c.get("/api/videos/5/stream", headers={"range": f"bytes={STREAM_BYTES}-"})
    assert wrong.status_code == 416
    assert wrong.headers["content-range"] == f"bytes */{STREAM_BYTES}"
    whole = await c.get("/api/videos/5/stream")
    assert whole.status_code == 200 and len(whole.content) == STREAM_BYTES
    assert whole.content[70_000:70_010] == stream_bytes(5, 70_000, 70_009)


def test_parse_range() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=90-500", 100) == (90, 99)
    assert parse_range("bytes=-5", 100) == (95, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole body
    assert parse_range("items=0-1", 100) is None
    for bad in ("bytes=100-", "bytes=5-2", "bytes=x-", "bytes=-0"):
        with pytest.raises(ValueError):
            parse_range(bad, 100)


async def test_the_breaker_opens_when_the_recommender_fails(service: Harness) -> None:
    c = service.client
    ok = (await c.get("/api/videos/1/recommendations")).json()
    assert ok["source"] == "recommender" and len(ok["items"]) == 5
    external.BEHAVIOUR["fail"] = True
    sources = [(await c.get("/api/videos/1/recommendations")).json()["source"] for _ in range(8)]
    # Failures answer a fallback; after three, the breaker stops calling at all.
    assert all(s.startswith("fallback") for s in sources)
    assert sources[-1] == "fallback (breaker open)"
    calls = external.CALLS["failed"]
    await c.get("/api/videos/1/recommendations")
    assert external.CALLS["failed"] == calls  # refused without a call
    stats = (await c.get("/api/system/stats", headers=AUTH)).json()
    assert stats["breaker"]["op:recommender"]["state"] == "open"


async def test_every_endpoint_with_every_plugin_off(bare: Harness) -> None:
    c = bare.client
    assert bare.host.plugins == {}
    assert (await c.get("/api/videos/7")).json()["id"] == 7
    thumb = await c.get("/api/videos/3/thumbnail")
    assert thumb.status_code == 200 and "x-cache" not in thumb.headers
    made = await c.post("/api/videos/generate", json={"prompt": "no plugins", "frames": 1})
    assert made.status_code == 201 and made.json()["gpu"] is None
    assert (await c.get("/api/videos/1/recommendations")).json()["source"] == "recommender"
    part = await c.get("/api/videos/2/stream", headers={"range": "bytes=0-9"})
    assert part.status_code == 206
    assert "timestamp" in (await c.get("/api/system/stats", headers=AUTH)).json()


async def test_the_load_generator_sees_hits_and_no_errors(service: Harness) -> None:
    transport = httpx.ASGITransport(app=service.app)
    result = await run_load(
        "http://test",
        with_token(VIDEO_SERVICE, TOKEN),
        duration=1.0,
        concurrency=4,
        transport=transport,
    )
    total = result.figures()
    assert total["requests"] > 20
    assert total["errors"] == 0, total
    assert total["hit_rate"] is not None and total["hit_rate"] > 0


def test_database_url_from_the_environment() -> None:
    assert database_url({}).startswith("sqlite+aiosqlite:///")
    pg = database_url({"DATABASE_URL": "postgresql://u@db/app"})
    assert pg == "postgresql+asyncpg://u@db/app"
    assert database_url({"DATABASE_URL": "postgres://u@db/app"}) == pg


def test_redis_url_turns_on_shared_state() -> None:
    config = build_config({"REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert config["redis_url"] == "redis://127.0.0.1:6379/0"
    assert config["breaker"]["shared"] is True
    assert config["ratelimit"]["storage_url"] == "host"
    assert config["gpu"]["redis_url"] == "host"
    assert "redis_url" not in build_config({})


async def test_postgresql_through_database_url(
    postgres_url: str, recommender: str, tmp_path: Path
) -> None:
    env = env_for(tmp_path, recommender, DATABASE_URL=postgres_url)
    async with serve(create_app(env)) as h:
        assert (await h.client.get("/api/videos/9")).json()["title"] == "Sample video 9"
        made = await h.client.post("/api/videos/generate", json={"prompt": "pg", "frames": 1})
        assert made.status_code == 201
        got = await h.client.get(f"/api/videos/{made.json()['id']}")
        assert got.json()["title"] == "pg"


async def test_the_stats_route_is_protected_like_the_dashboard(
    service: Harness, bare: Harness
) -> None:
    """With every plugin on (the stats plugin's `protect`) and with every plugin off (the app)."""
    for h in (service, bare):
        refused = await h.client.get("/api/system/stats")
        assert refused.status_code == 401
        assert "timestamp" not in refused.text
        wrong = await h.client.get("/api/system/stats", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await h.client.get("/api/system/stats", headers=AUTH)).status_code == 200
