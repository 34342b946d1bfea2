"""Discovery for real: a plugin distribution is pip-installed and found by entry point.

The distribution (tests/fixtures/sample_plugin) is installed into a temporary
folder put on PYTHONPATH of subprocesses, so the test venv is left as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "sample_plugin"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(FIXTURE),
        ],
        check=True,
        capture_output=True,
    )
    return target


def run(plugin_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERDRIVE_")}
    env["PYTHONPATH"] = str(plugin_path)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )


def test_overdrive_plugins_lists_it_and_reports_the_broken_one(
    plugin_path: Path, tmp_path: Path
) -> None:
    result = run(plugin_path, "-m", "overdrive.cli", "plugins", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["sample"]["distribution"] == "overdrive-sample-plugin 1.2.3"
    assert rows["sample"]["status"] == "available"
    assert "on_response_start" in rows["sample"]["hooks"]
    assert rows["broken"]["status"] == "broken"
    assert "overdrive_dependency_that_is_not_installed" in rows["broken"]["hooks"]


def test_enabling_it_by_name_runs_it(plugin_path: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import asyncio, httpx
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route
        from overdrive.middleware import OverdriveMiddleware

        async def ok(request):
            return PlainTextResponse("ok")

        app = OverdriveMiddleware(
            Starlette(routes=[Route("/", ok)]),
            config={"plugins": ["sample"], "sample": {"value": "configured"}},
        )

        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                print((await c.get("/")).headers["x-sample"])

        asyncio.run(main())
        """
    )
    result = run(plugin_path, "-c", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "configured"


def test_enabling_the_broken_one_is_a_startup_error_naming_it(
    plugin_path: Path, tmp_path: Path
) -> None:
    script = "import overdrive; overdrive.Overdrive({'plugins': ['sample', 'broken']})"
    result = run(plugin_path, "-c", script, cwd=tmp_path)
    assert result.returncode != 0
    assert "plugin 'broken'" in result.stderr
    assert "failed to load" in result.stderr


def test_the_cached_listing_sees_a_plugin_installed_or_put_on_the_path_later(
    plugin_path: Path, tmp_path: Path
) -> None:
    """Discovery is read once per process, and again when the import path changes."""
    later = tmp_path / "later"
    later.mkdir()
    script = textwrap.dedent(
        f"""
        import shutil, sys
        from overdrive.discovery import discover, forget
        sys.path.append({str(later)!r})
        print("sample" in discover())  # nothing there yet
        print(discover() == discover())  # cached: the same listing
        for item in __import__("pathlib").Path({str(plugin_path)!r}).iterdir():
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, {str(later)!r} + "/" + item.name)  # "installed" into a path entry
        print("sample" in discover())
        sys.path.remove({str(later)!r})
        print("sample" in discover())  # off the path again
        sys.path.append({str(later)!r})
        forget()
        print("sample" in discover())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERDRIVE_")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True", "False", "True"]
