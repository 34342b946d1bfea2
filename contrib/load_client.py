"""A keep-alive HTTP/1.1 client for `overdrive load`: asyncio protocols and httptools' parser.

Why our own transport: a load generator slower than the service measures
itself. aiohttp's client costs about 150 us of CPU per request and httpx's more;
on a machine where the client shares cores with the server that caps the rate
far below what wrk reaches (benchmarks/loadgen.py). One connection per client,
one request at a time on it, the response parsed by httptools (the C parser
uvicorn uses): a few tens of microseconds per request. Plain HTTP only; https
URLs go through aiohttp.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = ["FastClient"]


class _Connection(asyncio.Protocol):
    """One connection; `request` sends one request and waits for its whole response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.size = 0
        self.cache: bytes | None = None
        self.keep_alive = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 7 and name.lower() == b"x-cache":
            self.cache = value

    def on_body(self, body: bytes) -> None:
        self.size += len(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def request(self, data: bytes) -> tuple[int, str | None, int]:
        assert self.transport is not None
        self.size = 0
        self.cache = None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        await self.waiter
        status = self.parser.get_status_code()
        return status, None if self.cache is None else self.cache.decode("latin-1"), self.size


class FastClient:
    """The client `run_load` uses for http:// URLs; `request` returns (status, x-cache, bytes)."""

    errors = (OSError, httptools.HttpParserError, TimeoutError)

    def __init__(self, base_url: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.host_header = parts.netloc.encode("latin-1")
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._requests: dict[tuple[str, str, str], bytes] = {}

    async def __aenter__(self) -> FastClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.close()

    def _encode(self, method: str, path: str, body: Any, headers: dict[str, str] | None) -> bytes:
        key = (method, path, jsonlib.dumps(body) if body is not None else "")
        data = self._requests.get(key) if not headers else None
        if data is not None:
            return data
        lines = [f"{method} {self.prefix}{path} HTTP/1.1".encode("latin-1")]
        lines.append(b"host: " + self.host_header)
        payload = b""
        if body is not None:
            payload = jsonlib.dumps(body).encode()
            lines.append(b"content-type: application/json")
        if payload or method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: " + str(len(payload)).encode())
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}".encode("latin-1"))
        data = b"\r\n".join(lines) + b"\r\n\r\n" + payload
        if not headers and len(self._requests) < 100_000:
            self._requests[key] = data
        return data

    async def request(
        self, method: str, path: str, body: Any, headers: dict[str, str] | None
    ) -> tuple[int, str | None, int]:
        data = self._encode(method, path, body, headers)
        conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            loop = asyncio.get_running_loop()
            _, made = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port), self.timeout
            )
            self._all.add(made)
            conn = made
        try:
            async with asyncio.timeout(self.timeout):
                result = await conn.request(data)
        except BaseException:
            if conn.transport is not None:
                conn.transport.close()
            self._all.discard(conn)
            raise
        if conn.keep_alive and not conn.closed:
            self._idle.append(conn)
        else:
            if conn.transport is not None:
                conn.transport.close()
            self._all.discard(conn)
        return result
