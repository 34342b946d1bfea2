"""The `cache` plugin's HTTP semantics (RFC 9111, shared cache), memory tier."""

from __future__ import annotations

import hashlib
import time
import types
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from overdrive import ConfigError, Overdrive
from overdrive.contrib.testing import check_plugin, serve
from overdrive.plugins.cache import CachePlugin, tag_response
from overdrive.plugins.cache import plugin as plugin_module


class Counter:
    def __init__(self) -> None:
        self.calls = 0


def app_with(counter: Counter, **routes: Any) -> Starlette:
    """Routes: path -> (status, headers, body) or a callable(request) -> that tuple."""

    def endpoint(spec: Any) -> Any:
        async def handler(request: Request) -> Response:
            counter.calls += 1
            status, headers, body = spec(request) if callable(spec) else spec
            if callable(body):
                body = body(counter.calls)
            return Response(body, status_code=status, headers=headers)

        return handler

    return Starlette(routes=[Route("/" + p, endpoint(s)) for p, s in routes.items()])


def numbered(headers: dict[str, str], status: int = 200) -> tuple[int, dict[str, str], Any]:
    return status, headers, lambda n: f"response {n}"


CACHEABLE = numbered({"cache-control": "max-age=60"})


async def twice(h: Any, path: str, **kwargs: Any) -> tuple[Any, Any]:
    return await h.client.get(path, **kwargs), await h.client.get(path, **kwargs)


def config(**settings: Any) -> dict[str, Any]:
    return {"plugins": ["cache"], "cache": settings}


# -- contract ------------------------------------------------------------------------------


def test_the_plugin_keeps_the_hook_contract() -> None:
    check_plugin(CachePlugin)


def test_enabled_by_name_and_host_cache_is_the_async_cache() -> None:
    host = Overdrive({"plugins": ["cache"], "cache": {"default_ttl": 5}}, env={})
    plugin = host.get_plugin("cache")
    assert isinstance(plugin, CachePlugin)
    assert host.cache is plugin.cache
    assert host.cache.config.max_size == 10_000


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_bytes": -1}, "cache.max_bytes: expected > 0, got -1"),
        ({"max_entry_bytes": 10, "max_bytes": 5}, "cache.max_entry_bytes"),
        ({"redis_url": "http://x"}, "cache.redis_url"),
        ({"eviction_policy": "fifo"}, "cache.eviction_policy"),
        ({"default_ttl": 0}, "cache.default_ttl"),
    ],
)
def test_bad_settings_fail_at_startup(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Overdrive(config(**settings), env={})


# -- what is stored --------------------------------------------------------------------------


async def test_miss_then_hit_with_x_cache_and_age() -> None:
    n = Counter()
    async with serve(app_with(n, p=CACHEABLE), config=config()) as h:
        first, second = await twice(h, "/p")
        assert first.headers["x-cache"] == "MISS"
        assert second.headers["x-cache"] == "HIT"
        assert second.headers["age"] == "0"
        assert second.text == first.text == "response 1"
        assert second.headers["x-request-id"] != first.headers["x-request-id"]
        head = await h.client.head("/p")
        assert head.headers["x-cache"] == "HIT" and head.content == b""
        assert head.headers["content-length"] == str(len("response 1"))
        assert n.calls == 1
        stats = await h.host.get_system_stats()
        assert stats["cache"]["http"]["HIT"] == 2


async def test_nothing_is_cached_without_caching_headers_or_a_route_ttl() -> None:
    n = Counter()
    async with serve(app_with(n, p=numbered({})), config=config()) as h:
        first, second = await twice(h, "/p")
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "MISS")
        assert n.calls == 2


async def test_a_route_rule_gives_a_ttl_to_an_app_that_sends_none() -> None:
    n = Counter()
    cfg = config()
    cfg["routes"] = [{"path": "/thumbnails/*", "cache": {"ttl": 3600}}]
    app = app_with(n, **{"thumbnails/{x}": numbered({}), "other": numbered({})})
    async with serve(app, config=cfg) as h:
        first, second = await twice(h, "/thumbnails/1")
        assert second.headers["x-cache"] == "HIT" and second.text == first.text
        _a, b = await twice(h, "/other")
        assert b.headers["x-cache"] == "MISS"


