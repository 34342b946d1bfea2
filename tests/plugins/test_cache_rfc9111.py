"""The `cache` plugin against RFC 9111 where the public suite (benchmarks/cachetests.py)
found it wrong: Expires and Age parsing, the age clock, revalidation with conditional
requests, invalidation by unsafe methods, status codes, Connection-listed fields,
single-flight answers, targeted cache control (RFC 9213). Each test is what a client
sees through the middleware.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from overdrive.contrib.testing import serve
from tests.plugins.test_cache_async import until


def http_date(when: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(when))


class Origin:
    """One route, /r, answering with `headers` (a dict, or a callable(request, n));
    `conditional` records the validators each request carried."""

    def __init__(self, headers: Any, status: int = 200) -> None:
        self.headers = headers
        self.status = status
        self.calls = 0
        self.conditional: list[tuple[str | None, str | None]] = []
        self.not_modified: dict[str, str] | None = None  # answer 304 with these, when asked

    def app(self) -> Starlette:
        async def handler(request: Request) -> Response:
            self.calls += 1
            inm = request.headers.get("if-none-match")
            ims = request.headers.get("if-modified-since")
            self.conditional.append((inm, ims))
            if (inm or ims) and self.not_modified is not None:
                return Response(status_code=304, headers=self.not_modified)
            headers = self.headers(request, self.calls) if callable(self.headers) else self.headers
            return Response(f"v{self.calls}", status_code=self.status, headers=headers)

        return Starlette(
            routes=[Route("/r", handler, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])]
        )


def config(**settings: Any) -> dict[str, Any]:
    return {"plugins": ["cache"], "cache": settings}


async def two_gets(origin: Origin, **settings: Any) -> tuple[Any, Any]:
    async with serve(origin.app(), config=config(**settings)) as h:
        return await h.client.get("/r"), await h.client.get("/r")


def raw_headers_app(origin: Origin, extra: list[tuple[bytes, bytes]]) -> Any:
    app = origin.app()

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def add(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], *extra]
            await send(message)

        await app(scope, receive, add)

    return wrapped


# -- Expires: an invalid date is in the past (RFC 9111 5.3, RFC 9110 5.6.7) ------------------

INVALID_EXPIRES = [
    "Thu, 18 Aug 2050 02:01:18 UTC",
    "Thu, 18 Aug 2050 02:01:18 AEST",
    "Thu, 18 Aug 50 02:01:18 GMT",
    "Thu 18 Aug 2050 02:01:18 GMT",
    "Thu, 18  Aug  2050 02:01:18 GMT",
    "Thu, 18-Aug-2050 02:01:18 GMT",
    "Thu, 18 Aug 2050 02.01.18 GMT",
    "Thu, 18 Aug 2050 2:01:18 GMT",
    "next year",
]
VALID_EXPIRES = [
    "Thu, 18 Aug 2050 02:01:18 GMT",  # IMF-fixdate
    "Thursday, 18-Aug-50 02:01:18 GMT",  # obsolete RFC 850: 2050, not 1950
    "Thu Aug  8 02:01:18 2050",  # asctime
    "THU, 18 AUG 2050 02:01:18 gmt",  # names are case-insensitive
]


@pytest.mark.parametrize("expires", INVALID_EXPIRES)
async def test_an_invalid_expires_is_not_served_from_cache(expires: str) -> None:
    origin = Origin({"expires": expires})
    _, second = await two_gets(origin)
    assert second.headers["x-cache"] == "MISS" and second.text == "v2"


@pytest.mark.parametrize("expires", VALID_EXPIRES)
async def test_every_http_date_form_is_understood(expires: str) -> None:
    origin = Origin({"expires": expires})
    _, second = await two_gets(origin)
    assert second.headers["x-cache"] == "HIT" and second.text == "v1"


async def test_several_expires_lines_are_invalid() -> None:
    origin = Origin({})
    lines = [(b"expires", b"Thu, 18 Aug 2050 02:01:19 GMT")] * 2
    async with serve(raw_headers_app(origin, lines), config=config()) as h:
        await h.client.get("/r")
        second = await h.client.get("/r")
    assert second.headers["x-cache"] == "MISS" and second.text == "v2"


# -- Age: the first line's value, and the age clock (RFC 9111 4.2.3) ---------------------------


@pytest.mark.parametrize(
    ("ages", "cached"),
    [
        ([b"7200", b"0"], False),  # the first line counts, not the last
        ([b"0", b"7200"], True),
        ([b"7200, 0"], False),  # a list: its first member
        ([b"0, 7200"], True),
    ],
)
async def test_the_first_age_is_the_age(ages: list[bytes], cached: bool) -> None:
    origin = Origin({"cache-control": "max-age=3600"})
    app = raw_headers_app(origin, [(b"age", a) for a in ages])
    async with serve(app, config=config()) as h:
        await h.client.get("/r")
        second = await h.client.get("/r")
    assert (second.headers["x-cache"] == "HIT") is cached


async def test_a_date_in_the_past_counts_in_the_age() -> None:
    # Apparent age: the response says it was made 100 s ago, so max-age=60 has run out...
    old = Origin({"cache-control": "max-age=60", "date": http_date(time.time() - 100)})
    _, second = await two_gets(old)
    assert second.headers["x-cache"] == "MISS"
    # ...and with max-age=3600 the hit's Age says how old it is.
    fresh = Origin({"cache-control": "max-age=3600", "date": http_date(time.time() - 100)})
    _, second = await two_gets(fresh)
    assert second.headers["x-cache"] == "HIT" and int(second.headers["age"]) >= 99


# -- revalidation: conditional requests, 304 renews the stored response (RFC 9111 4.3) --------


async def test_a_stale_entry_is_revalidated_with_its_etag_and_a_304_renews_it() -> None:
    origin = Origin({"cache-control": "max-age=0", "etag": '"abc"', "x-version": "1"})
    origin.not_modified = {"etag": '"abc"', "x-version": "2", "cache-control": "max-age=3600"}
    async with serve(origin.app(), config=config()) as h:
        first = await h.client.get("/r")
        second = await h.client.get("/r")
        third = await h.client.get("/r")
    assert first.text == "v1" and origin.conditional[0] == (None, None)
    assert origin.conditional[1] == ('"abc"', None)  # asked: has it changed?
    # The 304 has no body: the client gets the stored one, with the 304's headers.
    assert second.status_code == 200 and second.text == "v1"
    assert second.headers["x-version"] == "2" and second.headers["x-cache"] == "HIT"
    # The 304's max-age=3600 made it fresh: no further call.
    assert third.headers["x-cache"] == "HIT" and origin.calls == 2


async def test_last_modified_is_sent_as_if_modified_since() -> None:
    lm = http_date(time.time() - 3600)
    origin = Origin({"cache-control": "max-age=0", "last-modified": lm})
    origin.not_modified = {}
    async with serve(origin.app(), config=config()) as h:
        await h.client.get("/r")
        second = await h.client.get("/r")
    assert origin.conditional[1] == (None, lm)
    assert second.status_code == 200 and second.text == "v1"


async def test_a_changed_resource_is_served_and_stored() -> None:
    origin = Origin(lambda request, n: {"cache-control": "max-age=0", "etag": f'"e{n}"'})
    async with serve(origin.app(), config=config()) as h:
        await h.client.get("/r")
        second = await h.client.get("/r")  # the app answers 200: a new version
        third = await h.client.get("/r")
    assert second.text == "v2" and second.headers["x-cache"] == "MISS"
    assert origin.conditional[2] == ('"e2"', None)  # the new version's validator was kept
    assert third.text == "v3"


async def test_no_cache_responses_are_stored_and_revalidated_every_time() -> None:
    origin = Origin({"cache-control": "no-cache", "etag": '"n"'})
    origin.not_modified = {"etag": '"n"'}
    async with serve(origin.app(), config=config()) as h:
        responses = [await h.client.get("/r") for _ in range(3)]
    assert [r.text for r in responses] == ["v1", "v1", "v1"]
    assert origin.conditional == [(None, None), ('"n"', None), ('"n"', None)]


async def test_the_cache_never_sends_the_etag_it_made_up() -> None:
    # No validator from the app: the cache's own ETag (for its clients) is not the app's.
    origin = Origin({"cache-control": "max-age=0"})
    async with serve(origin.app(), config=config(default_ttl=60)) as h:
        await h.client.get("/r")
        await h.client.get("/r")
    assert origin.conditional == [(None, None), (None, None)]


async def test_must_revalidate_is_never_served_stale_on_error() -> None:
    calls = 0

    async def handler(request: Request) -> Response:
        nonlocal calls
        calls += 1
        if calls > 1:
            return Response("down", status_code=503)
        cc = "max-age=0, must-revalidate, stale-if-error=600"
        return Response("v1", headers={"cache-control": cc, "etag": '"m"'})

    app = Starlette(routes=[Route("/r", handler)])
    async with serve(app, config=config(stale_if_error=600)) as h:
        await h.client.get("/r")
        second = await h.client.get("/r")
    assert second.status_code == 503 and second.text == "down"


async def test_stale_if_error_answers_when_the_revalidation_fails() -> None:
    calls = 0

    async def handler(request: Request) -> Response:
        nonlocal calls
        calls += 1
        if calls > 1:
            return Response("down", status_code=503)
        return Response("v1", headers={"cache-control": "max-age=0, stale-if-error=600",
                                       "etag": '"s"'})  # fmt: skip

    app = Starlette(routes=[Route("/r", handler)])
    async with serve(app, config=config()) as h:
        await h.client.get("/r")
        second = await h.client.get("/r")
    assert second.status_code == 200 and second.text == "v1"
    assert second.headers["x-cache"] == "STALE"


async def test_a_304_renews_the_entry_for_other_workers(redis_url: str, namespace: str) -> None:
    origin = Origin({"cache-control": "max-age=0", "etag": '"w"'})
    origin.not_modified = {"etag": '"w"', "cache-control": "max-age=3600", "x-renewed": "1"}
    cfg = config(redis_url=redis_url, namespace=namespace)
    async with serve(origin.app(), config=cfg) as a, serve(origin.app(), config=cfg) as b:
        await a.client.get("/r")  # stored, stale at once, in a's memory and Redis
        await b.client.get("/r")  # b revalidates: 304, renewed in Redis
        # a's memory copy is stale: it looks in Redis before asking the app again.
        third = await a.client.get("/r")
        await a.host.cache.clear()
    assert third.headers["x-cache"] == "HIT" and third.headers["x-renewed"] == "1"
    assert origin.calls == 2


# -- invalidation by unsafe methods (RFC 9111 4.4) -----------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_an_unsafe_method_invalidates_the_target(method: str) -> None:
    origin = Origin({"cache-control": "max-age=3600"})
    async with serve(origin.app(), config=config()) as h:
        assert (await h.client.get("/r")).text == "v1"
        assert (await h.client.get("/r")).headers["x-cache"] == "HIT"
        await h.client.request(method, "/r")
        after = await h.client.get("/r")
    assert after.headers["x-cache"] == "MISS" and after.text == "v3"


async def test_location_and_content_location_are_invalidated_on_the_same_origin_only() -> None:
    calls: dict[str, int] = {}

    async def page(request: Request) -> Response:
        calls[request.url.path] = calls.get(request.url.path, 0) + 1
        return Response(f"{request.url.path} {calls[request.url.path]}",
                        headers={"cache-control": "max-age=3600"})  # fmt: skip

    async def post(request: Request) -> Response:
        return Response(status_code=201, headers={
            "location": "/a",
            "content-location": "http://testserver/b",
            "link": "</c>",
        })  # fmt: skip

    async def elsewhere(request: Request) -> Response:
        return Response(status_code=201, headers={"location": "http://other.example/c"})

    app = Starlette(routes=[
        Route("/a", page), Route("/b", page), Route("/c", page),
        Route("/post", post, methods=["POST"]), Route("/other", elsewhere, methods=["POST"]),
    ])  # fmt: skip
    async with serve(app, config=config()) as h:
        for path in ("/a", "/b", "/c"):
            await h.client.get(path)
        await h.client.post("/post")
        await h.client.post("/other")  # another origin's /c: not ours to drop
        texts = {p: (await h.client.get(p)).text for p in ("/a", "/b", "/c")}
    assert texts == {"/a": "/a 2", "/b": "/b 2", "/c": "/c 1"}


async def test_an_unsafe_method_invalidates_on_every_worker(redis_url: str, namespace: str) -> None:
    origin = Origin({"cache-control": "max-age=3600"})
    cfg = config(redis_url=redis_url, namespace=namespace)
    async with serve(origin.app(), config=cfg) as a, serve(origin.app(), config=cfg) as b:
        await a.client.get("/r")
        assert (await b.client.get("/r")).headers["x-cache"] == "HIT"  # now in b's memory
        await a.client.put("/r")
        assert await until(lambda: len(b.host.cache.memory) == 0)
        after = await b.client.get("/r")
        await a.host.cache.clear()
    assert after.headers["x-cache"] == "MISS" and after.text == "v3"


# -- status codes (RFC 9111 3) ---------------------------------------------------------------


@pytest.mark.parametrize("status", [302, 307, 400, 500, 503, 599])
async def test_any_status_with_explicit_freshness_is_stored(status: int) -> None:
    origin = Origin({"cache-control": "max-age=3600"}, status=status)
    _, second = await two_gets(origin)
    assert second.status_code == status and second.headers["x-cache"] == "HIT"


async def test_must_understand_stores_only_statuses_it_knows() -> None:
    cc = {"cache-control": "max-age=3600, no-store, must-understand"}
    _, known = await two_gets(Origin(cc, status=200))
    _, unknown = await two_gets(Origin(cc, status=599))
    assert known.headers["x-cache"] == "HIT" and unknown.headers["x-cache"] == "MISS"


async def test_a_status_without_freshness_needs_to_be_heuristically_cacheable() -> None:
    _, second = await two_gets(Origin({}, status=302), default_ttl=60)
    assert second.headers["x-cache"] == "MISS"
    _, second = await two_gets(Origin({}, status=404), default_ttl=60)
    assert second.headers["x-cache"] == "HIT"


# -- Connection-listed fields are this hop's (RFC 9111 3.1) ----------------------------------


async def test_fields_listed_in_connection_are_not_replayed() -> None:
    origin = Origin({"cache-control": "max-age=3600", "connection": "x-hop, x-other",
                     "x-hop": "1", "x-other": "2", "x-kept": "3"})  # fmt: skip
    _, second = await two_gets(origin)
    assert second.headers["x-cache"] == "HIT"
    assert "x-hop" not in second.headers and "x-other" not in second.headers
    assert second.headers["x-kept"] == "3"


# -- single flight: a waiting request never gets a response stale on arrival ------------------


def collapsed(h: Any) -> int:
    """How many requests joined another's flight so far."""
    return int(h.host.plugins["cache"].obj.counts["collapsed"])


