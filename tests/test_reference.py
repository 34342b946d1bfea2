"""The configuration reference is generated from the settings classes and cannot drift."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from overdrive.cli import main
from overdrive.contrib.reference import builtin_plugins, field_docs, render_reference, type_name

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reference" / "configuration.md"
REGENERATE = ".venv/bin/overdrive reference > docs/reference/configuration.md"


def test_the_committed_reference_is_current() -> None:
    assert PAGE.read_text() == render_reference(), f"out of date; regenerate: {REGENERATE}"


def test_the_command_prints_the_reference(capsys: object) -> None:
    assert main(["reference"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert out == render_reference()
    assert "| `quarantine_after` | int | `20` |" in out
    assert "| `fail_closed` | bool | `false` |" in out


def test_every_builtin_plugin_has_a_section_and_a_page() -> None:
    text = render_reference()
    for name in builtin_plugins():
        assert f"## `[{name}]`" in text
        assert (ROOT / "docs" / "plugins" / f"{name}.md").is_file(), f"docs/plugins/{name}.md"


@dataclass
class Sample:
    """A sample settings class."""

    #: Documented above,
    #: on two lines.
    first: int = 1
    second: str | None = None  # documented beside
    third: Literal["a", "b"] = "a"
    fourth: list[float] = field(default_factory=lambda: [0.5])
    fifth: dict[str, int] = field(default_factory=dict)
    # a plain comment is not documentation
    sixth: bool = True


def test_field_docs_reads_both_comment_styles() -> None:
    assert field_docs(Sample) == {
        "first": "Documented above, on two lines.",
        "second": "documented beside",
        "third": "",
        "fourth": "",
        "fifth": "",
        "sixth": "",
    }


def test_type_names_read_like_toml() -> None:
    assert type_name(int) == "int"
    assert type_name(str | None) == "str | unset"
    assert type_name(Literal["a", "b"]) == '"a" | "b"'
    assert type_name(list[float]) == "list of float"
    assert type_name(dict[str, int]) == "table of int"
    assert type_name(Sample) == "table (Sample)"
