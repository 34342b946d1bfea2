"""Transparency: Starlette's own test suite, bare and with OverdriveMiddleware outermost.

An oracle we did not write: the framework's public tests, run once bare and once
per configuration with every `TestClient` app wrapped (benchmarks/
_transparency_plugin.py), on asyncio and trio (the suite parametrizes its
client over both anyio backends). A test that passes bare and fails wrapped is
a transparency bug, or a documented difference (the X-Request-ID header).

The suite runs in its own environment, `.venv-transparency`, with the package
version pinned to the tag its tests come from (the locked Starlette is newer
than any tag the sources were fetched at): Overdrive installed editable, its
plugins' dependencies at the locked versions.

    ./run bench transparency [--source DIR] [--configs bare,no-plugins,...] [-k EXPR]

`--source` is a clone of github.com/encode/starlette (default: the fetched
mirror, else a shallow clone of the tag).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-transparency"
WORK = ROOT / "build" / "transparency"
STARLETTE = "0.47.3"  # the tag the tests come from, and the version installed to run them
SUITE_PINS = [
    f"starlette[full]=={STARLETTE}",
    "httpx==0.28.1",  # starlette 0.47's full extra: httpx<0.29
    "pytest==8.4.1",
    "trio==0.30.0",
]
OURS = ["pluggy", "structlog", "psutil", "anyio", "limits", "tenacity", "prometheus-client"]
MIRROR = Path("/work/.mirror/encode+starlette/repo")
CONFIGS = ["bare", "no-plugins", "observability", "defaults"]


def sh(*cmd: str, **kw: object) -> None:
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def locked(names: list[str]) -> list[str]:
    pins = {}
    for line in (ROOT / "requirements" / "locked.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower()] = f"{m.group(1)}=={m.group(2)}"
    return [pins[n] for n in names]


def venv() -> Path:
    py = VENV / "bin" / "python"
    stamp = VENV / f".installed-{STARLETTE}"
    if not stamp.exists() or (ROOT / "pyproject.toml").stat().st_mtime > stamp.stat().st_mtime:
        if not py.exists():
            sh(sys.executable, "-m", "venv", str(VENV))
        sh(str(py), "-m", "pip", "install", "-q", *SUITE_PINS, *locked(OURS))
        sh(str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT))
        stamp.touch()
    return py


def suite(source: Path | None) -> Path:
    dest = WORK / f"starlette-{STARLETTE}"
    if (dest / "tests").is_dir():
        return dest
    src = source or (MIRROR if MIRROR.is_dir() else None)
    tmp = None
    if src is None:
        tmp = tempfile.mkdtemp()
        url = "https://github.com/encode/starlette"
        sh("git", "clone", "-q", "--depth", "1", "--branch", STARLETTE, url, tmp)
        src = Path(tmp)
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(src), "archive", STARLETTE, "tests", "pyproject.toml"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")
    return dest


def run(py: Path, where: Path, config: str, select: str | None) -> dict[str, tuple[str, str]]:
    report = WORK / f"starlette-{config}.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERDRIVE_")}
    env["OVERDRIVE_TRANSPARENCY"] = config
    env["PYTHONPATH"] = f"{ROOT / 'benchmarks'}{os.pathsep}{where}"
    cmd = [str(py), "-m", "pytest", "-q", "-p", "_transparency_plugin", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={report}", "-o", "junit_family=xunit1", "tests"]
    if select:
        cmd += ["-k", select]
    subprocess.run(cmd, cwd=where, env=env, capture_output=True)
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "").splitlines()[0][:160]
            elif child.tag == "skipped":
                outcome = "skipped"
        outcomes[test_id] = (outcome, message)
    return outcomes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="a clone of encode/starlette")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("-k", dest="select", help="pytest -k expression (a subset)")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    if configs[0] != "bare":
        configs.insert(0, "bare")
    py = venv()
    where = suite(args.source)
    results = {}
    for config in configs:
        t0 = time.perf_counter()
        results[config] = run(py, where, config, args.select)
        counts = {o: sum(1 for v, _ in results[config].values() if v == o) for o in
                  ("passed", "failed", "skipped")}  # fmt: skip
        print(
            f"starlette {STARLETTE} tests, {config:<14} passed {counts['passed']:>4}  "
            f"failed {counts['failed']:>3}  skipped {counts['skipped']:>3}  "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    bare = results["bare"]
    for config in configs[1:]:
        broke = sorted(
            t
            for t, (o, _) in results[config].items()
            if o == "failed" and bare.get(t, ("",))[0] == "passed"
        )
        print(f"\n{config}: {len(broke)} passed bare and failed wrapped")
        for t in broke:
            print(f"  {t}: {results[config][t][1]}")


if __name__ == "__main__":
    main()
