"""Transparency: Starlette's and FastAPI's own test suites, bare and with OverdriveMiddleware.

An oracle we did not write: each framework's public tests, run once bare and
once per configuration with every `TestClient` app wrapped, outermost, in
`OverdriveMiddleware` (benchmarks/_transparency_plugin.py), on asyncio and trio
(Starlette's suite runs each client test on both anyio backends; FastAPI's
anyio tests too). A test that passes bare and fails wrapped is a transparency
bug, or a documented difference (the X-Request-ID header).

Each suite runs in its own environment (`.venv-transparency-NAME`) with the
framework pinned to the tag its tests come from, Overdrive installed editable
beside it and its plugins' dependencies at the locked versions. A test added
to each suite checks that the wrapping happened (bare: that it did not).

    ./run bench transparency [--suites starlette,fastapi] [--configs ...] [-k EXPR]

Sources: the fetched mirrors under /work/.mirror when present, else a shallow
clone of the tag from GitHub (`--source NAME=DIR` for another clone).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "transparency"
CONFIGS = ["bare", "no-plugins", "observability", "defaults"]
OURS = ["pluggy", "structlog", "psutil", "limits", "tenacity", "prometheus-client"]


@dataclass
class Suite:
    name: str
    repo: str  # owner/name on GitHub
    tag: str
    pins: list[str]  # the framework at `tag` and what its tests import
    paths: list[str] = field(default_factory=lambda: ["tests", "pyproject.toml"])
    args: list[str] = field(default_factory=list)

    @property
    def venv(self) -> Path:
        return ROOT / f".venv-transparency-{self.name}"


SUITES = {
    "starlette": Suite(
        "starlette",
        "encode/starlette",
        "0.47.3",
        # starlette 0.47's own test pins (requirements.txt at the tag); anyio of its time
        # (4.16 deprecates names its tests use, and warnings are errors there)
        [
            "starlette[full]==0.47.3",
            "httpx==0.28.1",
            "pytest==8.4.1",
            "trio==0.30.0",
            "anyio==4.9.0",
        ],
    ),
    "fastapi": Suite(
        "fastapi",
        "fastapi/fastapi",
        "0.141.1",
        # the tests dependency group at the tag, less type checkers, docs, benchmarks
        [
            "fastapi[standard]==0.141.1",
            "pytest>=9,<10",
            "anyio[trio]",
            "dirty-equals",
            "inline-snapshot",
            "flask>=3,<4",
            "pwdlib[argon2]",
            "pyjwt",
            "pyyaml",
            "sqlmodel",
            "pytest-timeout",
            "a2wsgi>=1.9,<=2.0",
        ],
        paths=["tests", "docs_src", "pyproject.toml"],
    ),
}

SANITY = '''
"""Added by benchmarks/transparency.py: the clients of this run are (not) wrapped."""
import os

from starlette.testclient import TestClient


async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_overdrive_wraps_the_app_as_configured():
    config = os.environ["OVERDRIVE_TRANSPARENCY"]
    client = TestClient(app)
    wrapped = type(client.app).__name__ == "OverdriveMiddleware"
    assert wrapped == (config != "bare")
    assert ("x-request-id" in client.get("/").headers) == wrapped
'''


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def locked(names: list[str]) -> list[str]:
    pins = {}
    for line in (ROOT / "requirements" / "locked.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower()] = f"{m.group(1)}=={m.group(2)}"
    return [pins[n] for n in names]


def venv(suite: Suite) -> Path:
    py = suite.venv / "bin" / "python"
    stamp = suite.venv / f".installed-{suite.tag}"
    if not stamp.exists() or (ROOT / "pyproject.toml").stat().st_mtime > stamp.stat().st_mtime:
        if not py.exists():
            sh(sys.executable, "-m", "venv", str(suite.venv))
        sh(str(py), "-m", "pip", "install", "-q", *suite.pins, *locked(OURS))
        sh(str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT))
        stamp.touch()
    return py


def sources(suite: Suite, given: Path | None) -> Path:
    dest = WORK / f"{suite.name}-{suite.tag}"
    if not (dest / "tests").is_dir():
        mirror = Path("/work/.mirror") / suite.repo.replace("/", "+") / "repo"
        src = given or (mirror if mirror.is_dir() else None)
        if src is None:
            src = Path(tempfile.mkdtemp())
            url = f"https://github.com/{suite.repo}"
            sh("git", "clone", "-q", "--depth", "1", "--branch", suite.tag, url, str(src))
        archive = subprocess.run(
            ["git", "-C", str(src), "archive", suite.tag, *suite.paths],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as f:
            f.write(archive)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(dest, filter="data")
    (dest / "tests" / "test_zz_overdrive_wrapped.py").write_text(SANITY)
    return dest


Outcomes = dict[str, tuple[str, str]]


def run(suite: Suite, py: Path, where: Path, config: str, select: str | None) -> Outcomes:
    report = WORK / f"{suite.name}-{config}.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERDRIVE_")}
    env["OVERDRIVE_TRANSPARENCY"] = config
    env["PYTHONPATH"] = f"{ROOT / 'benchmarks'}{os.pathsep}{where}"
    cmd = [str(py), "-m", "pytest", "-q", "-p", "_transparency_plugin", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={report}", "-o", "junit_family=xunit1", *suite.args, "tests"]
    if select:
        cmd += ["-k", select]
    subprocess.run(cmd, cwd=where, env=env, capture_output=True)
    outcomes: Outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                text = child.get("message") or ""
                outcome, message = "failed", (text.splitlines() or [""])[0][:200]
            elif child.tag == "skipped":
                outcome = "skipped"
        outcomes[test_id] = (outcome, message)
    return outcomes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default="starlette,fastapi")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--source", action="append", default=[], help="NAME=DIR")
    parser.add_argument("-k", dest="select", help="pytest -k expression (a subset)")
    args = parser.parse_args(argv)
    given = {k: Path(v) for k, _, v in (s.partition("=") for s in args.source)}
    configs = ["bare", *(c for c in args.configs.split(",") if c != "bare")]
    for name in args.suites.split(","):
        suite = SUITES[name]
        py = venv(suite)
        where = sources(suite, given.get(name))
        results: dict[str, Outcomes] = {}
        sanity = "tests.test_zz_overdrive_wrapped::test_overdrive_wraps_the_app_as_configured"
        for config in configs:
            t0 = time.perf_counter()
            outcome = results[config] = run(suite, py, where, config, args.select)
            check = outcome.pop(sanity, ("missing", ""))[0]
            counts = {o: sum(1 for v, _ in outcome.values() if v == o) for o in
                      ("passed", "failed", "skipped")}  # fmt: skip
            print(
                f"{suite.name} {suite.tag}  {config:<14} passed {counts['passed']:>5}  "
                f"failed {counts['failed']:>4}  skipped {counts['skipped']:>4}  "
                f"wrapping checked: {check}  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        bare = results["bare"]
        for config in configs[1:]:
            broke = sorted(
                t
                for t, (o, _) in results[config].items()
                if o == "failed" and bare.get(t, ("",))[0] == "passed"
            )
            print(f"{suite.name} {config}: {len(broke)} passed bare and failed wrapped")
            for t in broke:
                print(f"    {t}: {results[config][t][1]}")


if __name__ == "__main__":
    main()
