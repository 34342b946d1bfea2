"""Finding plugins: entry points of the group `overdrive.plugins`, dotted paths, objects.

pluggy's own `load_setuptools_entrypoints` registers everything it finds; here
discovered is not enabled, so entry points are listed without importing them,
and only the enabled ones are loaded. A plugin that fails to import is
reported (`overdrive plugins`) and does not stop the others.

Reading installed-package metadata is most of what building a host costs (about
20 ms), so the listing is kept per process and read again only when the import
path changes: an entry of `sys.path` added, removed, or modified (installing or
removing a package changes its directory's mtime). `forget()` drops it
explicitly, for a package installed in a way that leaves both unchanged.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import PluginLoadError
from .extras import install_hint

GROUP = "overdrive.plugins"


@dataclass(slots=True)
class Discovered:
    """One entry point of the `overdrive.plugins` group."""

    name: str
    value: str
    distribution: str
    version: str
    entry_point: EntryPoint

    def load(self) -> Any:
        try:
            return self.entry_point.load()
        except Exception as exc:
            reason = install_hint(exc) or f"{type(exc).__name__}: {exc}"
            raise PluginLoadError(
                f"plugin {self.name!r} ({self.value}, from {self.distribution} {self.version}) "
                f"failed to load: {reason}"
            ) from exc


_cache: tuple[tuple[tuple[str, int], ...], dict[str, Discovered]] | None = None


def _path_key() -> tuple[tuple[str, int], ...]:
    key = []
    for entry in sys.path:
        try:
            mtime = os.stat(entry or ".").st_mtime_ns
        except OSError:
            mtime = -1
        key.append((entry, mtime))
    return tuple(key)


def forget() -> None:
    """Read the installed plugins again at the next `discover()`."""
    global _cache
    _cache = None


def discover() -> dict[str, Discovered]:
    """Every plugin declared through the entry-point group, by name (not imported).

    A new dict each call (callers may change it); the listing behind it is cached
    per process while `sys.path` and its directories are unchanged.
    """
    global _cache
    key = _path_key()
    cached = _cache
    if cached is None or cached[0] != key:
        cached = _cache = (key, _read())
    return dict(cached[1])


def _read() -> dict[str, Discovered]:
    found: dict[str, Discovered] = {}
    for ep in entry_points(group=GROUP):
        dist = ep.dist
        found.setdefault(
            ep.name,
            Discovered(
                ep.name,
                ep.value,
                dist.metadata["Name"] if dist is not None else "?",
                dist.version if dist is not None else "?",
                ep,
            ),
        )
    return found


def import_path(path: str) -> Any:
    """Import ``"package.module:attr"`` or ``"package.module.attr"``."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise PluginLoadError(f"plugin path {path!r}: expected 'module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        reason = install_hint(exc) or exc
        raise PluginLoadError(f"plugin path {path!r} failed to load: {reason}") from exc
    return obj


def plugin_name(obj: Any) -> str:
    """A plugin's name: its `name` attribute, else its class name in lower case."""
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name:
        return name
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.__name__.lower()
