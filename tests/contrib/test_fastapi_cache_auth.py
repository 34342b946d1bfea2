"""A cache hit skips FastAPI's dependencies: what they read is in the key, or startup refuses.

The attack (issue 15): ``Depends(verify_key)`` reading ``X-API-Key`` and
``@policy(cache=...)`` answered 401 without the key, 200 with it, then 200 HIT
with the owner's data without it.
"""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from overdrive.contrib.fastapi import OverdriveContext, policy, reads
from overdrive.contrib.testing import serve

KEYS = {"owner-key": "owner", "other-key": "other"}


def verify_key(x_api_key: Annotated[str | None, Header()] = None) -> str:
    if x_api_key not in KEYS:
        raise HTTPException(401, "bad key")
    return KEYS[x_api_key]


def guarded_app(**cache: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/private")
    @policy(cache={"ttl": 60, **cache})
    async def private(user: Annotated[str, Depends(verify_key)]) -> dict[str, str]:
        return {"data": f"secrets of {user}"}

    return app


async def test_a_hit_never_skips_a_header_dependency() -> None:
    async with serve(guarded_app(), config={"plugins": ["cache"]}) as h:
        assert (await h.client.get("/private")).status_code == 401
        owner = await h.client.get("/private", headers={"x-api-key": "owner-key"})
        assert owner.status_code == 200 and owner.headers["x-cache"] == "MISS"
        anonymous = await h.client.get("/private")
        assert anonymous.status_code == 401 and "owner" not in anonymous.text
        wrong = await h.client.get("/private", headers={"x-api-key": "guess"})
        assert wrong.status_code == 401
        other = await h.client.get("/private", headers={"x-api-key": "other-key"})
        assert other.json() == {"data": "secrets of other"}
        again = await h.client.get("/private", headers={"x-api-key": "owner-key"})
        assert again.headers["x-cache"] == "HIT"
        assert again.json() == {"data": "secrets of owner"}


api_key = APIKeyHeader(name="X-Token", auto_error=False)
bearer = HTTPBearer(auto_error=False)


def by_token(token: Annotated[str | None, Depends(api_key)]) -> str:
    if token != "t1":
        raise HTTPException(403)
    return token


def by_bearer(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    if creds is None or creds.credentials != "b1":
        raise HTTPException(403)
    return creds.credentials


async def verify_request(request: Request) -> None:
    if request.headers.get("x-api-key") != "owner-key":
        raise HTTPException(401)


@reads("x-api-key")
async def verify_declared(request: Request) -> None:
    if request.headers.get("x-api-key") != "owner-key":
        raise HTTPException(401)


async def test_security_schemes_are_keyed() -> None:
    app = FastAPI()

    @app.get("/token")
    @policy(cache={"ttl": 60})
    async def token(t: Annotated[str, Depends(by_token)]) -> str:
        return "token data"

    @app.get("/bearer")
    @policy(cache={"ttl": 60})
    async def bearer_ep(t: Annotated[str, Depends(by_bearer)]) -> str:
        return "bearer data"

    async with serve(app, config={"plugins": ["cache"]}) as h:
        ok = await h.client.get("/token", headers={"x-token": "t1"})
        assert ok.status_code == 200
        assert (await h.client.get("/token")).status_code == 403
        ok = await h.client.get("/bearer", headers={"authorization": "Bearer b1"})
        assert ok.status_code == 200
        hit = await h.client.get("/bearer", headers={"authorization": "Bearer b1"})
        assert hit.headers["x-cache"] == "HIT"  # keyed on Authorization: cached per identity
        assert (await h.client.get("/bearer")).status_code == 403


def opaque_app(**cache: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/opaque")
    @policy(cache={"ttl": 60, **cache})
    async def opaque(_: Annotated[None, Depends(verify_request)]) -> str:
        return "owner data"

    return app


async def test_a_request_taking_dependency_on_a_cached_endpoint_stops_startup() -> None:
    with pytest.raises(
        BaseException, match=r"endpoint opaque .*dependency verify_request takes the Request"
    ):
        async with serve(opaque_app(), config={"plugins": ["cache"]}):
            pass


async def test_reads_declares_what_a_request_taking_dependency_reads() -> None:
    app = FastAPI()

    @app.get("/declared")
    @policy(cache={"ttl": 60})
    async def declared(_: Annotated[None, Depends(verify_declared)], ctx: OverdriveContext) -> str:
        return "owner data"

    async with serve(app, config={"plugins": ["cache"]}) as h:
        assert (await h.client.get("/declared", headers={"x-api-key": "owner-key"})).is_success
        assert (await h.client.get("/declared")).status_code == 401


async def test_trust_dependencies_is_the_explicit_opt_out() -> None:
    async with serve(opaque_app(trust_dependencies=True), config={"plugins": ["cache"]}) as h:
        owner = await h.client.get("/opaque", headers={"x-api-key": "owner-key"})
        assert owner.status_code == 200
        # What the opt-out means: the hit skips the dependency (as documented).
        assert (await h.client.get("/opaque")).headers["x-cache"] == "HIT"


async def test_implicitly_cached_endpoints_are_keyed_or_not_cached() -> None:
    app = FastAPI()

    @app.get("/implicit-header")
    async def implicit_header(user: Annotated[str, Depends(verify_key)]) -> str:
        return f"data of {user}"

    @app.get("/implicit-opaque")
    async def implicit_opaque(_: Annotated[None, Depends(verify_request)]) -> str:
        return "owner data"

    # default_ttl caches every GET without caching headers: both routes would be.
    async with serve(app, config={"plugins": ["cache"], "cache": {"default_ttl": 60}}) as h:
        for path in ("/implicit-header", "/implicit-opaque"):
            assert (await h.client.get(path, headers={"x-api-key": "owner-key"})).is_success
            assert (await h.client.get(path)).status_code == 401
        r = await h.client.get("/implicit-opaque", headers={"x-api-key": "owner-key"})
        assert "x-cache" not in r.headers  # caching off on that route
