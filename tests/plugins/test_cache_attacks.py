"""The cache under attack (issue 15, "found by attacking it"): each test failed on the old code.

Poisoning through what the key does not see (repeated headers, reordered
repeated query parameters, forwarding and method-override headers), the tag
header leaking, settings the docs name, and Redis misbehaving in one key.
"""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from overdrive import Overdrive
from overdrive.contrib.testing import serve
from overdrive.middleware import OverdriveMiddleware
from overdrive.plugins.cache import CachePlugin
from overdrive.plugins.cache.settings import UNKEYED_HEADERS
from tests.plugins.test_cache_http import CACHEABLE, Counter, app_with, config
from tests.support.server import serving


async def raw_get(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], query: bytes = b""
) -> dict[str, Any]:
    """One GET straight through ASGI, with headers exactly as given (repeats included)."""
    out: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode("latin-1") for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
    }
    await app(scope, receive, send)
    return out


def links(request: Request) -> tuple[int, dict[str, str], str]:
    return 200, {"cache-control": "max-age=60"}, f"<a href='{request.url}'>"


# -- repeated headers ---------------------------------------------------------------------


async def test_a_repeated_host_bypasses_and_plants_nothing() -> None:
    n = Counter()
    async with serve(app_with(n, item=links), config=config()) as h:
        attack = [(b"host", b"evil.example"), (b"host", b"real.example")]
        r = await raw_get(h.app, "/item", attack)
        assert r["headers"]["x-cache"] == "BYPASS"
        assert b"evil.example" in r["body"]  # Starlette built the URL from the first Host
        victim = await raw_get(h.app, "/item", [(b"host", b"real.example")])
        assert victim["headers"]["x-cache"] == "MISS" and b"evil" not in victim["body"]
        again = await raw_get(h.app, "/item", [(b"host", b"real.example")])
        assert again["headers"]["x-cache"] == "HIT" and b"evil" not in again["body"]
        # Nor is the attacker answered from the real entry under the other Host's key.
        r = await raw_get(h.app, "/item", [(b"host", b"real.example"), (b"host", b"evil.example")])
        assert r["headers"]["x-cache"] == "BYPASS"