@pytest.mark.parametrize(
    "headers",
    [
        {"cache-control": "no-store"},
        {"cache-control": "private, max-age=60"},
        {"cache-control": "no-cache, max-age=60"},
        {"cache-control": "max-age=60", "set-cookie": "session=1"},
        {"cache-control": "max-age=60", "vary": "*"},
        {"cache-control": "max-age=0"},
        {"expires": "Thu, 01 Jan 1970 00:00:00 GMT"},
        {"expires": "not a date"},
    ],
    ids=["no-store", "private", "no-cache", "set-cookie", "vary-star", "max-age-0", "past", "bad"],
)
async def test_responses_a_shared_cache_must_not_store(headers: dict[str, str]) -> None:
    n = Counter()
    async with serve(app_with(n, p=numbered(headers)), config=config(default_ttl=60)) as h:
        _, second = await twice(h, "/p")
        # (after Set-Cookie the client sends the cookie: BYPASS; otherwise MISS)
        assert second.headers["x-cache"] in ("MISS", "BYPASS")
        assert n.calls == 2


async def test_s_maxage_wins_and_expires_is_understood() -> None:
    n = Counter()
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 600))
    app = app_with(
        n,
        s=numbered({"cache-control": "max-age=0, s-maxage=60"}),
        e=numbered({"expires": future}),
    )
    async with serve(app, config=config()) as h:
        for path in ("/s", "/e"):
            _, second = await twice(h, path)
            assert second.headers["x-cache"] == "HIT", path


async def test_only_get_and_head_and_cacheable_statuses() -> None:
    n = Counter()
    app = app_with(
        n,
        p=CACHEABLE,
        err=numbered({"cache-control": "max-age=60"}, status=500),
        plain=numbered({}, status=500),
    )
    app.router.routes[0].methods = {"GET", "HEAD", "POST"}
    async with serve(app, config=config(default_ttl=60)) as h:
        await h.client.post("/p")
        assert (await h.client.post("/p")).headers.get("x-cache") is None
        # RFC 9111 3: any status may be stored when the app gives it explicit freshness...
        _, second = await twice(h, "/err")
        assert second.status_code == 500 and second.headers["x-cache"] == "HIT"
        # ...but default_ttl only applies to the heuristically cacheable ones.
        _, second = await twice(h, "/plain")
        assert second.status_code == 500 and second.headers["x-cache"] == "MISS"


# -- the request's say ---------------------------------------------------------------------


async def test_request_cache_control_is_respected() -> None:
    n = Counter()
    async with serve(app_with(n, p=CACHEABLE), config=config()) as h:
        await h.client.get("/p")
        r = await h.client.get("/p", headers={"cache-control": "no-cache"})
        assert r.headers["x-cache"] == "MISS" and r.text == "response 2"
        r = await h.client.get("/p")  # the refreshed copy was stored
        assert r.headers["x-cache"] == "HIT" and r.text == "response 2"
        r = await h.client.get("/p", headers={"cache-control": "max-age=0"})
        assert r.headers["x-cache"] == "MISS"
        r = await h.client.get("/p", headers={"pragma": "no-cache"})
        assert r.headers["x-cache"] == "MISS"
        r = await h.client.get("/p", headers={"cache-control": "no-store"})
        assert r.headers["x-cache"] == "BYPASS"
        assert n.calls == 5


