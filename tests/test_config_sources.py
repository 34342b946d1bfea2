"""Configuration errors say where the value came from; stray OVERDRIVE_* variables warn."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from overdrive import ConfigError, Overdrive, PluginLoadError
from overdrive.sources import toml_line

TOML = """\
plugins = ["cache", "profiler"]

[cache]
namespace = "x"
default_ttl = "soon"

[[routes]]
path = "/a/*"

[[routes]]
path = "b"
"""


def test_a_bad_value_in_a_file_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "overdrive.toml"
    path.write_text(TOML)
    with pytest.raises(ConfigError) as info:
        Overdrive(path, env={})
    assert str(info.value) == (
        f"cache.default_ttl: expected an integer or none, got 'soon' (at {path}, line 5)"
    )


def test_lines_of_tables_routes_inline_tables_and_pyproject(tmp_path: Path) -> None:
    path = tmp_path / "overdrive.toml"
    path.write_text(TOML + 'home = "/opt"\nstats = { token = "t" }\n')
    assert toml_line(path, ["cache", "default_ttl"]) == 5
    assert toml_line(path, ["cache", "missing"]) == 3  # the table, when the key is not there
    assert toml_line(path, ["routes[1]", "path"]) == 11
    assert toml_line(path, ["routes[0]"]) == 7
    assert toml_line(path, ["plugins"]) == 1
    assert toml_line(path, ["nowhere"]) is None
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\nplugins = 1\n\n[tool.overdrive]\nplugins = ["cache"]\n\n'
        "[tool.overdrive.cache]\ndefault_ttl = -5\n"
    )
    assert toml_line(pyproject, ["plugins"]) == 6  # ours, not [project]'s
    assert toml_line(pyproject, ["cache", "default_ttl"]) == 9


def test_a_bad_route_in_a_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "overdrive.toml"
    path.write_text(TOML.replace('default_ttl = "soon"', "default_ttl = 5"))
    with pytest.raises(ConfigError, match=rf"routes\[1\]\.path: .* \(at {path}, line 11\)$"):
        Overdrive(path, env={})


def test_a_bad_value_from_the_environment_names_the_variable() -> None:
    env = {"OVERDRIVE_PLUGINS": "cache", "OVERDRIVE_CACHE__DEFAULT_TTL": "soon"}
    with pytest.raises(ConfigError, match=r"\(from OVERDRIVE_CACHE__DEFAULT_TTL\)$"):
        Overdrive({}, env=env)
    with pytest.raises(
        PluginLoadError, match=r"unknown plugin 'cahce'.*\(from OVERDRIVE_PLUGINS\)$"
    ):
        Overdrive({}, env={"OVERDRIVE_PLUGINS": "cahce"})
    with pytest.raises(ConfigError, match=r"cache\.nope: unknown setting.*OVERDRIVE_CACHE__NOPE"):
        Overdrive({"plugins": ["cache"]}, env={"OVERDRIVE_CACHE__NOPE": "1"})
    with pytest.raises(
        ConfigError, match=r"quarantine_after.*\(from OVERDRIVE_QUARANTINE_AFTER\)$"
    ):
        Overdrive({}, env={"OVERDRIVE_QUARANTINE_AFTER": "0"})


def test_python_config_errors_stay_as_they_were() -> None:
    with pytest.raises(ConfigError) as info:
        Overdrive({"plugins": ["cache"], "cache": {"default_ttl": "soon"}}, env={})
    assert str(info.value) == "cache.default_ttl: expected an integer or none, got 'soon'"


def test_a_stray_overdrive_variable_is_a_warning_by_name(caplog: pytest.LogCaptureFixture) -> None:
    env = {"OVERDRIVE_HOME": "/opt/x", "OVERDRIVE_TEAM__NAME": "video", "OVERDRIVE_PLUGINS": ""}
    with caplog.at_level(logging.WARNING, logger="overdrive"):
        host = Overdrive({}, env=env)
    assert "home" not in host.config
    warned = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert warned == [
        "OVERDRIVE_HOME: not an Overdrive setting (no key 'home'), ignored",
        "OVERDRIVE_TEAM__NAME: not an Overdrive setting (no key 'team'), ignored",
    ]


def test_an_unknown_key_in_a_file_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "overdrive.toml"
    path.write_text('plugins = []\nhome = "/opt/x"\n')
    with pytest.raises(ConfigError, match=rf"^home: unknown key; .* \(at {path}, line 2\)$"):
        Overdrive(path, env={})
