"""Who may scrape, how often, and on which port: the `/metrics` endpoint's guard.

A scrape used to answer any method, anyone, as often as asked, on the app's
own port, ahead of the rate limit and the concurrency limit. Now:

- GET and HEAD only (405 with ``Allow`` otherwise);
- an optional bearer token (``prometheus.token``; Prometheus sends it with
  ``authorization: {credentials: ...}`` in the scrape config), compared as
  SHA-256 digests with `hmac.compare_digest` as the stats plugin does;
- a rate limit of its own (``max_scrapes_per_second``, a token bucket with
  ``scrape_burst``): past it, 429 with ``Retry-After`` and no render;
- or a separate port (``port``), as Prometheus exporters do: a small threaded
  HTTP server (the standard library's wsgiref) beside the app, which asks the
  event loop for the exposition, so the app's port does not serve it at all.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from overdrive.middleware.responses import PlainResponse

__all__ = ["ScrapeGuard", "ScrapeServer"]

_NOT_ALLOWED = PlainResponse(405, b"Method Not Allowed\n", [(b"allow", b"GET, HEAD")])
_UNAUTHORIZED = PlainResponse(
    401,
    b"Unauthorized: pass the scrape token\n",
    [(b"www-authenticate", b'Bearer realm="metrics"')],
)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class ScrapeGuard:
    """Method, token and rate checks for one scrape; thread-safe (the port server uses it)."""

    def __init__(self, token: str | None, per_second: float, burst: int) -> None:
        self._token = _digest(token) if token else None
        self.per_second = per_second
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()
        self.refused = 0  # scrapes answered 429
        self._limited = PlainResponse(
            429, b"Too Many Requests: scrape less often\n", retry_after=math.ceil(1 / per_second)
        )

    def allowed_token(self, authorization: str | None) -> bool:
        if self._token is None:
            return True
        given = ""
        if authorization and authorization[:7].lower() == "bearer ":
            given = authorization[7:].strip()
        # A digest either way: the same work with no token, a wrong one or the right one.
        return hmac.compare_digest(_digest(given), self._token) and bool(given)

    def _take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.per_second)
            self._stamp = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            self.refused += 1
            return False

    def check(self, method: str, authorization: str | None) -> PlainResponse | None:
        """The refusal to answer instead of a scrape, or None to scrape."""
        if method not in ("GET", "HEAD"):
            return _NOT_ALLOWED
        if not self.allowed_token(authorization):
            return _UNAUTHORIZED
        if not self._take():
            return self._limited
        return None


class ScrapeServer:
    """The exposition on a port of its own, served from a thread; renders on the loop."""

    def __init__(
        self,
        render: Callable[[str | None], Any],
        guard: ScrapeGuard,
        address: str,
        port: int,
    ) -> None:
        self.render = render
        self.guard = guard
        self.address = address
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; call from the event loop (its token is taken here)."""
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        import anyio.lowlevel

        token = anyio.lowlevel.current_token()

        class _Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return  # the access log is the app's business, not stderr's

        class _Threading(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            return self._answer(environ, start_response, token)

        self._server = make_server(
            self.address, self.port, app, server_class=_Threading, handler_class=_Quiet
        )
        self.port = self._server.server_port  # port 0: the one the system chose
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="overdrive-metrics", daemon=True
        )
        self._thread.start()

    def _answer(self, environ: dict[str, Any], start_response: Any, token: Any) -> Iterable[bytes]:
        import anyio.from_thread

        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        if path not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not Found\n"]
        refusal = self.guard.check(method, environ.get("HTTP_AUTHORIZATION"))
        if refusal is not None:
            reason = {405: "Method Not Allowed", 401: "Unauthorized", 429: "Too Many Requests"}
            headers = [(k.decode(), v.decode()) for k, v in refusal.headers]
            start_response(f"{refusal.status} {reason[refusal.status]}", headers)
            return [refusal.body]
        body, content_type = anyio.from_thread.run(
            self.render, environ.get("HTTP_ACCEPT"), token=token
        )
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        )
        return [b"" if method == "HEAD" else body]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