async def test_authorization_and_cookie_bypass_unless_the_key_includes_them() -> None:
    n = Counter()

    def whoami(request: Request) -> tuple[int, dict[str, str], str]:
        who = request.headers.get("authorization", "anonymous")
        return 200, {"cache-control": "private, max-age=60"}, f"hello {who}"

    async with serve(app_with(n, me=whoami), config=config()) as h:
        r = await h.client.get("/me", headers={"authorization": "alice"})
        assert r.headers["x-cache"] == "BYPASS"
        r = await h.client.get("/me", headers={"cookie": "s=1"})
        assert r.headers["x-cache"] == "BYPASS"
    n = Counter()
    async with serve(app_with(n, me=whoami), config=config(key_headers=["Authorization"])) as h:
        await h.client.get("/me", headers={"authorization": "alice"})
        await h.client.get("/me", headers={"authorization": "bob"})
        alice = await h.client.get("/me", headers={"authorization": "alice"})
        bob = await h.client.get("/me", headers={"authorization": "bob"})
        assert (alice.text, alice.headers["x-cache"]) == ("hello alice", "HIT")
        assert (bob.text, bob.headers["x-cache"]) == ("hello bob", "HIT")
        assert n.calls == 2


# -- keys ----------------------------------------------------------------------------------


async def test_key_has_host_and_normalized_query() -> None:
    n = Counter()
    cfg = config(ignore_query_params=["utm_source"])
    async with serve(app_with(n, p=CACHEABLE), config=cfg) as h:
        await h.client.get("/p?b=2&a=1")
        r = await h.client.get("/p?a=1&b=2&utm_source=mail")
        assert r.headers["x-cache"] == "HIT"
        r = await h.client.get("/p?a=1&b=3")
        assert r.headers["x-cache"] == "MISS"
        r = await h.client.get("/p?a=1&b=2", headers={"host": "other.example"})
        assert r.headers["x-cache"] == "MISS"


async def asgi_get(app: Any, path: str, query: bytes, headers: list[Any]) -> tuple[int, dict]:
    """One GET straight through ASGI (for bytes no HTTP client will send)."""
    out: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode("latin-1") for k, v in message["headers"]}

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": [(b"host", b"testserver"), *headers],
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return out["status"], out["headers"]


async def test_non_utf8_query_strings_and_headers_never_crash() -> None:
    n = Counter()
    async with serve(app_with(n, p=CACHEABLE), config=config()) as h:
        for _ in range(2):
            status, headers = await asgi_get(h.app, "/p", b"q=\xff\xfe&x=%FF", [])
        assert status == 200 and headers["x-cache"] == "HIT"
        status, headers = await asgi_get(h.app, "/p", b"q=\xff", [])
        assert status == 200 and headers["x-cache"] == "MISS"
        odd = [(b"cache-control", b"\x00\xff max-age=\xfe"), (b"if-none-match", b"\xff")]
        status, _ = await asgi_get(h.app, "/p", b"q=\xff", odd)
        assert status == 200


async def test_vary_keys_on_the_named_request_headers() -> None:
    n = Counter()

    def by_language(request: Request) -> tuple[int, dict[str, str], str]:
        lang = request.headers.get("accept-language", "en")
        headers = {"cache-control": "max-age=60", "vary": "Accept-Language, accept-language"}
        return 200, headers, f"text in {lang}"

    async with serve(app_with(n, p=by_language), config=config()) as h:
        await h.client.get("/p", headers={"accept-language": "fr"})
        await h.client.get("/p", headers={"accept-language": "de"})
        fr = await h.client.get("/p", headers={"accept-language": "fr"})
        de = await h.client.get("/p", headers={"accept-language": "de"})
        assert (fr.text, fr.headers["x-cache"]) == ("text in fr", "HIT")
        assert (de.text, de.headers["x-cache"]) == ("text in de", "HIT")
        assert n.calls == 2


async def test_huge_or_repeated_vary_is_not_stored_and_does_not_crash() -> None:
    n = Counter()
    huge = ", ".join(f"x-header-{i}" for i in range(500))
    app = app_with(n, p=numbered({"cache-control": "max-age=60", "vary": huge}))
    async with serve(app, config=config()) as h:
        first, second = await twice(h, "/p")
        assert first.status_code == 200 and second.headers["x-cache"] == "MISS"


