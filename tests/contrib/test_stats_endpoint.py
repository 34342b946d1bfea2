"""The `stats` plugin: /overdrive/stats behind a token, off unless enabled."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import overdrive.plugins.stats as stats_module
from overdrive import ConfigError, hookimpl
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.plugins.stats import StatsPlugin, json_safe

TOKEN = "s3cret-token-for-tests"


async def home(request):  # type: ignore[no-untyped-def]
    return PlainTextResponse("app")


APP = Starlette(routes=[Route("/", home), Route("/overdrive/other", home)])


class Broken:
    name = "broken"

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        raise RuntimeError("stats exploded")


class Odd:
    name = "odd"

    @hookimpl
    async def collect_stats(self, host: Any) -> dict[str, Any]:
        return {"ratio": float("nan"), "when": object(), "inf": float("inf")}


def _config(**stats: Any) -> dict[str, Any]:
    return {"plugins": ["profiler", "stats"], "stats": {"token": TOKEN, **stats}}


def test_public_names_are_pinned() -> None:
    assert stats_module.__all__ == sorted(stats_module.__all__)
    assert stats_module.__all__ == ["StatsPlugin", "json_safe"]


def test_plugin_meets_the_hook_contract() -> None:
    check_plugin(StatsPlugin)


async def test_without_a_token_or_public_it_stays_off() -> None:
    async with serve(APP, config={"plugins": ["stats"]}) as h:
        assert (await h.client.get("/overdrive/stats")).status_code == 404
        assert (await h.client.get("/overdrive/stats?token=anything")).status_code == 404
        assert (await h.client.get("/overdrive/")).status_code == 404


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"stats.token: expected at least 8"):
        make_host(config={"plugins": ["stats"], "stats": {"token": "short"}})
    with pytest.raises(ConfigError, match=r"stats.path"):
        make_host(config={"plugins": ["stats"], "stats": {"token": TOKEN, "path": "/x/"}})
    make_host(config={"plugins": ["stats"], "stats": {"public": True}})


async def test_off_by_default() -> None:
    async with serve(APP, config={"plugins": ["profiler"]}) as h:
        assert (await h.client.get("/overdrive/stats")).status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong-token-of-same-len"[: len(TOKEN)]},
        {"authorization": "Bearer x"},  # a different length
        {"authorization": "Bearer " + TOKEN + "x"},
        {"authorization": "Basic " + TOKEN},
        {"cookie": "overdrive_token=nope"},
    ],
)
async def test_no_figures_without_the_right_token(headers: dict[str, str]) -> None:
    async with serve(APP, config=_config()) as h:
        r = await h.client.get("/overdrive/stats", headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "system" not in r.text
        r = await h.client.get("/overdrive/", headers=headers)
        assert r.status_code == 401


async def test_hidden_answers_404() -> None:
    async with serve(APP, config=_config(hide=True)) as h:
        assert (await h.client.get("/overdrive/stats")).status_code == 404
        assert (await h.client.get("/overdrive/stats?token=bad-token-1")).status_code == 404


async def test_the_right_token_gets_every_plugins_figures() -> None:
    async with serve(
        APP,
        plugins=[Broken(), Odd()],
        config={**_config(), "plugins": ["profiler", "stats", "broken", "odd"]},
    ) as h:
        await h.client.get("/")
        r = await h.client.get("/overdrive/stats", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.headers["cache-control"] == "no-store"
        stats = r.json()
    assert {"timestamp", "host", "system", "profiler"} <= set(stats)
    assert stats["system"]["process_rss_mb"] > 0
    assert stats["profiler"]["requests"] >= 1
    # A plugin whose collect_stats raises: shown as failed; the others still appear.
    assert stats["broken"] == {"error": "RuntimeError: stats exploded"}
    assert stats["odd"]["ratio"] is None and stats["odd"]["inf"] is None
    assert isinstance(stats["odd"]["when"], str)


async def test_query_token_sets_a_cookie_for_the_dashboard() -> None:
    async with serve(APP, config=_config()) as h:
        r = await h.client.get(f"/overdrive/?token={TOKEN}")
        assert r.status_code == 200
        assert "text/html" in r.headers["content-type"]
        cookie = r.headers["set-cookie"]
        assert "overdrive_token=" in cookie and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        # The client now holds the cookie: the page's own requests need no token.
        assert (await h.client.get("/overdrive/stats")).status_code == 200
        assert (await h.client.get("/overdrive/static/dashboard.js")).status_code == 200


async def test_public_serves_without_token_and_other_paths_reach_the_app() -> None:
    async with serve(APP, config={"plugins": ["stats"], "stats": {"public": True}}) as h:
        assert (await h.client.get("/overdrive/stats")).status_code == 200
        assert (await h.client.get("/overdrive/other")).text == "app"
        assert (await h.client.get("/")).text == "app"
        assert (await h.client.post("/overdrive/stats")).status_code == 405
        r = await h.client.get("/overdrive", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/overdrive/"
        assert (await h.client.get("/overdrive/static/nothing.js")).status_code == 404


async def test_dashboard_can_be_turned_off() -> None:
    async with serve(APP, config=_config(dashboard=False)) as h:
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert (await h.client.get("/overdrive/", headers=auth)).status_code == 404
        assert (await h.client.get("/overdrive/stats", headers=auth)).status_code == 200


def test_json_safe() -> None:
    assert json_safe({"a": [1.0, float("nan")], 2: (True, None)}) == {
        "a": [1.0, None],
        "2": [True, None],
    }


async def test_token_from_the_environment() -> None:
    from overdrive import Overdrive

    host = Overdrive({"plugins": ["stats"]}, env={"OVERDRIVE_STATS__TOKEN": TOKEN})
    async with serve(APP, host=host) as h:
        assert (await h.client.get("/overdrive/stats")).status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert (await h.client.get("/overdrive/stats", headers=auth)).status_code == 200


async def test_a_token_with_odd_characters_survives_the_cookie() -> None:
    token = 'odd "token"; with=signs'
    async with serve(APP, config={"plugins": ["stats"], "stats": {"token": token}}) as h:
        from urllib.parse import quote

        r = await h.client.get(f"/overdrive/?token={quote(token)}")
        assert r.status_code == 200
        assert (await h.client.get("/overdrive/stats")).status_code == 200