def test_a_repeated_host_over_uvicorn_with_httptools_is_not_stored() -> None:
    """The attack as it arrives from a real server (httptools passes both lines on)."""
    pytest.importorskip("httptools")
    n = Counter()
    app = OverdriveMiddleware(app_with(n, item=links), config=config())
    with serving(app) as base:
        port = int(base.rsplit(":", 1)[1])
        raw = (
            b"GET /item HTTP/1.1\r\nHost: evil.example\r\nHost: real.example\r\n"
            b"Connection: close\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"evil.example" in body  # the server passed both Host lines on
        assert b"\r\nx-cache: BYPASS" in head
        for _ in range(2):
            victim = httpx.get(base + "/item", headers={"host": "real.example"})
            assert "evil" not in victim.text
        assert victim.headers["x-cache"] == "HIT"


@pytest.mark.parametrize(
    "name",
    [b"cache-control", b"pragma", b"if-none-match", b"range", b"x-tenant"],
)
async def test_a_repeated_header_the_key_or_lookup_reads_bypasses(name: bytes) -> None:
    n = Counter()
    cfg = config(key_headers=["x-tenant"])
    async with serve(app_with(n, p=CACHEABLE), config=cfg) as h:
        base = [(b"host", b"testserver"), (b"x-tenant", b"a")]
        await raw_get(h.app, "/p", base)
        headers = [(b"host", b"testserver"), (name, b"a"), (name, b"b")]
        if name != b"x-tenant":
            headers.append((b"x-tenant", b"a"))
        r = await raw_get(h.app, "/p", headers)
        assert r["headers"]["x-cache"] == "BYPASS"


async def test_a_repeated_vary_header_is_neither_served_nor_stored() -> None:
    n = Counter()

    def by_lang(request: Request) -> tuple[int, dict[str, str], str]:
        lang = request.headers.get("accept-language", "en")  # Starlette: the first line
        return 200, {"cache-control": "max-age=60", "vary": "accept-language"}, f"in {lang}"

    async with serve(app_with(n, p=by_lang), config=config()) as h:
        host = (b"host", b"testserver")
        r = await raw_get(h.app, "/p", [host, (b"accept-language", b"fr, de")])
        assert r["body"] == b"in fr, de"
        # The joined value of two lines is "fr, de" too, but the app reads "fr".
        two = [host, (b"accept-language", b"fr"), (b"accept-language", b"de")]
        r = await raw_get(h.app, "/p", two)
        assert r["body"] == b"in fr" and r["headers"]["x-cache"] == "MISS"
        r = await raw_get(h.app, "/p", [host, (b"accept-language", b"fr, de")])
        assert r["body"] == b"in fr, de" and r["headers"]["x-cache"] == "HIT"


# -- the query ------------------------------------------------------------------------------


async def test_repeated_query_parameters_keep_their_order_in_the_key() -> None:
    n = Counter()

    def last_id(request: Request) -> tuple[int, dict[str, str], str]:
        return 200, {"cache-control": "max-age=60"}, f"id {request.query_params['id']}"

    async with serve(app_with(n, p=last_id), config=config()) as h:
        assert (await h.client.get("/p?id=1&id=2")).text == "id 2"
        r = await h.client.get("/p?id=2&id=1")
        assert r.text == "id 1" and r.headers["x-cache"] == "MISS"
        # Percent-encoded names are the same name to the app: their order is kept too.
        assert (await h.client.get("/p?%69d=3&id=4")).text == "id 4"
        assert (await h.client.get("/p?id=4&%69d=3")).text == "id 3"
        # Different names may still be reordered: the app cannot tell.
        r = await h.client.get("/p?x=1&id=2&id=1")
        assert r.text == "id 1"
        r = await h.client.get("/p?id=2&x=1&id=1")
        assert r.text == "id 1" and r.headers["x-cache"] == "HIT"


async def test_sort_query_false_keys_the_query_as_sent() -> None:
    n = Counter()
    async with serve(app_with(n, p=CACHEABLE), config=config(sort_query=False)) as h:
        await h.client.get("/p?a=1&b=2")
        assert (await h.client.get("/p?b=2&a=1")).headers["x-cache"] == "MISS"
        assert (await h.client.get("/p?a=1&b=2")).headers["x-cache"] == "HIT"


# -- forwarding and method override -----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "forwarded",
        "x-forwarded-server",
        "x-forwarded-port",
        "x-host",
        "x-http-method-override",
        "x-forwarded-scheme",
    ],
)
async def test_forwarding_and_override_headers_bypass(name: str) -> None:
    assert name in UNKEYED_HEADERS
    n = Counter()
    async with serve(app_with(n, p=CACHEABLE), config=config()) as h:
        await h.client.get("/p")
        r = await h.client.get("/p", headers={name: "evil.example"})
        assert r.headers["x-cache"] == "BYPASS"
        r = await h.client.get("/p", headers={name: "evil.example"})
        assert r.headers["x-cache"] == "BYPASS"
        assert (await h.client.get("/p")).headers["x-cache"] == "HIT"


async def test_the_unkeyed_list_is_configurable() -> None:
    n = Counter()
    cfg = config(unkeyed_headers=["x-my-proxy"])
    async with serve(app_with(n, p=CACHEABLE), config=cfg) as h:
        await h.client.get("/p")
        assert (await h.client.get("/p", headers={"x-my-proxy": "1"})).headers[
            "x-cache"
        ] == "BYPASS"
        assert (await h.client.get("/p", headers={"x-host": "1"})).headers["x-cache"] == "HIT"


# -- the tag header -------------------------------------------------------------------------


async def test_the_tag_header_never_reaches_a_client() -> None:
    async def tagged(request: Request) -> Response:
        return Response("x", headers={"x-cache-tags": "tenant-42, secret-project"})

    routes = [
        Route("/post", tagged, methods=["POST"]),
        Route("/off", tagged),
        Route("/on", tagged),
    ]
    app = Starlette(routes=routes)
    cfg = {"plugins": ["cache"], "routes": [{"path": "/off", "cache": {"enabled": False}}]}
    async with serve(app, config=cfg) as h:
        for r in (
            await h.client.post("/post"),
            await h.client.get("/off"),
            await h.client.get("/on"),
            await h.client.get("/on", headers={"authorization": "x"}),
        ):
            assert r.status_code == 200
            assert "x-cache-tags" not in r.headers


# -- settings the docs name ------------------------------------------------------------------


