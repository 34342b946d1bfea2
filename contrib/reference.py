"""The configuration reference, generated from the settings dataclasses themselves.

Why it exists: a hand-written settings table drifts from the code the first
time someone adds a field. `overdrive reference > docs/reference/configuration.md`
writes every key of the host and of every built-in plugin (type, default, and
the comment next to the field: a ``#:`` line above it or a ``#`` comment on
its line), and a test regenerates the page and compares, so it cannot drift.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from overdrive.config import HostSettings, PluginFlags
from overdrive.discovery import discover

__all__ = ["field_docs", "render_reference", "type_name"]

HEADER = """\
# Configuration reference

Generated from the settings classes by `overdrive reference`; do not edit by
hand (`tests/test_reference.py` fails when this page and the code disagree).
Regenerate with:

    .venv/bin/overdrive reference > docs/reference/configuration.md

How configuration is read (files, `[[routes]]`, environment variables) is in
[configuration.md](../configuration.md). "unset" means the key's value is
`None` (leave it out of the file). Keys marked "per route" may also be set in a
`[[routes]]` rule or an endpoint's `policy(...)`.
"""


def type_name(tp: Any) -> str:
    """A reader's name for an annotation: ``int``, ``float | unset``, ``"lru" | "ttl"``."""
    if tp is type(None):
        return "unset"
    if tp is Any:
        return "any"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        names = [type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            names.append("unset")
        return " | ".join(names)
    if origin is Literal:
        return " | ".join(_toml(v) for v in get_args(tp))
    if origin in (list, tuple, set, frozenset, typing.Sequence):
        items = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(items[0])}" if items else "list"
    if origin is dict or tp is dict:
        args = get_args(tp)
        return f"table of {type_name(args[1])}" if len(args) == 2 else "table"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"table ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _toml(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return "[" + ", ".join(_toml(v) for v in items) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "(see below)"
    return repr(value)


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return _toml(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _toml(f.default_factory())
    return "(required)"


def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in `cls`'s source: ``#:`` lines above it, or a ``#`` on its line."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    lines = source.splitlines()
    tree = ast.parse(source)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}
    docs: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        line = stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#:"):
            above.insert(0, lines[line - 1].strip()[2:].strip())
            line -= 1
        text = ""
        for lineno in sorted({stmt.lineno, stmt.end_lineno or stmt.lineno}):
            comment = comments.get(lineno, "").lstrip("#:").strip()
            if comment and not comment.startswith(("noqa", "type:")):
                text = comment
        docs[stmt.target.id] = " ".join([*above, text]).strip()
    return docs


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _nested(tp: Any) -> list[type]:
    """Dataclasses used inside a field's type (a table, or the values of a table)."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return [tp]
    found: list[type] = []
    for arg in get_args(tp):
        found.extend(_nested(arg))
    return found


def _summary(cls: type) -> str:
    """The first paragraph of `cls`'s own docstring (not an inherited one)."""
    doc = cls.__dict__.get("__doc__")
    if not doc or (dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "(")):
        return ""  # none, or the signature dataclasses writes when there is none
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def settings_table(cls: type, where: str) -> list[str]:
    """Markdown for one settings class, then for each dataclass nested in it."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type]] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints.get(f.name, Any)
        out.append(
            f"| `{f.name}` | {_cell(type_name(tp))} | `{_cell(_default(f))}` "
            f"| {_cell(docs.get(f.name, ''))} |"
        )
        for sub in _nested(tp):
            origin = get_origin(tp)
            nested.append((f"{where}.{f.name}" + (".NAME" if origin is dict else ""), sub))
    for sub_where, sub in nested:
        doc = _summary(sub)
        out += ["", f"`[{sub_where}]` ({sub.__name__}){': ' + doc if doc else ''}"]
        out += ["", *settings_table(sub, sub_where)]
    return out


def builtin_plugins() -> dict[str, Any]:
    """Name -> plugin class, for the plugins this distribution declares (sorted by name)."""
    found = {}
    for name, d in sorted(discover().items()):
        if d.distribution == "overdrive":
            found[name] = d.load()
    return found


def render_reference() -> str:
    """The whole Markdown page."""
    out = [HEADER, "## Host settings (top-level keys)", ""]
    out += [
        "Besides these: `plugins` (the enabled plugins, in run order), `routes` (the",
        "route rules) and `redis_url` (a Redis that plugins taking one use by default).",
        "",
    ]
    out += settings_table(HostSettings, "overdrive")
    out += ["", "## Keys of every plugin's table", ""]
    out += settings_table(PluginFlags, "PLUGIN")
    for name, plugin in builtin_plugins().items():
        cls = plugin if isinstance(plugin, type) else type(plugin)
        summary = _summary(cls)
        out += ["", f"## `[{name}]`", ""]
        if summary:
            out += [summary, ""]
        where = f"{cls.__module__}:{cls.__name__}"
        out += [f"Plugin `{where}`; see [{name}](../plugins/{name}.md).", ""]
        settings_cls = getattr(cls, "Settings", None)
        if not (isinstance(settings_cls, type) and dataclasses.is_dataclass(settings_cls)):
            out.append("No settings.")
        else:
            out += settings_table(settings_cls, name)
    return "\n".join(out).rstrip() + "\n"