def gated_app(headers: dict[str, str]) -> tuple[Starlette, asyncio.Event, list[int]]:
    gate = asyncio.Event()
    calls: list[int] = []

    async def handler(request: Request) -> Response:
        calls.append(1)
        await gate.wait()
        return Response(f"v{len(calls)}", headers=headers)

    return Starlette(routes=[Route("/r", handler)]), gate, calls


async def test_followers_do_not_get_a_response_stale_on_arrival() -> None:
    app, gate, calls = gated_app({"cache-control": "max-age=10", "age": "100"})
    async with serve(app, config=config()) as h:
        pending = [asyncio.ensure_future(h.client.get("/r")) for _ in range(3)]
        assert await until(lambda: len(calls) >= 1 and collapsed(h) >= 2)
        gate.set()
        responses = await asyncio.gather(*pending)
    assert len(calls) == 3  # each asked the app: what the first got was already stale
    assert all(r.headers["x-cache"] == "MISS" for r in responses)


async def test_followers_get_the_age_of_what_they_share() -> None:
    app, gate, calls = gated_app({"cache-control": "max-age=3600", "age": "30"})
    async with serve(app, config=config()) as h:
        pending = [asyncio.ensure_future(h.client.get("/r")) for _ in range(3)]
        assert await until(lambda: len(calls) >= 1 and collapsed(h) >= 2)
        gate.set()
        responses = await asyncio.gather(*pending)
    assert len(calls) == 1
    hits = [r for r in responses if r.headers["x-cache"] == "HIT"]
    assert len(hits) == 2 and all(int(r.headers["age"]) >= 30 for r in hits)


