"""Dynamic batching over HTTP: Overdrive's `@overdrive.batch` beside LitServe, under wrk.

Every server (benchmarks/_batching_servers.py) is started fresh in a process of its own,
its answer checked against the model, then loaded by wrk (closed loop, 1 thread) at 1,
16 and 64 connections on ``POST /predict``. During the 64-connection run a second wrk
keeps one connection on ``GET /health``: a cheap route's p99 while the model is busy.
Printed: req/s, p50 and p99 (wrk's latency distribution), non-2xx/socket errors, mean
batch (where the server reports it), idle RSS; and our req/s and p99 as ratios to
LitServe's. Figures go to benchmarks/results/batching_http.json.

LitServe is installed from a pinned version into a venv of its own (.bench/litserve) so
its dependencies never meet ours. Ray Serve is not in this run (see docs/performance.md).
Run: ./run bench batching_http [SECONDS per load]
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _batching_servers import WIDTH, build_model

ROOT = Path(__file__).resolve().parent.parent
SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
CONNECTIONS = (1, 16, 64)
LITSERVE = "litserve==0.2.19"
LITSERVE_VENV = ROOT / ".bench" / "litserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def litserve_python() -> str:
    py = LITSERVE_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITSERVE_VENV)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "torch==2.13.0", LITSERVE], check=True
        )
    return str(py)


def start(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    py = litserve_python() if kind == "litserve" else sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [py, str(ROOT / "benchmarks" / "_batching_servers.py"), kind, str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def post(port: int, row: list[float]) -> list[float]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict",
        data=json.dumps({"x": row}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return list(json.loads(resp.read())["y"])


def wrk(url: str, connections: int, seconds: int, script: str | None) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
        return float(m.group(1)) * scale

    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors += sum(int(g) for g in m.groups()) if m else 0
    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"), "errors": errors}


def batches(port: int) -> tuple[float, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/batches", timeout=2) as r:
            got = json.loads(r.read())
            return float(got["batches"]), float(got["items"])
    except (OSError, ValueError, KeyError):
        return float("nan"), float("nan")


def measure(kind: str, script: str, row: list[float], expected: torch.Tensor) -> dict[str, Any]:
    proc, port = start(kind)
    try:
        got = torch.tensor(post(port, row))
        assert torch.allclose(got, expected, atol=1e-4), f"{kind}: wrong answer"
        parent = psutil.Process(proc.pid)
        rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
        wrk(f"http://127.0.0.1:{port}/predict", 16, 2, script)  # warm up
        result: dict[str, Any] = {"idle_rss_mib": rss / 2**20}
        for c in CONNECTIONS:
            b0, i0 = batches(port)
            health = None
            if c == CONNECTIONS[-1]:
                health = subprocess.Popen(
                    [
                        "wrk",
                        "-t1",
                        "-c1",
                        f"-d{SECONDS}s",
                        "--latency",
                        f"http://127.0.0.1:{port}/health",
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            figures = wrk(f"http://127.0.0.1:{port}/predict", c, SECONDS, script)
            b1, i1 = batches(port)
            figures["mean_batch"] = (i1 - i0) / (b1 - b0) if b1 > b0 else float("nan")
            if health is not None:
                out = health.communicate()[0]
                m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
                scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
                figures["health_p99_ms"] = (
                    float(m.group(1)) * scale[m.group(2)] if m else float("nan")
                )
            result[str(c)] = figures
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    torch.manual_seed(1)
    row = torch.randn(WIDTH).tolist()
    with torch.inference_mode():
        expected = build_model()(torch.tensor(row)[None])[0]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\n')
        f.write('wrk.headers["Content-Type"] = "application/json"\n')
        f.write(f"wrk.body = {json.dumps(json.dumps({'x': row}))}\n")
        script = f.name
    kinds = ["inline", "overdrive", "overdrive-nofreeze", "litserve"]
    results = {kind: measure(kind, script, row, expected) for kind in kinds}
    os.unlink(script)

    print(
        f"POST /predict, MLP 4 x Linear {WIDTH} + GELU, torch CPU 1 thread; wrk -t1, "
        f"{SECONDS} s per load; {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )
    head = f"{'server':<20}" + "".join(
        f" | {c:>2} conn: req/s  p50   p99 err batch" for c in CONNECTIONS
    )
    print(head + " | /health p99 | idle RSS")
    for kind, r in results.items():
        cells = ""
        for c in CONNECTIONS:
            f = r[str(c)]
            cells += (
                f" | {f['rps']:>14.0f} {f['p50_ms']:>5.1f} {f['p99_ms']:>5.1f} "
                f"{f['errors']:>3.0f} {f['mean_batch']:>5.1f}"
            )
        health = r["64"].get("health_p99_ms", float("nan"))
        print(f"{kind:<20}{cells} | {health:>8.1f} ms | {r['idle_rss_mib']:>5.0f} MiB")
    lit, ours, inline = results["litserve"], results["overdrive"], results["inline"]
    for c in CONNECTIONS:
        k = str(c)
        print(
            f"{c:>2} conn: Overdrive req/s {ours[k]['rps'] / lit[k]['rps']:.2f}x LitServe, "
            f"{ours[k]['rps'] / inline[k]['rps']:.2f}x unbatched; "
            f"p99 {ours[k]['p99_ms'] / lit[k]['p99_ms']:.2f}x LitServe's"
        )
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    meta = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "litserve": LITSERVE,
        "seconds": SECONDS,
    }
    (out / "batching_http.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
