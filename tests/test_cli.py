"""The `overdrive` command: config, explain, and errors with a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overdrive.cli import main

CONFIG = """
plugins = ["overdrive.contrib.testing:HookRecorder"]
quarantine_after = 5

[[routes]]
path = "/videos/*"
methods = ["GET"]
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for key in list(__import__("os").environ):
        if key.startswith("OVERDRIVE_"):
            monkeypatch.delenv(key)
    return tmp_path


def test_config_prints_the_effective_configuration(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "overdrive.toml").write_text(CONFIG)
    assert main(["config"]) == 0
    effective = json.loads(capsys.readouterr().out)
    assert effective["plugins"] == ["recorder"]
    assert effective["quarantine_after"] == 5
    assert effective["routes"][0]["path"] == "/videos/*"


def test_config_reads_pyproject_tool_table(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[tool.overdrive]\nquarantine_after = 9\n'
    )
    assert main(["config"]) == 0
    assert json.loads(capsys.readouterr().out)["quarantine_after"] == 9


def test_environment_overrides_the_file(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "overdrive.toml").write_text(CONFIG)
    monkeypatch.setenv("OVERDRIVE_QUARANTINE_AFTER", "11")
    assert main(["config"]) == 0
    assert json.loads(capsys.readouterr().out)["quarantine_after"] == 11


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('quarantine_after = "many"', "overdrive.quarantine_after: expected an integer"),
        ('plugins = ["nosuch"]', "unknown plugin 'nosuch'"),
        ("plugins = [", "invalid TOML"),
        ('[[routes]]\npath = "nope"', "routes[0].path"),
    ],
)
def test_config_errors_exit_non_zero(
    project: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    (project / "overdrive.toml").write_text(text)
    assert main(["config"]) == 1
    assert message in capsys.readouterr().err


def test_explain_shows_the_chain_and_rules(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "overdrive.toml").write_text(CONFIG)
    assert main(["explain", "/videos/3", "--method", "get"]) == 0
    out = capsys.readouterr().out
    assert "GET /videos/3" in out
    assert "route rules: /videos/*" in out
    assert "before_request" in out and "recorder" in out
    assert main(["explain", "/videos/3", "-m", "POST", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["rules"] == []
    assert plan["hooks"]["after_request"] == ["recorder"]


def test_config_never_prints_passwords(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "overdrive.toml").write_text(
        'plugins = ["cache"]\n[cache]\nredis_url = "redis://app:s3cret@cache.internal:6379/0"\n'
    )
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert "redis://app:***@cache.internal:6379/0" in out


@pytest.mark.parametrize("command", ["config", "reference"])
def test_a_closed_pipe_ends_quietly(command: str, project: Path) -> None:
    import subprocess
    import sys

    script = "import sys; from overdrive.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", script, command],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # `overdrive config | head` once head has what it wanted
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(60) == 141  # 128 + SIGPIPE, as a Unix tool ends
    assert stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"