async def test_memory_ttl_is_a_cache_setting() -> None:
    host = Overdrive({"plugins": ["cache"], "cache": {"memory_ttl": 5}})
    await host.initialize()
    try:
        plugin = host.get_plugin("cache")
        assert isinstance(plugin, CachePlugin) and plugin.cache is not None
        assert plugin.cache.config.memory_ttl == 5
    finally:
        await host.cleanup()


# -- Redis misbehaving in one key --------------------------------------------------------------


async def test_a_wrongtype_key_is_a_corrupt_miss_and_redis_stays_on(
    redis_url: str, namespace: str
) -> None:
    n = Counter()
    cfg = config(redis_url=redis_url, namespace=namespace)
    app = app_with(n, a=CACHEABLE, b=CACHEABLE)
    async with serve(app, config=cfg) as h:
        await h.client.get("/b")
        plugin = h.host.get_plugin("cache")
        cache = plugin.cache
        key = plugin._route(plugin.settings).base_key(b"/a", b"", b"testserver")
        client = aioredis.from_url(redis_url)
        try:
            await client.rpush(cache._rkey(key), b"not a string")
            r = await h.client.get("/a")
            assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
            assert cache.redis.corrupt == 1 and cache.redis.available
            cache.memory.clear()
            r = await h.client.get("/b")  # another key is still read from Redis
            assert r.headers["x-cache"] == "HIT"
            assert cache.redis.hits >= 1
        finally:
            await client.delete(cache._rkey(key))
            await client.aclose()


async def test_redis_refusing_writes_leaves_reads_on(private_redis: Any) -> None:
    n = Counter()
    paths = [f"p{i}" for i in range(30)]
    app = app_with(n, **dict.fromkeys(paths, CACHEABLE), extra=CACHEABLE)
    cfg = config(redis_url=private_redis.url, namespace="odtest")
    async with serve(app, config=cfg) as writer:
        for p in paths:
            await writer.client.get("/" + p)
    client = aioredis.from_url(private_redis.url)
    try:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", "1")  # every write is refused (OOM)
        async with serve(app, config=cfg) as reader:  # a second worker: empty memory
            cache = reader.host.get_plugin("cache").cache
            r = await reader.client.get("/extra")  # its store is refused
            assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
            assert cache.redis.refused >= 1
            served = [(await reader.client.get("/" + p)).headers["x-cache"] for p in paths]
            assert served == ["HIT"] * 30
            assert cache.redis.available
    finally:
        await client.config_set("maxmemory", "0")
        await client.aclose()


async def test_a_repeated_header_check_costs_nothing_on_a_plain_request() -> None:
    """Headers outside the key are never checked for repeats (Accept twice is fine)."""
    n = Counter()
    async with serve(app_with(n, p=CACHEABLE), config=config()) as h:
        host = (b"host", b"testserver")
        await raw_get(h.app, "/p", [host])
        r = await raw_get(h.app, "/p", [host, (b"accept", b"a"), (b"accept", b"b")])
        assert r["headers"]["x-cache"] == "HIT"


# -- the byte budget ------------------------------------------------------------------------


@pytest.mark.parametrize("url_len", [40, 1800])
async def test_max_bytes_bounds_what_the_process_holds(url_len: int) -> None:
    """Keys, ghosts and per-entry objects count: traced growth stays within 1.5x max_bytes
    (the old accounting counted bodies and headers only: 2.7x at 40-byte URLs, 6.5x at
    1.8 KB; benchmarks/cache_memory.py measures RSS at 100,000 URLs)."""
    import gc
    import tracemalloc

    budget = 1 << 20
    n = Counter()
    cfg = config(max_bytes=budget, max_entries=1_000_000, max_entry_bytes=budget)
    async with serve(app_with(n, **{"{rest:path}": CACHEABLE}), config=cfg) as h:
        host = [(b"host", b"testserver")]
        for i in range(50):  # warm up what any request allocates once
            await raw_get(h.app, f"/warm/{i}", host)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(3000):
                head = f"/v/{i:06d}/"
                await raw_get(h.app, head + "a" * max(url_len - len(head), 0), host)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        mem = h.host.get_plugin("cache").cache.memory
        assert grown <= 1.5 * budget, f"{grown / budget:.2f}x max_bytes"
        assert mem.bytes <= budget and mem.evictions > 0
