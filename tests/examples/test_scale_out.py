"""Scale-out mode: two uvicorn worker processes share the cache and the breakers through Redis.

The service runs as in docs/scaling.md (``REDIS_URL`` set, ``--workers 2``). A
keep-alive connection stays with the worker that accepted it, so two clients
pinned to two different workers show what one worker's state does to the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from examples.video_service import external
from tests.support.server import serving

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def recommender() -> Iterator[str]:
    saved = dict(external.BEHAVIOUR)
    with serving(external.app, lifespan="off") as url:
        yield url
    external.BEHAVIOUR.clear()
    external.BEHAVIOUR.update(saved)


@pytest.fixture
def workers(redis_url: str, namespace: str, recommender: str, tmp_path: Path) -> Iterator[str]:
    """The service on two worker processes; yields its base URL."""
    port = free_port()
    (tmp_path / "prometheus").mkdir()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'videos.db'}",
        "RECOMMENDER_URL": recommender,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        # This test's own keys in the shared Redis (never flushed).
        "OVERDRIVE_CACHE__NAMESPACE": f"{namespace}:http",
        "OVERDRIVE_BREAKER__KEY_PREFIX": f"{namespace}:breaker:",
        "OVERDRIVE_RATELIMIT__KEY_PREFIX": f"{namespace}:ratelimit",
        "OVERDRIVE_GPU__REDIS_PREFIX": f"{namespace}:gpu",
        "OVERDRIVE_QUERY__USE_REDIS": "false",
        "OVERDRIVE_ACCESS_LOG__ENABLED": "false",
        "OVERDRIVE_STATS__TOKEN": "scale-out-test-token",
        "OVERDRIVE_PROMETHEUS__FLUSH_SECONDS": "0.2",
    }
    command = [sys.executable, "-m", "uvicorn", "examples.video_service.app:create_app"]
    command += ["--factory", "--workers", "2", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "the service exited"
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


SENT: Counter[httpx.Client] = Counter()  # requests answered, per client (by object: ids are reused)


def client(base: str) -> httpx.Client:
    def count(response: httpx.Response) -> None:
        SENT[made] += 1

    made = httpx.Client(base_url=base, timeout=10, event_hooks={"response": [count]})
    return made


def requests_counted(c: httpx.Client) -> float:
    """The requests every worker answered, from one scrape of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "overdrive_http_requests_total":
                total += sample.value
    return total


def worker_of(c: httpx.Client) -> int:
    auth = {"authorization": "Bearer scale-out-test-token"}
    pid: int = c.get("/api/system/stats", headers=auth).json()["worker"]
    return pid


def pinned_clients(base: str) -> tuple[httpx.Client, httpx.Client]:
    """Two keep-alive clients, each on its own worker process."""
    first = client(base)
    pid = worker_of(first)
    for _ in range(200):
        second = client(base)
        if worker_of(second) != pid:
            return first, second
        second.close()
    raise AssertionError("every new connection went to the same worker")


def test_two_workers_share_the_cache_and_the_breakers(workers: str) -> None:
    a, b = pinned_clients(workers)
    try:
        assert worker_of(a) != worker_of(b)

        # The cache: stored by worker A, a hit in worker B (through Redis).
        assert a.get("/api/videos/42/thumbnail").headers["x-cache"] == "MISS"
        from_b = b.get("/api/videos/42/thumbnail")
        assert from_b.headers["x-cache"] == "HIT"
        assert from_b.content.startswith(b"\x89PNG")

        # The breaker: worker A sees the recommender fail and opens it ...
        assert a.get("/api/videos/1/recommendations").json()["source"] == "recommender"
        external.BEHAVIOUR["fail"] = True
        for _ in range(10):
            source = a.get("/api/videos/1/recommendations").json()["source"]
            if source == "fallback (breaker open)":
                break
        assert source == "fallback (breaker open)"
        # ... and worker B, which saw no failure, refuses to call the (now healthy) service.
        external.BEHAVIOUR["fail"] = False
        calls = dict(external.CALLS)
        deadline = time.monotonic() + 10  # the shared state syncs every 0.25 s
        while True:
            answer = b.get("/api/videos/1/recommendations").json()
            if answer["source"] == "fallback (breaker open)" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer["source"] == "fallback (breaker open)"
        assert answer["worker"] == worker_of(b)
        assert calls == external.CALLS  # B did not call the recommender

        # Prometheus' multiprocess mode: one scrape (from B) counts A's requests too.
        sent = SENT[a] + SENT[b]
        deadline = time.monotonic() + 20
        while (counted := requests_counted(b)) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        assert SENT[a] > 0 and SENT[b] > 0, (SENT[a], SENT[b])
        assert counted >= sent, (counted, sent)
    finally:
        a.close()
        b.close()
