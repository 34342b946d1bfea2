"""Admission, attacked (issue 16, items 9-12): what hostile clients and broken plugins
must not be able to do to the request checks and the scarce slots behind them.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from overdrive import hookimpl
from overdrive.contrib.prometheus import make_asgi_app
from overdrive.contrib.testing import make_host, serve


async def admin(request):  # type: ignore[no-untyped-def]
    return PlainTextResponse("the keys to everything")


class Guard:
    """A fail-open request check (the usual kind) whose figures are broken."""

    name = "guard"

    def __init__(self) -> None:
        self.scrapes = 0

    @hookimpl
    def before_request(self, ctx: Any) -> Any:
        if ctx.path.startswith("/admin") and "x-admin-token" not in ctx.headers:
            return PlainTextResponse("unauthenticated", status_code=401)
        return None

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        self.scrapes += 1
        raise RuntimeError("stats exploded")


async def test_failing_stats_never_quarantine_a_plugins_request_checks() -> None:
    """Item 11: 21 /metrics scrapes used to quarantine the guard and let /admin through."""
    guard = Guard()
    host = make_host(guard, config={"plugins": ["guard"], "quarantine_after": 5})
    metrics = make_asgi_app(host, cache_seconds=0)  # every scrape renders: counted below
    app = Starlette(routes=[Route("/admin", admin), Mount("/metrics", app=metrics)])
    async with serve(app, host=host) as h:
        assert (await h.client.get("/admin")).status_code == 401
        for _ in range(25):
            assert (await h.client.get("/metrics/")).status_code == 200
        assert guard.scrapes >= 25
        r = await h.client.get("/admin")
        assert r.status_code == 401, r.text
        plugin = (await host.get_system_stats())["host"]["plugins"]["guard"]
    assert plugin["quarantined"] is False
    assert plugin["errors"] == 0  # request-hook errors: none
    assert plugin["stats_errors"] >= 26
    assert "stats exploded" in plugin["last_stats_error"]


async def test_a_fail_closed_plugins_failing_stats_do_not_break_the_scrape() -> None:
    guard = Guard()
    host = make_host(guard, config={"plugins": ["guard"], "guard": {"fail_closed": True}})
    stats = await host.get_system_stats()
    assert stats["guard"] == {"error": "RuntimeError: stats exploded"}
    assert stats["host"]["plugins"]["guard"]["stats_errors"] == 1


async def test_a_cache_hit_is_not_a_half_open_trial() -> None:
    """Item 12: a cache hit used to close a half-open breaker, and the still-broken app
    then took the next requests (5 of 20 here, one failure threshold's worth)."""
    import asyncio

    calls = {"broken": 0}

    async def cached(request):  # type: ignore[no-untyped-def]
        return PlainTextResponse("kept", headers={"cache-control": "max-age=600"})

    async def broken(request):  # type: ignore[no-untyped-def]
        calls["broken"] += 1
        return PlainTextResponse("down", status_code=500)

    app = Starlette(routes=[Route("/cached", cached), Route("/broken", broken)])
    config = {
        "plugins": ["breaker", "cache"],
        "breaker": {"all_routes": True, "failure_threshold": 5, "recovery_timeout": 0.2},
    }
    async with serve(app, config=config) as h:
        assert (await h.client.get("/cached")).headers["x-cache"] == "MISS"
        for _ in range(5):
            assert (await h.client.get("/broken")).status_code == 500
        assert (await h.client.get("/broken")).status_code == 503  # open
        breaker = h.host.get_plugin("breaker").breakers["route:default"]
        await asyncio.sleep(0.25)  # past recovery_timeout: the next call is a trial
        hit = await h.client.get("/cached")
        assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
        assert breaker.state == "half_open"
        calls["broken"] = 0
        statuses = [(await h.client.get("/broken")).status_code for _ in range(20)]
    assert calls["broken"] == 1  # the one trial; it failed and the breaker opened again
    assert statuses == [500] + [503] * 19


# -- item 13: rate limits keyed on the client address behind uvicorn's forwarded-header trust --


def _limited_app() -> Any:
    async def hello(request):  # type: ignore[no-untyped-def]
        return PlainTextResponse(request.client.host if request.client else "?")

    from overdrive.middleware import OverdriveMiddleware

    config = {"plugins": ["ratelimit"], "ratelimit": {"limit": "5/minute", "key": "address"}}
    return OverdriveMiddleware(Starlette(routes=[Route("/", hello)]), config=config)


def _statuses_with_rotating_forwarded_for(**uvicorn_config: Any) -> list[int]:
    """10 requests from 127.0.0.1, each claiming another X-Forwarded-For address."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_limited_app(), log_level="warning", **uvicorn_config)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        with httpx.Client() as client:
            return [
                client.get(url, headers={"x-forwarded-for": f"203.0.113.{i}"}).status_code
                for i in range(10)
            ]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_address_rate_limits_depend_on_the_servers_forwarded_header_trust() -> None:
    """What docs/security.md and docs/scaling.md warn about, on a real uvicorn: by default
    it trusts X-Forwarded-For from 127.0.0.1, so a client that reaches it from loopback
    (no proxy in front, or a sidecar) picks its own address and the limit never bites."""
    assert _statuses_with_rotating_forwarded_for() == [200] * 10
    # The setting for "no proxy in front": trust no forwarded header.
    assert _statuses_with_rotating_forwarded_for(forwarded_allow_ips="") == [200] * 5 + [429] * 5
    assert _statuses_with_rotating_forwarded_for(proxy_headers=False) == [200] * 5 + [429] * 5


def test_the_forwarded_header_trust_is_documented() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for page in ("docs/security.md", "docs/scaling.md"):
        text = (root / page).read_text(encoding="utf-8")
        assert "--forwarded-allow-ips" in text, page
        assert "test_address_rate_limits_depend_on_the_servers_forwarded_header_trust" in text
