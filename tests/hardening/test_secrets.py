"""Secrets never leave: not through the stats, the metrics, the CLI, or a plugin's error log.

The reference service is configured with a database password in the URL's
query, a recommender base URL with user:password, and a stats token; none of
them may appear in anything it serves. An isolated plugin error is logged
with a plain traceback, never with the frames' local variables.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from examples.video_service import external
from examples.video_service.app import create_app
from overdrive import Plugin, hookimpl
from overdrive.contrib.testing import serve
from overdrive.plugins.pools import ConnectionPoolManager
from tests.support.server import serving

TOKEN = "video-service-secrets-token"
DB_PASSWORD = "hunter2-s3cret"
HTTP_PASSWORD = "rec0mmender-Pw"


@pytest.fixture
def recommender() -> Iterator[str]:
    saved = dict(external.BEHAVIOUR)
    with serving(external.app, lifespan="off") as url:
        yield url
    external.BEHAVIOUR.clear()
    external.BEHAVIOUR.update(saved)


async def test_the_reference_service_serves_no_password(
    tmp_path: Path, recommender: str, postgres_url: str
) -> None:
    plain = postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    env = {
        "DATABASE_URL": f"{plain}?password={DB_PASSWORD}",
        "RECOMMENDER_URL": recommender.replace("http://", f"http://svc:{HTTP_PASSWORD}@", 1),
        "OVERDRIVE_STATS__TOKEN": TOKEN,
        "OVERDRIVE_ACCESS_LOG__ENABLED": "false",
    }
    async with serve(create_app(env)) as h:
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert (await h.client.get("/api/videos/1")).status_code == 200
        answers = [
            await h.client.get("/api/system/stats", headers=auth),
            await h.client.get("/overdrive/stats", headers=auth),
            await h.client.get("/metrics"),
        ]
        for response in answers:
            assert response.status_code == 200, response.request.url
            for secret in (DB_PASSWORD, HTTP_PASSWORD, TOKEN):
                assert secret not in response.text, (response.request.url, secret)
        pools = answers[0].json()["pools"]["pools"]
        assert pools["main_db"]["url"].endswith("?password=***")
        assert f"svc:***@{recommender.removeprefix('http://')}" in pools["recommender"]["base_url"]


async def test_redis_urls_are_redacted_in_pool_figures() -> None:
    manager = ConnectionPoolManager()
    try:
        await manager.create_redis_pool("a", "redis://default:ss@word@127.0.0.1:1/0")
        await manager.create_redis_pool("b", "redis://127.0.0.1:1/0?password=hunter2")
        text = json.dumps(await manager.get_all_stats())
    finally:
        await manager.close_all()
    assert "ss@word" not in text and "word@" not in text and "hunter2" not in text
    assert "redis://default:***@127.0.0.1:1/0" in text
    assert "redis://127.0.0.1:1/0?password=***" in text


class Leaky(Plugin):
    """A plugin whose hook fails with a header value in a local variable."""

    name = "leaky"

    @hookimpl
    def before_request(self, ctx: Any) -> None:
        authorization = ctx.headers.get("authorization")  # what a rich traceback would show
        raise RuntimeError(f"cannot reach redis://default:{authorization[-6:]}@cache:6379")


async def test_an_isolated_plugin_error_logs_no_local_variable() -> None:
    """With structlog's dict tracebacks (locals on by default) in the pipeline."""
    out = io.StringIO()
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    try:

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        async with serve(app, plugins=[Leaky()]) as h:
            response = await h.client.get("/", headers={"authorization": "Bearer Zs3cretZZ"})
    finally:
        structlog.configure(**saved)
    assert response.status_code == 200  # fail-open
    logged = out.getvalue()
    assert "plugin hook raised" in logged
    assert "Zs3cret" not in logged  # neither the local nor the header
    event = json.loads(next(line for line in logged.splitlines() if "plugin hook raised" in line))
    assert "exception" not in event
    assert "RuntimeError" in event["traceback"]
    assert "redis://default:***@cache:6379" in event["error"]
