"""The demo app that `./run demo` serves answers with every installed plugin on."""

from __future__ import annotations

from overdrive.contrib.demo import BUILTIN, app
from overdrive.contrib.testing import serve


async def test_demo_serves_with_every_builtin_plugin() -> None:
    async with serve(app) as h:
        hello = await h.client.get("/hello")
        stats = await h.client.get("/stats")
    assert hello.status_code == 200
    assert hello.json()["request_id"] == hello.headers["x-request-id"]
    assert sorted(stats.json()["host"]["plugins"]) == BUILTIN