# -- targeted cache control (RFC 9213) -------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "cached"),
    [
        ({"cache-control": "no-store", "cdn-cache-control": "max-age=3600"}, True),
        ({"cache-control": "max-age=3600", "cdn-cache-control": "no-store"}, False),
        ({"cache-control": "max-age=3600", "cdn-cache-control": "private"}, False),
        ({"cache-control": "max-age=3600", "cdn-cache-control": "max-age=0"}, False),
        # not a valid Structured Field: ignored, Cache-Control decides
        ({"cache-control": "no-store", "cdn-cache-control": "max-age=3600, &&&"}, False),
        ({"cache-control": "max-age=3600", "cdn-cache-control": "max-age =0"}, True),
    ],
)
async def test_cdn_cache_control_overrides_cache_control(
    headers: dict[str, str], cached: bool
) -> None:
    _, second = await two_gets(Origin(headers))
    assert (second.headers["x-cache"] == "HIT") is cached
    assert second.headers["cache-control"] == headers["cache-control"]  # passed on as is


async def test_a_target_name_of_our_own() -> None:
    headers = {"cache-control": "no-store", "overdrive-cache-control": "max-age=3600",
               "cdn-cache-control": "no-store"}  # fmt: skip
    _, default = await two_gets(Origin(headers))
    assert default.headers["x-cache"] == "MISS"  # not a target by default
    targets = ["overdrive-cache-control", "cdn-cache-control"]
    _, ours = await two_gets(Origin(headers), targeted_cache_control=targets)
    assert ours.headers["x-cache"] == "HIT"


