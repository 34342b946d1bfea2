"""The `stats` plugin: ``/overdrive/stats`` (JSON) and the live dashboard at ``/overdrive/``.

Off unless enabled, and then protected by a token from configuration unless
``public = true`` is said explicitly; enabled with neither, it stays off (the
app answers those paths, usually 404) and says so in a warning at startup. The token may come as
``Authorization: Bearer <token>``, as ``?token=<token>`` (the dashboard's
first load; the answer sets an HttpOnly cookie so that the page's own requests
need no token in the URL) or as that cookie. Tokens are compared as SHA-256
digests with `hmac.compare_digest`, so neither the content nor the length of
the configured token shows in the timing. A refused request gets 401 (or 404
with ``hide = true``) and never any figures.

The page, its script and its styles ship in the wheel
(`overdrive.contrib.dashboard`) and are read once at startup.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import structlog
from starlette.responses import Response

from overdrive import ConfigError, Plugin, hookimpl

from .profiler.requests import RouteName

__all__ = ["StatsPlugin", "json_safe"]

logger = structlog.get_logger("overdrive.stats")

_COOKIE = "overdrive_token"
_NO_STORE = {"cache-control": "no-store"}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None and unknown objects as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _digest(value: str | bytes) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return hashlib.sha256(value).digest()


class StatsPlugin(Plugin):
    """Serves `host.get_system_stats()` as JSON and the dashboard that charts it."""

    name: ClassVar[str] = "stats"

    @dataclass
    class Settings:
        path: str = "/overdrive"  # the stats live at {path}/stats, the dashboard at {path}/
        token: str | None = None  # required unless public
        public: bool = False  # serve without a token (only behind your own auth!)
        dashboard: bool = True
        hide: bool = False  # answer 404 instead of 401 when the token is missing or wrong
        refresh_seconds: float = 2.0  # how often the dashboard polls
        history: int = 300  # points the dashboard keeps per chart
        # The app's own paths that need the same token (its stats route): refused
        # without it, passed to the app with it.
        protect: list[str] = field(default_factory=list)

        def __post_init__(self) -> None:
            if not self.path.startswith("/") or (self.path != "/" and self.path.endswith("/")):
                raise ConfigError(
                    f"stats.path: expected '/name' without a trailing slash, got {self.path!r}"
                )
            if self.token is not None and len(self.token) < 8:
                raise ConfigError("stats.token: expected at least 8 characters")
            for path in self.protect:
                if not isinstance(path, str) or not path.startswith("/"):
                    raise ConfigError(f"stats.protect: expected paths '/...', got {path!r}")
            if self.refresh_seconds <= 0:
                raise ConfigError(
                    f"stats.refresh_seconds: expected > 0, got {self.refresh_seconds}"
                )

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s = self.settings
        if s is None:
            s = self.settings = self.Settings()
        # Enabled without a token (and not public): serve nothing at all, say so once.
        self._off = s.token is None and not s.public
        if self._off:
            logger.warning(
                "stats: no stats.token set and stats.public is false; "
                "the stats endpoint and the dashboard stay off"
            )
        prefix = "" if s.path == "/" else s.path
        self._host = host
        self._prefix = prefix
        self._stats_path = prefix + "/stats"
        self._page_path = prefix + "/"
        self._static = prefix + "/static/"
        self._token = _digest(s.token) if s.token is not None else None
        self._denied = 404 if s.hide else 401
        self._protect = frozenset(s.protect)
        self._routes = {
            "stats": RouteName(self._stats_path),
            "page": RouteName(self._page_path),
            "asset": RouteName(self._static + "{name}"),
        }
        self._assets: dict[str, tuple[bytes, str]] = {}
        if s.dashboard:
            from overdrive.contrib.dashboard import ASSETS, read_asset

            for name in ASSETS:
                suffix = name[name.rfind(".") :]
                self._assets[name] = (read_asset(name), _TYPES.get(suffix, "text/plain"))
            config = json.dumps(
                {"stats": self._stats_path, "refresh": s.refresh_seconds, "history": s.history}
            ).replace("<", "\\u003c")
            page, media = self._assets["index.html"]
            self._page = (page.replace(b"__OVERDRIVE_CONFIG__", config.encode()), media)

    # -- auth ---------------------------------------------------------------------

    def _given_token(self, ctx: Any) -> tuple[str | None, bool]:
        """(the token the request carries, whether it came in the query string)."""
        auth = ctx.get_header("authorization")
        if auth and auth[:7].lower() == "bearer ":
            return auth[7:].strip(), False
        qs = ctx.query_string
        if qs and b"token=" in qs:
            for key, value in parse_qsl(qs.decode("latin-1")):
                if key == "token":
                    return value, True
        cookie = ctx.get_header("cookie")
        if cookie and _COOKIE in cookie:
            try:
                morsel = SimpleCookie(cookie).get(_COOKIE)
            except CookieError:
                morsel = None
            if morsel is not None:
                return morsel.value, False  # unquoted, as set_cookie quoted it
        return None, False

    def _allowed(self, given: str | None) -> bool:
        if self._token is None:
            return True
        # Always compare a digest, also without a token: same work either way.
        return hmac.compare_digest(_digest(given or ""), self._token) and given is not None

    def _refuse(self) -> Response:
        if self._denied == 404:
            return Response(b"Not Found", 404, media_type="text/plain")
        return Response(
            b"Unauthorized: pass the stats token (Authorization: Bearer ...)",
            401,
            media_type="text/plain",
            headers={"www-authenticate": 'Bearer realm="overdrive"'},
        )

    # -- serving -----------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def before_request(self, ctx: Any) -> Any:
        path = ctx.path
        if self._protect and path in self._protect:
            # The app answers; only a request with the token reaches it. Off (no token,
            # not public) refuses too: a protected path never opens by misconfiguration.
            if self._off or not self._allowed(self._given_token(ctx)[0]):
                return self._refuse()
            return None
        if not path.startswith(self._prefix) or self._off:
            return None
        if path == self._stats_path:
            kind = "stats"
        elif self._assets and (path == self._page_path or path == self._prefix):
            kind = "page"
        elif self._assets and path.startswith(self._static) and path[len(self._static) :]:
            kind = "asset"
        else:
            return None
        ctx.scope["route"] = self._routes[kind]
        if ctx.method not in ("GET", "HEAD"):
            return Response(b"Method Not Allowed", 405, headers={"allow": "GET, HEAD"})
        given, from_query = self._given_token(ctx)
        if not self._allowed(given):
            return self._refuse()
        if kind == "stats":
            return _StatsResponse(self._host)
        if kind == "page":
            if path == self._prefix:
                return Response(status_code=307, headers={"location": self._page_path})
            body, media = self._page
            response = Response(body, 200, media_type=media, headers=_NO_STORE)
            if from_query and given is not None:
                response.set_cookie(
                    _COOKIE,
                    given,
                    path=self._prefix or "/",
                    httponly=True,
                    samesite="strict",
                    secure=ctx.scope.get("scheme") == "https",
                )
            return response
        asset = self._assets.get(path[len(self._static) :])
        if asset is None:
            return Response(b"Not Found", 404, media_type="text/plain")
        return Response(asset[0], 200, media_type=asset[1], headers=_NO_STORE)


class _StatsResponse:
    """Gathers the figures when the middleware runs it, then answers JSON."""

    __slots__ = ("host",)

    def __init__(self, host: Any) -> None:
        self.host = host

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stats = await self.host.get_system_stats()
        try:
            body = json.dumps(stats, allow_nan=False).encode()
        except (TypeError, ValueError):
            body = json.dumps(json_safe(stats)).encode()
        await Response(body, 200, media_type="application/json", headers=_NO_STORE)(
            scope, receive, send
        )
