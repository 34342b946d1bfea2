"""Fixtures for the real services this machine runs (Redis, PostgreSQL).

Locally a test that needs a missing service skips with a message naming it;
under CI=true that skip is a failure, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

from tests.support.faults import RedisServer

REDIS_URL = os.environ.get("OVERDRIVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "OVERDRIVE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def missing(message: str) -> NoReturn:
    """Skip (locally) or fail (CI=true): a service or tool the test needs is not here."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: a missing service or tool is a failure)")
    pytest.skip(message)


def need(service: str, host: str, port: int) -> None:
    """Skip (locally) or fail (CI=true) when `service` is not listening."""
    if not _reachable(host, port):
        missing(f"{service} is not running on {host}:{port}")


def _need_url(service: str, url: str, default_port: int) -> str:
    parts = urlsplit(url)
    need(service, parts.hostname or "127.0.0.1", parts.port or default_port)
    return url


@pytest.fixture
def redis_url() -> str:
    return _need_url("Redis", REDIS_URL, 6379)


@pytest.fixture
def postgres_url() -> str:
    return _need_url("PostgreSQL", POSTGRES_URL, 5432)


@pytest.fixture
def namespace() -> str:
    """A key prefix of this test's own: the shared Redis is never flushed."""
    return f"odtest:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill or SIGSTOP."""
    if not RedisServer.available():
        missing("redis-server is not installed")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[str]:
    """A real local 3-master Redis Cluster for the session; its `redis+cluster://` URL."""
    from tests.support.cluster import LocalCluster

    if not LocalCluster.available():
        missing("redis-server (and redis-cli) are not installed: no local Redis Cluster")
    cluster = LocalCluster().start()
    try:
        yield cluster.url
    finally:
        cluster.close()


@pytest.fixture
async def fault_proxy() -> AsyncIterator[object]:
    """A factory: ``proxy = await fault_proxy(host, port)``; closed at teardown."""
    from tests.support.faults import FaultProxy

    made: list[FaultProxy] = []

    async def factory(host: str, port: int) -> FaultProxy:
        proxy = await FaultProxy(host, port).start()
        made.append(proxy)
        return proxy

    yield factory
    for proxy in made:
        await proxy.close()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[object]:
    """A real local Sentinel setup (master, replica, one Sentinel) for the session."""
    from tests.support.sentinel import LocalSentinel

    if not LocalSentinel.available():
        missing("redis-server (and redis-cli) are not installed: no local Redis Sentinel")
    sentinel = LocalSentinel().start()
    try:
        yield sentinel
    finally:
        sentinel.close()