def test_a_bad_target_name_stops_startup() -> None:
    from overdrive import ConfigError
    from overdrive.plugins.cache import CacheSettings

    with pytest.raises(ConfigError, match=r"cache\.targeted_cache_control"):
        CacheSettings(targeted_cache_control=["cdn cache control"])


async def test_if_modified_since_is_answered_from_the_date_without_last_modified() -> None:
    origin = Origin({"cache-control": "max-age=3600", "date": http_date(time.time() - 60)})
    async with serve(origin.app(), config=config()) as h:
        await h.client.get("/r")
        later = await h.client.get("/r", headers={"if-modified-since": http_date(time.time())})
        earlier = await h.client.get(
            "/r", headers={"if-modified-since": http_date(time.time() - 3600)}
        )
    assert later.status_code == 304 and earlier.status_code == 200
    assert origin.calls == 1


# -- heuristic freshness (RFC 9111 4.2.2) --------------------------------------------------


def dated(days: float, **extra: str) -> dict[str, str]:
    now = time.time()
    return {"last-modified": http_date(now - days * 86400), "date": http_date(now), **extra}


async def test_last_modified_gives_heuristic_freshness_to_cacheable_statuses() -> None:
    _, ok = await two_gets(Origin(dated(1)))
    assert ok.headers["x-cache"] == "HIT"
    _, not_by_default = await two_gets(Origin(dated(1), status=302))
    assert not_by_default.headers["x-cache"] == "MISS"  # 302 needs explicit freshness
    _, public = await two_gets(Origin(dated(1, **{"cache-control": "public"}), status=599))
    assert public.headers["x-cache"] == "HIT"  # public makes any status heuristic
    _, off = await two_gets(Origin(dated(1)), heuristic_fraction=0)
    assert off.headers["x-cache"] == "MISS"


