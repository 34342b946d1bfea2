"""The public HTTP cache conformance suite (http-tests/cache-tests) against the `cache` plugin.

    ./run bench cachetests                 all three configurations
    ./run bench cachetests memory          one of: memory, redis, workers
    ./run bench cachetests memory ID       one test, with the suite's request/response dump
    CACHETESTS_SETTINGS='{"stale_if_error": 60}' ./run bench cachetests memory
                                           other cache settings than the defaults

The suite behind cache-tests.fyi (RFC 9111, RFC 9213 targeted cache-control)
is the outside oracle for what our cache does. This script:

1. sets the suite up in ``build/cache-tests`` (git-ignored): its files are taken
   from a local git mirror (``CACHE_TESTS_GIT``, default: the ``fetch`` mirror
   under /work/.mirror) or cloned from GitHub, then ``npm install``;
2. starts the suite's origin server (node) on a free port;
3. starts a forwarding proxy under uvicorn: a small ASGI app that forwards each
   request to the origin with httpx, wrapped in `OverdriveMiddleware` with only
   the `cache` plugin, in its default configuration
   (`memory`), with the Redis tier (`redis`, a namespace of its own on
   127.0.0.1:6379) and as two uvicorn workers sharing that Redis (`workers`);
4. points the suite's command-line client at the proxy and prints, per
   configuration, the required / optional / check tests passed (dependencies
   honoured, as cache-tests.fyi counts them) and every failing required test with
   the suite's reason.

Browser-only tests are skipped by the suite's CLI itself (5 of 370); of the 160
required tests left, two cannot be seen through ASGI (interim 1xx responses, and
Transfer-Encoding, which the ASGI server owns), hence "of 158".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "build" / "cache-tests"
MIRROR = os.environ.get("CACHE_TESTS_GIT", "/work/.mirror/http-tests+cache-tests/repo")
UPSTREAM = "https://github.com/http-tests/cache-tests.git"
REDIS_URL = os.environ.get("OVERDRIVE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
#: Required tests no ASGI application can influence (see the module docstring).
NOT_ASGI = frozenset({"interim-not-cached", "headers-store-Transfer-Encoding"})
CONFIGS = ("memory", "redis", "workers")

_META = """
import tests from './tests/index.mjs'
const out = []
for (const s of tests) for (const t of s.tests) out.push({id: t.id, suite: s.id,
  kind: t.kind || 'required', depends_on: t.depends_on || [], browser_only: !!t.browser_only})
