"""Fuzzing the HTTP cache through the middleware: whatever the headers, never a wrong answer.

Hypothesis draws, per case, how the app answers each path (status,
``Cache-Control``, ``Vary``, ``ETag``, ``Set-Cookie``) and a sequence of
requests with arbitrary ``Cache-Control``, ``Range``, ``If-None-Match``,
``Authorization``, ``Cookie`` and varied headers. The app's body changes on
every call, so a stale or mixed-up answer cannot pass by luck.

Properties, for each request:

* when the app ran, the client got exactly the app's bytes;
* when the app did not run (served from the cache), the body is byte-identical
  to what the app produced earlier for an equivalent request (same URL, same
  values of the headers its ``Vary`` names), or, for a 206, a slice of it, or,
  for a 304, empty;
* nothing private was ever served from the cache: no response with
  ``Set-Cookie``, ``private`` or ``no-store``, no ``Vary: *``, never to a request
  carrying ``Authorization`` or ``Cookie``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from overdrive.contrib.testing import make_host
from overdrive.middleware import OverdriveMiddleware
from tests.hardening.profiles import FUZZ

cache_mod = pytest.importorskip("overdrive.plugins.cache")

Message = dict[str, Any]
PATHS = ["/p0", "/p1", "/p2"]
VARIED = ["accept-language", "x-variant"]


@dataclass(frozen=True)
class Policy:
    """How the app answers one path."""

    status: int
    cache_control: bytes | None
    vary: bytes | None
    etag: bytes | None
    set_cookie: bool


@dataclass(frozen=True)
class Req:
    path: str
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    method: str


@dataclass
class Produced:
    req: Req
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    scope_id: int  # the request it answered (a background revalidation has its own)


policies = st.builds(
    Policy,
    status=st.sampled_from([200, 200, 200, 404, 203]),
    cache_control=st.one_of(
        st.sampled_from(
            [
                None,
                b"max-age=60",
                b"public, max-age=60",
                b"s-maxage=60",
                b"no-store",
                b"private, max-age=60",
                b"no-cache",
                b"max-age=0",
                b"max-age=60, must-revalidate",
                b"max-age=1, stale-while-revalidate=60",
                b"max-age=-5",
                b"max-age=99999999999999999999",
                b'max-age="60"',
                b"no-cache=set-cookie, max-age=60",
            ]
        ),
        st.binary(max_size=30),
    ),
    vary=st.sampled_from(
        [None, None, b"accept-language", b"x-variant", b"Accept-Language, X-Variant", b"*", b""]
    ),
    etag=st.sampled_from([None, b'"v1"', b'W/"weak"', b"unquoted"]),
    set_cookie=st.booleans(),
)

request_headers = st.lists(
    st.one_of(
        st.tuples(
            st.just(b"cache-control"),
            st.one_of(
                st.sampled_from(
                    [
                        b"no-cache",
                        b"no-store",
                        b"max-age=0",
                        b"max-age=5",
                        b"only-if-cached",
                        b"max-stale",
                        b"min-fresh=10",
                    ]
                ),
                st.binary(max_size=20),
            ),
        ),
        st.tuples(
            st.just(b"range"),
            st.one_of(
                st.sampled_from(
                    [
                        b"bytes=0-3",
                        b"bytes=2-",
                        b"bytes=-2",
                        b"bytes=5-1",
                        b"bytes=0-0,2-3",
                        b"bytes=100-200",
                        b"items=0-1",
                    ]
                ),
                st.binary(max_size=20),
            ),
        ),
        st.tuples(
            st.just(b"if-none-match"),
            st.sampled_from([b"*", b'"v1"', b'W/"weak"', b'"other", "v1"', b"garbage"]),
        ),
        st.tuples(st.just(b"if-range"), st.sampled_from([b'"v1"', b'W/"weak"', b"garbage"])),
        st.tuples(st.just(b"accept-language"), st.sampled_from([b"en", b"fr", b"EN", b""])),
        st.tuples(st.just(b"x-variant"), st.sampled_from([b"a", b"b"])),
        st.tuples(st.just(b"authorization"), st.sampled_from([b"Bearer u1", b"Bearer u2"])),
        st.tuples(st.just(b"cookie"), st.sampled_from([b"session=u1", b"session=u2"])),
        st.tuples(st.just(b"pragma"), st.just(b"no-cache")),
    ),
    max_size=4,
)
requests = st.lists(
    st.builds(
        Req,
        path=st.sampled_from(PATHS),
        query=st.sampled_from([b"", b"", b"a=1", b"a=1&b=2", b"b=2&a=1"]),
        headers=request_headers.map(tuple),
        method=st.sampled_from(["GET", "GET", "GET", "HEAD"]),
    ),
    min_size=1,
    max_size=12,
)


KEEP_ALIVE: list[Any] = []
REQUEST_IDS = itertools.count(1)


class App:
    """Answers per its drawn policies; the body changes on every call."""

    def __init__(self, policy_of: dict[str, Policy]) -> None:
        self.policy_of = policy_of
        self.calls = itertools.count(1)
        self.produced: list[Produced] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        n = next(self.calls)
        policy = self.policy_of[scope["path"]]
        req_headers = dict(scope["headers"])
        body = b"%s call %d lang=%s variant=%s" % (
            scope["path"].encode(),
            n,
            req_headers.get(b"accept-language", b"-"),
            req_headers.get(b"x-variant", b"-"),
        )
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        if policy.cache_control is not None:
            headers.append((b"cache-control", policy.cache_control))
        if policy.vary is not None:
            headers.append((b"vary", policy.vary))
        if policy.etag is not None:
            headers.append((b"etag", policy.etag))
        if policy.set_cookie:
            headers.append((b"set-cookie", b"session=%d" % n))
        req = Req(scope["path"], scope["query_string"], tuple(scope["headers"]), scope["method"])
        # Which request this answers: a marker in the scope, kept when the cache calls
        # the app with a copy of it for the request (a conditional request to revalidate
        # a stale entry); a background refresh (its own receive) answers none.
        mine = inspect.unwrap(receive) is scope["fuzz.receive"]  # the middleware may wrap it
        marker = scope["fuzz.request"] if mine else -n
        self.produced.append(Produced(req, policy.status, headers, body, marker))
        await send({"type": "http.response.start", "status": policy.status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )


def header(headers: Any, name: bytes) -> bytes | None:
    values = [v for k, v in headers if k.lower() == name]
    return b", ".join(values) if values else None


def vary_names(produced: Produced) -> list[str]:
    raw = header(produced.headers, b"vary") or b""
    return [n.strip().lower() for n in raw.decode("latin-1").split(",") if n.strip()]


def joined(req: Req, name: str) -> bytes | None:
    return header(req.headers, name.encode())


def same_query(a: bytes, b: bytes) -> bool:
    """The cache keys on the sorted query parameters (their order carries no meaning)."""
    return sorted(a.split(b"&")) == sorted(b.split(b"&"))


def vary_value(req: Req, name: str) -> bytes | None:
    """The value the cache's secondary key sees: whitespace runs folded (RFC 9111 4.1
    allows that normalisation); an absent header is not an empty one.
    """
    value = joined(req, name)
    return None if value is None else b" ".join(value.split())


def equivalent(earlier: Produced, req: Req) -> bool:
    if earlier.req.path != req.path or not same_query(earlier.req.query, req.query):
        return False
    return all(vary_value(earlier.req, n) == vary_value(req, n) for n in vary_names(earlier))


def private(produced: Produced) -> bool:
    cc = (header(produced.headers, b"cache-control") or b"").lower()
    return (
        header(produced.headers, b"set-cookie") is not None
        or b"private" in cc
        or b"no-store" in cc
        or b"*" in (header(produced.headers, b"vary") or b"")
    )


async def send_request(app: Any, req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes, int]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": req.path,
        "raw_path": req.path.encode(),
        "query_string": req.query,
        "root_path": "",
        "headers": [(b"host", b"testserver"), *req.headers],
        "fuzz.request": next(REQUEST_IDS),
        "fuzz.receive": receive,
    }
    await app(scope, receive, send)
    assert sent and sent[0]["type"] == "http.response.start", sent
    assert not sent[-1].get("more_body", False), sent
    body = b"".join(m.get("body", b"") for m in sent[1:])
    KEEP_ALIVE.append(scope)  # so that no later scope reuses its id
    return sent[0]["status"], sent[0]["headers"], body, scope["fuzz.request"]


def check_from_cache(
    req: Req, status: int, headers: list[tuple[bytes, bytes]], body: bytes, app: App
) -> None:
    """The app did not run for `req`: the answer must come from an equivalent earlier one."""
    assert joined(req, "authorization") is None, "a request with Authorization served from cache"
    assert joined(req, "cookie") is None, "a request with Cookie served from cache"
    candidates = [p for p in app.produced if equivalent(p, req)]
    assert candidates, f"served {status} from cache with no equivalent app response"
    for earlier in candidates:
        if status in (304, 416):
            ok = (status == 304 and body == b"") or status == 416
        elif req.method == "HEAD":  # headers only, whole (200) or ranged (206)
            ok = body == b"" and status in (earlier.status, 206)
        elif status == 206:
            ok = body != b"" and body in earlier.body
        else:
            ok = (status, body) == (earlier.status, earlier.body)
        if ok:
            assert not private(earlier), f"a private response was served from cache: {earlier}"
            return
    raise AssertionError(
        f"served from cache {status} {body!r}; the app produced for equivalent requests: "
        f"{[(p.status, p.body) for p in candidates]}"
    )


async def run_case(policy_of: dict[str, Policy], reqs: list[Req], default_ttl: int | None) -> None:
    app = App(policy_of)
    config: dict[str, Any] = {"cache": {"default_ttl": default_ttl}}
    host = make_host(cache_mod.CachePlugin(), config=config)
    wrapped = OverdriveMiddleware(app, host=host)
    await host.initialize()
    try:
        for req in reqs:
            status, headers, body, scope_id = await send_request(wrapped, req)
            ran = [p for p in app.produced if p.scope_id == scope_id]
            if ran:
                produced = ran[0]
                if status not in (206, 304, 412, 416):
                    assert status == produced.status
                    expected = b"" if req.method == "HEAD" else produced.body
                    assert body == expected, (body, expected)
            else:
                check_from_cache(req, status, headers, body, app)
    finally:
        await host.cleanup()
        KEEP_ALIVE.clear()


@pytest.fixture(autouse=True)
def _quiet_logs() -> Any:
    import logging

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield
    structlog.configure(**saved)


@FUZZ
@given(
    policy_of=st.fixed_dictionaries({p: policies for p in PATHS}),
    reqs=requests,
    default_ttl=st.sampled_from([None, 30]),
)
def test_cache_never_serves_a_wrong_answer(
    policy_of: dict[str, Policy], reqs: list[Req], default_ttl: int | None
) -> None:
    asyncio.run(run_case(policy_of, reqs, default_ttl))


def test_cache_vary_absent_is_not_empty() -> None:
    """RFC 9111 4.1: a stored response keyed on an absent header is not served to a
    request that sends the header empty."""
    policy = Policy(200, b"max-age=60", b"accept-language", None, False)
    policy_of = dict.fromkeys(PATHS, policy)
    absent = Req("/p0", b"", (), "GET")
    empty = Req("/p0", b"", ((b"accept-language", b""),), "GET")

    async def run() -> list[bytes]:
        app = App(policy_of)
        host = make_host(cache_mod.CachePlugin())
        wrapped = OverdriveMiddleware(app, host=host)
        await host.initialize()
        try:
            return [(await send_request(wrapped, r))[2] for r in (absent, empty)]
        finally:
            await host.cleanup()

    first, second = asyncio.run(run())
    assert second != first  # the app's answer for an empty Accept-Language, not the stored one
