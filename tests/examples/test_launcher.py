"""`./run demo` and `./run load` as a user runs them: `python -m examples.video_service`."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port_pair() -> int:
    """A port P with P and P + 1 free (the service and its recommender)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port: int = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports")


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "examples.video_service", *args]


def test_serve_prints_the_dashboard_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port_pair()
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"}
    process = subprocess.Popen(
        launcher("serve", "--port", str(port)),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        dashboard = None
        deadline = time.monotonic() + 90
        while dashboard is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "the launcher exited before printing the dashboard"
            found = re.search(r"dashboard\s+(\S+)", line)
            dashboard = found.group(1) if found else None
        assert dashboard is not None and dashboard.startswith(f"http://127.0.0.1:{port}/")
        page = httpx.get(dashboard)
        assert page.status_code == 200 and "<html" in page.text.lower()
        # The recommender stub runs beside it.
        assert httpx.get(f"http://127.0.0.1:{port + 1}/control").json()["fail"] is False
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0


def test_load_compares_plugins_on_and_off() -> None:
    port = free_port_pair()  # no demo answers there: the launcher starts both sides
    done = subprocess.run(
        launcher("load", "--duration", "1", "--concurrency", "2", "--port", str(port)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    header = next(line for line in done.stdout.splitlines() if "plugins on" in line)
    assert header.index("plugins on") < header.index("plugins off")
    for row in ("throughput (req/s)", "p99 (ms)", "cache hit rate", "shed (503)"):
        assert row in done.stdout
    assert "plugins on [" in done.stderr and "plugins off [" in done.stderr  # progress


def port_free(port: int) -> bool:
    """Free for a new server: nothing listens there (closed connections' TIME_WAIT aside)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_sigterm_stops_the_launcher_and_both_servers(tmp_path: Path) -> None:
    port = free_port_pair()
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"}
    process = subprocess.Popen(
        launcher("serve", "--port", str(port)), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    try:
        while "dashboard" not in (line := process.stdout.readline()):
            assert line, "the launcher exited before printing the dashboard"
        assert not port_free(port) and not port_free(port + 1)
    finally:
        process.send_signal(signal.SIGTERM)  # what `kill`, systemd and docker stop send
        code = process.wait(60)
        process.stdout.close()
    assert code == 0
    assert port_free(port) and port_free(port + 1)  # both children gone, not orphaned