@pytest.mark.parametrize(
    "value",
    [
        "max-age=abc",
        "max-age=-1",
        "max-age",
        ",,, ;;; =",
        'max-age="60"',
        "max-age=99999999999999999999999",
        "max-age=60, max-age=0",
        "\x00\xff max-age=60",
    ],
)
async def test_malformed_cache_control_never_crashes(value: str) -> None:
    n = Counter()
    app = app_with(n, p=numbered({"cache-control": value}))
    async with serve(app, config=config()) as h:
        first, second = await twice(h, "/p")
        assert first.status_code == second.status_code == 200
        assert second.headers["x-cache"] in ("HIT", "MISS")
        r = await h.client.get("/p", headers={"cache-control": value.encode("latin-1")})
        assert r.status_code == 200


async def test_malformed_max_age_is_not_guessed() -> None:
    n = Counter()
    app = app_with(n, p=numbered({"cache-control": "max-age=abc"}))
    async with serve(app, config=config(default_ttl=60)) as h:
        _, second = await twice(h, "/p")
        assert second.headers["x-cache"] == "MISS"


# -- validators, ranges ----------------------------------------------------------------------


async def test_strong_etag_from_the_bytes_and_304s() -> None:
    n = Counter()
    lm = "Wed, 21 Oct 2015 07:28:00 GMT"
    app = app_with(
        n,
        p=(200, {"cache-control": "max-age=60"}, "same bytes"),
        lm=(200, {"cache-control": "max-age=60", "last-modified": lm}, "dated"),
        own=(200, {"cache-control": "max-age=60", "etag": 'W/"v1"'}, "tagged"),
    )
    async with serve(app, config=config()) as h:
        _, hit = await twice(h, "/p")
        expected = '"' + hashlib.blake2b(b"same bytes", digest_size=16).hexdigest() + '"'
        assert hit.headers["etag"] == expected
        r = await h.client.get("/p", headers={"if-none-match": f'"other", {expected}'})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == expected
        r = await h.client.get("/p", headers={"if-none-match": '"other"'})
        assert r.status_code == 200
        await h.client.get("/lm")
        r = await h.client.get("/lm", headers={"if-modified-since": lm})
        assert r.status_code == 304
        r = await h.client.get(
            "/lm", headers={"if-modified-since": "Tue, 20 Oct 2015 07:28:00 GMT"}
        )
        assert r.status_code == 200
        r = await h.client.get("/lm", headers={"if-modified-since": "garbage"})
        assert r.status_code == 200
        await h.client.get("/own")
        r = await h.client.get("/own", headers={"if-none-match": '"v1"'})
        assert r.status_code == 304 and r.headers["etag"] == 'W/"v1"'