async def test_heuristic_freshness_is_bounded_by_heuristic_max() -> None:
    # 10% of 100 days would be 10 days; heuristic_max (1 hour) is what it gets, so a
    # response already 2 hours old is stale on arrival.
    _, second = await two_gets(Origin(dated(100, age="7200")))
    assert second.headers["x-cache"] == "MISS"
    _, longer = await two_gets(Origin(dated(100, age="7200")), heuristic_max=86400)
    assert longer.headers["x-cache"] == "HIT"


# -- any event loop ---------------------------------------------------------------------------


async def _revalidation_and_invalidation() -> None:
    origin = Origin({"cache-control": "max-age=0", "etag": '"t"'})
    origin.not_modified = {"etag": '"t"', "cache-control": "max-age=3600"}
    async with serve(origin.app(), config=config()) as h:
        await h.client.get("/r")
        renewed = await h.client.get("/r")
        assert renewed.headers["x-cache"] == "HIT" and renewed.text == "v1"
        await h.client.put("/r")
        origin.not_modified = None
        after = await h.client.get("/r")
        assert after.headers["x-cache"] == "MISS" and after.text == "v4"
        faults = {n: i.last_error for n, i in h.host.plugins.items() if i.errors}
        assert faults == {}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_revalidation_and_invalidation_on_any_event_loop(backend: str) -> None:
    import anyio

    anyio.run(_revalidation_and_invalidation, backend=backend)
