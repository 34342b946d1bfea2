"""Start the video service and its stand-in recommender; or compare it with its plugins off.

    python -m examples.video_service serve [--port 8000] [--workers 1]   (./run demo)
    python -m examples.video_service load [--duration 10]                (./run load)

`serve` starts the recommender stub (port + 1) and the service, prints where the
dashboard is, and stops both on Ctrl+C. `load` drives the same mixed workload
(overdrive.contrib.load) at the service with every plugin on and at a second
instance with every plugin off (``OVERDRIVE_PLUGINS=``), then prints both side by
side. When a demo already answers on the `--port` (``./run demo`` in another
terminal), that one is the "plugins on" side, so its dashboard shows the traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start(
    target: str, port: int, env: Mapping[str, str], *, workers: int = 1
) -> subprocess.Popen[bytes]:
    """A uvicorn process serving `target` on 127.0.0.1:`port`."""
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warning", "--no-access-log"]
    if target.endswith(":create_app"):
        command.append("--factory")
    if workers > 1:
        command += ["--workers", str(workers)]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})


def wait_until_up(url: str, process: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not answers(url):
        if process.poll() is not None:
            raise SystemExit(f"the server for {url} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer within {seconds:.0f} s")
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a child, gracefully, then by force. A second Ctrl+C or SIGTERM meanwhile is
    held back until the child is gone, so that it cannot interrupt this and orphan it."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown (lifespan included)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the launcher as Ctrl+C does: children first


@contextlib.contextmanager
def running(
    target: str, port: int, env: Mapping[str, str], health: str, workers: int = 1
) -> Iterator[str]:
    base = f"http://127.0.0.1:{port}"
    process = start(target, port, env, workers=workers)
    try:
        wait_until_up(base + health, process)
        yield base
    finally:
        stop(process)


def service_env(
    recommender: str, database: str, token: str, plugins: str | None = None
) -> dict[str, str]:
    env = {
        "RECOMMENDER_URL": recommender,
        "DATABASE_URL": database,
        "OVERDRIVE_STATS__TOKEN": token,
        "OVERDRIVE_ACCESS_LOG__ENABLED": os.environ.get("OVERDRIVE_ACCESS_LOG__ENABLED", "false"),
    }
    if plugins is not None:
        env["OVERDRIVE_PLUGINS"] = plugins
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    token = os.environ.get("OVERDRIVE_STATS__TOKEN") or secrets.token_urlsafe(12)
    database = os.environ.get("DATABASE_URL") or (
        f"sqlite+aiosqlite:///{Path(tempfile.gettempdir()) / 'overdrive-video-demo.db'}"
    )
    stub_port = args.port + 1
    env = service_env(f"http://127.0.0.1:{stub_port}", database, token)
    with running("examples.video_service.external:app", stub_port, {}, "/control"):
        process = start(
            "examples.video_service.app:create_app", args.port, env, workers=args.workers
        )
        base = f"http://127.0.0.1:{args.port}"
        try:
            wait_until_up(base + "/health", process)
            print(
                f"\nThe AI video service (Overdrive reference) is up:\n"
                f"  API          {base}/docs\n"
                f"  dashboard    {base}/overdrive/?token={token}\n"
                f"  metrics      {base}/metrics\n"
                f"  stats JSON   {base}/api/system/stats\n"
                f"  recommender  http://127.0.0.1:{stub_port}/control  "
                '(POST {"fail": true} to watch the breaker open)\n'
                "Now run `./run load` in another terminal. Ctrl+C stops everything.\n"
                "(One log line per request: OVERDRIVE_ACCESS_LOG__ENABLED=true ./run demo)\n",
                flush=True,
            )
            process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop(process)
    return 0


def with_token(profile: Any, token: str) -> Any:
    """`profile` with the stats token on its stats endpoint."""
    import dataclasses

    endpoints = [
        dataclasses.replace(e, headers={**e.headers, "authorization": f"Bearer {token}"})
        if e.path == "/api/system/stats"
        else e
        for e in profile.endpoints
    ]
    return dataclasses.replace(profile, endpoints=endpoints)


def cmd_load(args: argparse.Namespace) -> int:
    from overdrive.contrib.load import VIDEO_SERVICE, format_summary, run_load

    token = os.environ.get("OVERDRIVE_STATS__TOKEN") or secrets.token_urlsafe(12)
    demo = f"http://127.0.0.1:{args.port}"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="overdrive-load-")))
        if answers(demo + "/health"):
            print(f"Using the demo already running at {demo} as the 'plugins on' side.")
            on = demo
            stub = f"http://127.0.0.1:{args.port + 1}"
        else:
            stub_port = free_port()
            stub = stack.enter_context(
                running("examples.video_service.external:app", stub_port, {}, "/control")
            )
            env = service_env(stub, f"sqlite+aiosqlite:///{tmp / 'on.db'}", token)
            on = stack.enter_context(
                running("examples.video_service.app:create_app", free_port(), env, "/health")
            )
        env = service_env(stub, f"sqlite+aiosqlite:///{tmp / 'off.db'}", token, plugins="")
        off = stack.enter_context(
            running("examples.video_service.app:create_app", free_port(), env, "/health")
        )
        print(
            f"{args.concurrency} clients for {args.duration:g} s against each "
            "(thumbnails, metadata, streams, recommendations, generations)",
            flush=True,
        )
        results = []
        # The stats route needs the token, as the dashboard does.
        profile = with_token(VIDEO_SERVICE, token)
        for url, label in ((on, "plugins on"), (off, "plugins off")):
            result = asyncio.run(
                run_load(
                    url,
                    profile,
                    duration=args.duration,
                    concurrency=args.concurrency,
                    progress=sys.stderr,
                    label=label,
                )
            )
            results.append(result)
    print()
    print(format_summary(results, ["plugins on", "plugins off"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.video_service", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="the service and its recommender stub")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("load", help="the same workload with plugins on and off, side by side")
    p.add_argument("--port", type=int, default=8000, help="where ./run demo serves, if it runs")
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.set_defaults(func=cmd_load)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:  # every child was stopped on the way out (`finally`)
        return 130 if args.command == "load" else 0
    return result


if __name__ == "__main__":
    sys.exit(main())