async def test_range_requests_are_answered_from_the_cache() -> None:
    n = Counter()
    body = bytes(range(256)) * 40  # 10,240 bytes of "video"
    app = app_with(n, v=(200, {"cache-control": "max-age=60", "content-type": "video/mp4"}, body))
    async with serve(app, config=config()) as h:
        await h.client.get("/v")
        r = await h.client.get("/v", headers={"range": "bytes=100-199"})
        assert r.status_code == 206 and r.content == body[100:200]
        assert r.headers["content-range"] == f"bytes 100-199/{len(body)}"
        assert r.headers["x-cache"] == "HIT"
        r = await h.client.get("/v", headers={"range": "bytes=-10"})
        assert r.status_code == 206 and r.content == body[-10:]
        r = await h.client.get("/v", headers={"range": "bytes=10000-"})
        assert r.content == body[10000:]
        r = await h.client.get("/v", headers={"range": "bytes=99999-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(body)}"
        r = await h.client.get("/v", headers={"range": "bytes=0-1,5-6"})
        assert r.status_code == 200 and r.content == body
        r = await h.client.get("/v", headers={"range": "bytes=abc"})
        assert r.status_code == 200
        r = await h.client.get("/v", headers={"range": "bytes=0-9", "if-range": '"stale"'})
        assert r.status_code == 200 and r.content == body
        etag = r.headers["etag"]
        r = await h.client.get("/v", headers={"range": "bytes=0-9", "if-range": etag})
        assert r.status_code == 206 and r.content == body[:10]
        assert n.calls == 1


# -- sizes -----------------------------------------------------------------------------------


async def test_a_body_over_max_entry_bytes_passes_through_unstored() -> None:
    n = Counter()
    big = b"v" * (10 * 2**20)
    app = app_with(n, big=(200, {"cache-control": "max-age=60"}, big))
    async with serve(app, config=config(max_entry_bytes=2**20)) as h:
        first, second = await twice(h, "/big")
        assert first.content == big and second.content == big
        assert second.headers["x-cache"] == "MISS"
        assert h.host.cache.memory.bytes == 0


async def test_a_10_mb_body_within_bounds_is_stored_and_served_whole() -> None:
    n = Counter()
    big = bytes(range(256)) * (10 * 2**20 // 256)
    app = app_with(n, big=(200, {"cache-control": "max-age=60"}, big))
    async with serve(app, config=config(max_entry_bytes=16 * 2**20)) as h:
        _, second = await twice(h, "/big")
        assert second.headers["x-cache"] == "HIT" and second.content == big
        assert n.calls == 1


# -- stale -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(
        plugin_module, "time", types.SimpleNamespace(time=c.time, monotonic=c.monotonic)
    )
    return c


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(clock: Clock) -> None:
    import asyncio

    from tests.plugins.test_cache_async import until

    n = Counter()
    gate = asyncio.Event()

    async def render(request: Request) -> Response:
        n.calls += 1
        if n.calls > 1:
            await gate.wait()  # the refresh is held until the stale answers are checked
        headers = {"cache-control": "max-age=10, stale-while-revalidate=60"}
        return Response(f"response {n.calls}", headers=headers)

    app = Starlette(routes=[Route("/p", render)])
    async with serve(app, config=config()) as h:
        await h.client.get("/p")
        clock.now += 20
        stale = [await h.client.get("/p") for _ in range(3)]
        assert {r.headers["x-cache"] for r in stale} == {"STALE"}
        assert {r.text for r in stale} == {"response 1"}
        plugin = h.host.get_plugin("cache")
        assert await until(lambda: n.calls == 2)  # one background refresh, not one per hit
        gate.set()
        assert await until(lambda: not plugin._tasks)
        fresh = await h.client.get("/p")
        assert (fresh.headers["x-cache"], fresh.text) == ("HIT", "response 2")
        assert n.calls == 2
        clock.now += 1000  # past the stale window: a plain miss
        r = await h.client.get("/p")
        assert r.headers["x-cache"] == "MISS"


async def test_stale_if_error_covers_exceptions_and_5xx(clock: Clock) -> None:
    n = Counter()
    state = {"mode": "ok"}

    def flaky(request: Request) -> tuple[int, dict[str, str], Any]:
        if state["mode"] == "raise":
            raise RuntimeError("model crashed")
        if state["mode"] == "500":
            return 500, {}, "broken"
        return 200, {"cache-control": "max-age=10, stale-if-error=60"}, "good"

    async with serve(app_with(n, p=flaky), config=config(), raise_app_exceptions=False) as h:
        await h.client.get("/p")
        clock.now += 20
        state["mode"] = "raise"
        r = await h.client.get("/p")
        assert (r.status_code, r.text, r.headers["x-cache"]) == (200, "good", "STALE")
        state["mode"] = "500"
        r = await h.client.get("/p")
        assert (r.status_code, r.text, r.headers["x-cache"]) == (200, "good", "STALE")
        clock.now += 1000
        r = await h.client.get("/p")
        assert r.status_code == 500


# -- tags, invalidation, poisoning ------------------------------------------------------------


async def test_tags_from_header_and_context_and_the_header_is_stripped() -> None:
    n = Counter()
    app = app_with(
        n,
        a=numbered({"cache-control": "max-age=60", "x-cache-tags": "video:1, user:9"}),
        b=numbered({"cache-control": "max-age=60", "x-cache-tags": "video:2"}),
    )
    async with serve(app, config=config()) as h:
        first = await h.client.get("/a")
        assert "x-cache-tags" not in first.headers
        await h.client.get("/b")
        assert "x-cache-tags" not in (await h.client.get("/a")).headers
        assert await h.host.cache.invalidate_tags(["user:9"]) == 1
        assert (await h.client.get("/a")).headers["x-cache"] == "MISS"
        assert (await h.client.get("/b")).headers["x-cache"] == "HIT"
        plugin = h.host.get_plugin("cache")
        await plugin.invalidate_prefix("/b")
        assert (await h.client.get("/b")).headers["x-cache"] == "MISS"
        await plugin.invalidate_url("/a", host="testserver")
        assert (await h.client.get("/a")).headers["x-cache"] == "MISS"


def test_tag_response_adds_tags_on_the_context() -> None:
    from overdrive.context import RequestContext
    from overdrive.routes import RoutePolicy

    ctx = RequestContext({"type": "http"}, "rid", RoutePolicy({}, ()))
    tag_response(ctx, "a", "b")
    assert ctx.state["cache_tags"] == {"a", "b"}


async def test_poisoning_headers_bypass_and_cannot_plant_a_variant() -> None:
    n = Counter()

    def link(request: Request) -> tuple[int, dict[str, str], str]:
        host = request.headers.get("x-forwarded-host", request.headers["host"])
        return 200, {"cache-control": "max-age=60"}, f"<script src=//{host}/app.js>"

    async with serve(app_with(n, p=link), config=config()) as h:
        evil = await h.client.get("/p", headers={"x-forwarded-host": "evil.example"})
        assert evil.headers["x-cache"] == "BYPASS" and "evil" in evil.text
        victim = await h.client.get("/p")
        assert victim.headers["x-cache"] == "MISS" and "evil" not in victim.text
        evil = await h.client.get("/p", headers={"x-original-url": "/admin"})
        assert evil.headers["x-cache"] == "BYPASS"
        victim = await h.client.get("/p")
        assert victim.headers["x-cache"] == "HIT" and "evil" not in victim.text
    n = Counter()
    cfg = config(key_headers=["x-forwarded-host"])
    async with serve(app_with(n, p=link), config=cfg) as h:
        await h.client.get("/p", headers={"x-forwarded-host": "evil.example"})
        victim = await h.client.get("/p")
        assert victim.headers["x-cache"] == "MISS" and "evil" not in victim.text
        again = await h.client.get("/p", headers={"x-forwarded-host": "evil.example"})
        assert again.headers["x-cache"] == "HIT" and "evil" in again.text


async def test_a_route_may_turn_the_cache_off() -> None:
    n = Counter()
    cfg = config()
    cfg["routes"] = [{"path": "/live", "cache": {"enabled": False}}]
    async with serve(app_with(n, live=CACHEABLE), config=cfg) as h:
        _, second = await twice(h, "/live")
        assert "x-cache" not in second.headers and n.calls == 2


async def test_memory_pressure_trims_the_memory_tier() -> None:
    n = Counter()
    app = app_with(n, **{"p{i}": CACHEABLE})
    async with serve(app, config=config()) as h:
        for i in range(10):
            await h.client.get(f"/p{i}")
        assert len(h.host.cache.memory) == 10
        await h.host.memory_pressure("warning")
        assert 0 < len(h.host.cache.memory) <= 5
        await h.host.memory_pressure("critical")
        assert len(h.host.cache.memory) == 0
        stats = await h.host.get_system_stats()
        assert "hit_rate" in stats["cache"]


async def test_stale_if_error_covers_a_timeout(clock: Clock) -> None:
    import asyncio

    from overdrive import hookimpl

    class Deadline:
        name = "deadline"

        @hookimpl
        def before_request(self, ctx: Any) -> None:
            ctx.timeout = 0.05

    n = Counter()
    state = {"slow": False}

    async def render(request: Request) -> Response:
        n.calls += 1
        if state["slow"]:
            await asyncio.sleep(5)
        return Response("rendered", headers={"cache-control": "max-age=10, stale-if-error=60"})

    app = Starlette(routes=[Route("/p", render)])
    cfg = {"plugins": ["deadline", "cache"]}
    async with serve(app, plugins=[Deadline(), CachePlugin()], config=cfg) as h:
        await h.client.get("/p")
        clock.now += 20
        state["slow"] = True
        r = await h.client.get("/p")
        assert (r.status_code, r.text, r.headers["x-cache"]) == (200, "rendered", "STALE")