console.log(JSON.stringify(out))
"""


# -- the forwarding proxy (run by uvicorn in its own process) ----------------------------


def proxy_app() -> Any:
    """uvicorn factory: the forwarding app wrapped in Overdrive with the `cache` plugin.

    Configured from the environment (the parent process sets it): CACHETESTS_ORIGIN,
    CACHETESTS_REDIS (a Redis URL or empty), CACHETESTS_NAMESPACE.
    """
    import httpx

    from overdrive.middleware import OverdriveMiddleware

    origin = os.environ["CACHETESTS_ORIGIN"]
    client: httpx.AsyncClient | None = None

    async def forward(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal client
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if client is not None:
                        await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if client is None:
            # A fresh connection per request: the suite's origin ends some responses in ways
            # that leave a pooled connection unusable, which would fail unrelated tests.
            client = httpx.AsyncClient(
                base_url=origin, timeout=30.0, limits=httpx.Limits(max_keepalive_connections=0)
            )
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"content-length")]
        url = scope["path"] + (
            "?" + scope["query_string"].decode() if scope["query_string"] else ""
        )
        request = client.build_request(scope["method"], url, headers=headers, content=body)
        response = await client.send(request, stream=True)
        try:
            out = []
            for k, v in response.headers.raw:
                name = k.lower()
                if name in (b"transfer-encoding", b"keep-alive"):
                    continue  # the server's own framing
                if name == b"connection":
                    # The fields it lists go on, for the cache to strip (RFC 9111 3.1);
                    # close / keep-alive are this hop's, for the server.
                    listed = [t.strip() for t in v.split(b",")]
                    listed = [t for t in listed if t and t.lower() not in (b"close", b"keep-alive")]
                    if not listed:
                        continue
                    v = b", ".join(listed)
                out.append((k, v))
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    settings: dict[str, Any] = {"namespace": os.environ.get("CACHETESTS_NAMESPACE", "ct")}
    settings.update(json.loads(os.environ.get("CACHETESTS_SETTINGS") or "{}"))
    if os.environ.get("CACHETESTS_REDIS"):
        settings["redis_url"] = os.environ["CACHETESTS_REDIS"]
    return OverdriveMiddleware(forward, config={"plugins": ["cache"], "cache": settings})


# -- setting up and running the suite ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise SystemExit(f"cachetests: nothing listening on port {port} after {timeout:.0f} s")


def setup_suite() -> None:
    if not (SUITE / "package.json").exists():
        SUITE.mkdir(parents=True, exist_ok=True)
        if Path(MIRROR).exists():
            archive = subprocess.run(
                ["git", f"--git-dir={MIRROR}", "archive", "HEAD"], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(SUITE)], input=archive, check=True)
        else:
            shutil.rmtree(SUITE)
            subprocess.run(["git", "clone", "-q", "--depth=1", UPSTREAM, str(SUITE)], check=True)
    if not (SUITE / "node_modules").exists():
        if shutil.which("npm") is None:
            raise SystemExit("cachetests: needs node and npm (https://nodejs.org/)")
        subprocess.run(
            ["npm", "install", "--omit=dev", "--no-audit", "--no-fund", "--silent"],
            cwd=SUITE,
            check=True,
        )


def metadata() -> dict[str, dict[str, Any]]:
    (SUITE / "overdrive-meta.mjs").write_text(_META)
    out = subprocess.run(
        ["node", "overdrive-meta.mjs"], cwd=SUITE, check=True, capture_output=True, text=True
    ).stdout
    return {t["id"]: t for t in json.loads(out)}


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[None]:
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_config(config: str, test_id: str = "") -> dict[str, Any]:
    """Origin + proxy for `config`, the suite's CLI against the proxy: its results."""
    logs = ROOT / "build" / "cachetests-logs"
    logs.mkdir(parents=True, exist_ok=True)
    origin_port, proxy_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(
        npm_config_protocol="http",
        npm_config_port=str(origin_port),
        npm_config_pidfile=str(logs / "origin.pid"),
    )
    proxy_env = dict(os.environ)
    proxy_env.update(
        CACHETESTS_ORIGIN=f"http://127.0.0.1:{origin_port}",
        CACHETESTS_REDIS=REDIS_URL if config in ("redis", "workers") else "",
        CACHETESTS_NAMESPACE=f"cachetests:{uuid.uuid4().hex[:8]}",
        PYTHONPATH=str(ROOT / "benchmarks") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    workers = ["--workers", "2"] if config == "workers" else []
    uvicorn = [sys.executable, "-m", "uvicorn", "--factory", "cachetests:proxy_app",
               "--host", "127.0.0.1", "--port", str(proxy_port), "--log-level", "warning",
               # uvicorn adds its own Date and Server beside the app's (a second Date
               # line reads as a list); a proxy passes the origin's on
               "--no-date-header", "--no-server-header", *workers]  # fmt: skip
    node = ["node", "test-engine/server/server.mjs"]
    with (
        process(node, env, SUITE, logs / f"origin-{config}.log"),
        process(uvicorn, proxy_env, ROOT, logs / f"proxy-{config}.log"),
    ):
        wait_port(origin_port)
        wait_port(proxy_port)
        if config == "workers":
            time.sleep(1.5)  # both workers up before the first request
        cli_env = dict(os.environ)
        cli_env.update(npm_config_base=f"http://127.0.0.1:{proxy_port}",
                       npm_package_config_id=test_id)  # fmt: skip
        cli = subprocess.run(
            ["node", "--no-warnings", "test-engine/cli.mjs"],
            cwd=SUITE,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    if test_id:
        print(cli.stdout, cli.stderr)
        return {}
    if cli.returncode != 0:
        raise SystemExit(f"cachetests: the suite's CLI failed:\n{cli.stderr[-2000:]}")
    return dict(json.loads(cli.stdout))


PASS, FAIL, OPTIONAL_FAIL, YES, NO, SETUP, HARNESS, DEPENDENCY, RETRY = (
    "pass", "fail", "optional_fail", "yes", "no", "setup", "harness", "dependency", "retry",
)  # fmt: skip


def verdict(meta: dict[str, dict[str, Any]], results: dict[str, Any], test_id: str) -> str:
    """test-engine/lib/results.mjs determineTestResult, in Python."""
    result = results.get(test_id)
    if result is None:
        return "untested"
    for dep in meta[test_id]["depends_on"]:
        if verdict(meta, results, dep) not in (PASS, YES):
            return DEPENDENCY
    if isinstance(result, list) and result[0] == "Setup":
        return RETRY if result[1] == "retry" else SETUP
    if isinstance(result, list) and result[0] == "AbortError":
        return HARNESS
    kind = meta[test_id]["kind"]
    ok = result is True
    if kind == "required":
        return PASS if ok else FAIL
    if kind == "optimal":
        return PASS if ok else OPTIONAL_FAIL
    return YES if ok else NO


def summarise(config: str, meta: dict[str, dict[str, Any]], results: dict[str, Any]) -> None:
    seen = [t for t in meta.values() if not t["browser_only"]]
    required = [t["id"] for t in seen if t["kind"] == "required"]
    optional = [t["id"] for t in seen if t["kind"] == "optimal"]
    checks = [t["id"] for t in seen if t["kind"] == "check"]
    v = {tid: verdict(meta, results, tid) for tid in results if tid in meta}
    req_ok = sum(v.get(t) == PASS for t in required)
    asgi = [t for t in required if t not in NOT_ASGI]
    asgi_ok = sum(v.get(t) == PASS for t in asgi)
    opt_ok = sum(v.get(t) == PASS for t in optional)
    yes = sum(v.get(t) == YES for t in checks)
    cdn = [t for t in required + optional if t.startswith("cdn-")]
    cdn_ok = sum(v.get(t) == PASS for t in cdn)
    print(
        f"{config:8} required {req_ok}/{len(required)} (ASGI-visible {asgi_ok}/{len(asgi)})  "
        f"optional {opt_ok}/{len(optional)}  checks yes {yes}/{len(checks)}  "
        f"cdn-* {cdn_ok}/{len(cdn)}"
    )
    for tid in required:
        if v.get(tid) != PASS:
            detail = results.get(tid)
            reason = detail[1] if isinstance(detail, list) and len(detail) > 1 else ""
            print(f"    FAIL {tid:55} [{v.get(tid)}] {str(reason)[:110]}")
    failing_cdn = [t for t in cdn if v.get(t) != PASS and t not in required]
    for tid in failing_cdn:
        detail = results.get(tid)
        reason = detail[1] if isinstance(detail, list) and len(detail) > 1 else ""
        print(f"    cdn  {tid:55} [{v.get(tid)}] {str(reason)[:110]}")
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    configs = [argv[0]] if argv else list(CONFIGS)
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"cachetests: configuration {c!r}: expected one of {CONFIGS}")
    setup_suite()
    meta = metadata()
    if len(argv) > 1:
        run_config(configs[0], argv[1])
        return
    print("http-tests/cache-tests against Overdrive's cache plugin (dependencies honoured)")
    for config in configs:
        results = run_config(config)
        (ROOT / "build" / f"cachetests-{config}.json").write_text(json.dumps(results, indent=1))
        summarise(config, meta, results)


if __name__ == "__main__":
    main(sys.argv[1:])
