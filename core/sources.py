"""Where each configuration value came from, so that an error can say so.

A configuration error names the key (``cache.default_ttl: expected an integer``);
the user also needs to know where to fix it: the environment variable that set it,
or the file and line. `Sources` records both as the configuration is merged
(`overdrive.config.resolve_sources`), and `Sources.where` answers for a key.
tomllib keeps no line numbers, so `toml_line` finds a key's line by reading the
file's table headers and ``key =`` lines; what it cannot find is reported by file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"""^\s*["']?([A-Za-z0-9_.-]+?)["']?\s*=""")
_INDEX = re.compile(r"^(\w+)\[(\d+)\]$")


@dataclass(slots=True)
class Sources:
    """The file the configuration was read from (if any) and what the environment set."""

    file: Path | None = None
    #: Dotted key (``cache.default_ttl``, ``plugins``, ``home``) -> environment variable.
    env: dict[str, str] = field(default_factory=dict)
    #: Top-level keys of the configuration before the environment was applied.
    base_keys: frozenset[str] = frozenset()

    def where(self, key: str) -> str | None:
        """``from OVERDRIVE_X`` or ``at overdrive.toml, line 4`` for `key`, else None."""
        if key.startswith("overdrive."):  # host settings are validated as "overdrive.<key>"
            key = key[len("overdrive.") :]
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            name = self.env.get(".".join(parts[:n]))
            if name:
                return f"from {name}"
        below = sorted(v for k, v in self.env.items() if k.startswith(key + "."))
        if below:
            return f"from {', '.join(below)}"
        if self.file is not None:
            line = toml_line(self.file, parts)
            if line is not None:
                return f"at {self.file}, line {line}"
        return None

    def stray(self, key: str) -> str | None:
        """The variable that alone brought top-level `key` in (not in the file), or None."""
        if key in self.base_keys:
            return None
        names = sorted(v for k, v in self.env.items() if k == key or k.startswith(key + "."))
        return ", ".join(names) or None

    def annotate(self, exc: Exception) -> None:
        """Append where the key of `exc` (a ``key: message`` error) came from, if known."""
        message = str(exc)
        key, sep, _ = message.partition(": ")
        if not sep or " " in key or key.startswith("OVERDRIVE_"):
            return
        where = self.where(key)
        if where:
            exc.args = (f"{message} ({where})",)


def toml_line(path: Path, parts: list[str]) -> int | None:
    """The 1-based line of the dotted key `parts` in a TOML file, or None.

    Understands ``[table]``, ``[[routes]]`` (``routes[1]`` is the second), inline
    tables (the line of ``table = {...}``) and pyproject's ``[tool.overdrive]`` prefix.
    """
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    prefix = "tool.overdrive." if path.name == "pyproject.toml" else ""
    table, index = parts[0], None
    match = _INDEX.match(table)
    if match:
        table, index = match[1], int(match[2])
    rest = parts[1:]
    # The header we are under, without the prefix: "" for our root table, "\0" for others'.
    section = "\0" if prefix else ""
    seen = -1  # [[table]] headers seen so far
    found_section: int | None = None
    for number, line in enumerate(lines, 1):
        header = _HEADER.match(line)
        if header:
            name = header[2].replace('"', "").replace("'", "")
            if prefix:
                if name != prefix[:-1] and not name.startswith(prefix):
                    section = "\0"  # some other tool's table
                    continue
                name = name[len(prefix) :]
            section = name
            if name == table:
                if header[1] == "[[":
                    seen += 1
                    if seen != index:
                        continue
                if not rest:
                    return number
                found_section = number
            continue
        assign = _ASSIGN.match(line)
        if not assign:
            continue
        key = assign[1]
        if section == table and (index is None or seen == index) and rest and key == rest[0]:
            return number
        if section == "" and key == table:
            return number
    return found_section
