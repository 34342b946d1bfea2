"""Packaging: the wheel holds `overdrive` and nothing else at the top level."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_one_top_level_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("overdrive-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"overdrive", wheel.name.split("-py")[0] + ".dist-info"}
    assert "overdrive/py.typed" in names
    for sub in ("middleware", "plugins", "contrib"):
        assert f"overdrive/{sub}/__init__.py" in names
    # The dashboard ships its page, script and styles (package data, no CDN).
    for asset in ("index.html", "dashboard.js", "dashboard.css"):
        assert f"overdrive/contrib/dashboard/{asset}" in names
    assert "overdrive/plugins/profiler/histogram.py" in names
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "[overdrive.plugins]" in entry_points or "overdrive.plugins" not in entry_points
    assert "overdrive = overdrive.cli:main" in entry_points
