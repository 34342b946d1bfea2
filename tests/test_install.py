"""The install lines of the README and the testing docs, run as written in a fresh venv.

A wheel of this checkout is built once; a new virtual environment installs it the
way the README says (`pip install --find-links dist 'overdrive[redis,resilience]'`),
serves the README's quick start under uvicorn and expects a 200; then installs the
`testing` extra and runs the pytest setup of docs/writing-plugins.md. Versions come
from the lock (as a constraints file), so the run is the one the suite was green with.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.faults import free_port

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "locked.txt"


def block(path: Path, after: str, language: str) -> str:
    """The first ```language block after the line containing `after`."""
    text = path.read_text()
    start = text.index(after)
    found = re.compile(rf"^```{language}\n(.*?)^```", re.S | re.M).search(text, start)
    assert found, f"no {language} block after {after!r} in {path.name}"
    return found.group(1)


def pip(venv: Path, *args: str) -> None:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(LOCK), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(venv, dist): a fresh environment, and the folder holding this checkout's wheel."""
    base = tmp_path_factory.mktemp("install")
    dist = base / "dist"
    readme = (ROOT / "README.md").read_text()
    assert "pip wheel --no-deps -w dist ." in readme
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=120)
    yield base / "venv", dist


def test_the_readme_quick_start_answers_200_under_a_real_install(
    venv: tuple[Path, Path], tmp_path: Path
) -> None:
    env, dist = venv
    readme = ROOT / "README.md"
    assert "pip install --find-links dist 'overdrive[redis,resilience]'" in readme.read_text()
    # As the README says; fastapi and uvicorn are the app's own ("pip install fastapi uvicorn").
    pip(env, "--find-links", str(dist), "overdrive[redis,resilience]", "fastapi", "uvicorn")
    (tmp_path / "quickstart.py").write_text(block(readme, "## Quick start", "python"))
    port = free_port()
    server = subprocess.Popen(
        [str(env / "bin" / "python"), "-m", "uvicorn", "quickstart:app", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        response = None
        deadline = time.monotonic() + 60
        while response is None and time.monotonic() < deadline and server.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/thumbnails/7")
            except httpx.TransportError:
                time.sleep(0.2)
        assert response is not None, "the quick start did not serve"
        assert response.status_code == 200, response.text
        assert response.json() is None  # the endpoint's `...` body, through all three plugins
        assert "x-request-id" in response.headers
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "Traceback" not in output, output


def test_the_testing_docs_pytest_setup_runs(venv: tuple[Path, Path], tmp_path: Path) -> None:
    env, dist = venv
    docs = ROOT / "docs" / "writing-plugins.md"
    assert "pip install '.[testing]'" in docs.read_text()
    pip(env, "--find-links", str(dist), "overdrive[testing]")
    (tmp_path / "pyproject.toml").write_text(block(docs, "your project's `pyproject.toml`", "toml"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_greeting.py").write_text(
        block(docs, "`tests/test_greeting.py`", "python")
    )
    done = subprocess.run(
        [str(env / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 passed" in done.stdout
