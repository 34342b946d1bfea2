"""Where configuration comes from: Python, `overdrive.toml`, `[tool.overdrive]`, environment.

The shape is the same everywhere::

    plugins = ["ratelimit", "cache"]     # enabled, in order
    [cache]                              # one table per plugin
    default_ttl = 60
    [[routes]]                           # per-route overrides
    path = "/thumbnails/*"
    cache = { ttl = 3600 }

Environment variables override files: ``OVERDRIVE_PLUGINS=cache,profiler`` and
``OVERDRIVE_CACHE__DEFAULT_TTL=60`` (plugin, double underscore, key).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .sources import Sources

ENV_PREFIX = "OVERDRIVE_"


@dataclass(slots=True)
class HostSettings:
    """Settings of the host itself (top-level keys beside `plugins` and `routes`)."""

    #: Call hooks through pluggy's own hook calling, so pluggy's tracing sees them.
    trace: bool = False
    #: Incoming header trusted as the request id when sane; also set on responses.
    request_id_header: str = "x-request-id"
    #: Errors from one plugin within `quarantine_window` seconds that quarantine it.
    quarantine_after: int = 20
    #: Seconds over which `quarantine_after` counts a plugin's errors.
    quarantine_window: float = 10.0
    #: How long a quarantined plugin is skipped before it is tried again.
    quarantine_seconds: float = 30.0
    #: Time every Nth request's hook calls (count, total, max per plugin and hook);
    #: 1 times every call, 0 turns timing off. Sampling keeps the hot path cheap.
    hook_timing_sample: int = 16
    #: When the app's lifespan start-up completes, collect once and `gc.freeze()` what is
    #: left, so the collector's full passes skip start-up's objects (tail latency).
    gc_freeze: bool = True

    def __post_init__(self) -> None:
        if self.quarantine_after < 1:
            raise ConfigError(f"quarantine_after: expected >= 1, got {self.quarantine_after!r}")
        if self.hook_timing_sample < 0:
            raise ConfigError(f"hook_timing_sample: expected >= 0, got {self.hook_timing_sample!r}")
        if self.quarantine_window <= 0 or self.quarantine_seconds <= 0:
            raise ConfigError("quarantine_window and quarantine_seconds: expected > 0")
        name = self.request_id_header
        if not name or not name.isascii() or any(c in name for c in " :\r\n"):
            raise ConfigError(f"request_id_header: expected a header name, got {name!r}")
        self.request_id_header = name.lower()


@dataclass(slots=True)
class PluginFlags:
    """Keys any plugin's table may hold besides its own settings."""

    #: A raising hook fails the request (500, no exception text) instead of being skipped.
    fail_closed: bool = False
    #: Run the plugin but only log the short-circuits it would have made.
    shadow: bool = False


def find_config_file(directory: Path | None = None) -> Path | None:
    """`$OVERDRIVE_CONFIG`, else ./overdrive.toml, else ./pyproject.toml with [tool.overdrive]."""
    explicit = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if explicit:
        return Path(explicit)
    directory = directory or Path.cwd()
    candidate = directory / "overdrive.toml"
    if candidate.is_file():
        return candidate
    pyproject = directory / "pyproject.toml"
    if pyproject.is_file():
        text = pyproject.read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            # Ours if it names our table: load_file then reports the syntax error.
            return pyproject if "[tool.overdrive" in text else None
        if "overdrive" in data.get("tool", {}):
            return pyproject
    return None


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a config file; a pyproject's `[tool.overdrive]` table or a whole overdrive.toml."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: invalid TOML: {exc}") from None
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("overdrive", {})
    return dict(data)


def apply_env(
    config: Mapping[str, Any], env: Mapping[str, str], origins: dict[str, str] | None = None
) -> dict[str, Any]:
    """`config` with ``OVERDRIVE_*`` variables applied (values stay strings; settings coerce).

    `origins`, when given, receives dotted key -> the variable that set it.
    """
    origins = {} if origins is None else origins
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key == "plugins":
            out["plugins"] = [p.strip() for p in value.split(",") if p.strip()]
            origins[key] = name
        elif "__" in key:
            table, _, setting = key.partition("__")
            section = out.setdefault(table, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{name}: {table!r} is not a table in the configuration")
            section[setting] = value
            origins[f"{table}.{setting}"] = name
        else:
            out[key] = value
            origins[key] = name
    return out


def resolve_config(
    config: Mapping[str, Any] | str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The merged configuration dict from whichever source was given, plus environment."""
    return resolve_sources(config, env)[0]


def resolve_sources(
    config: Mapping[str, Any] | str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
) -> tuple[dict[str, Any], Sources]:
    """`resolve_config`, and where its values came from (for error messages)."""
    sources = Sources()
    if config is None:
        found = find_config_file()
        base: Mapping[str, Any] = load_file(found) if found else {}
        sources.file = found
    elif isinstance(config, Mapping):
        base = config
    else:
        base = load_file(config)
        sources.file = Path(config)
    merged = apply_env(base, os.environ if env is None else env, sources.env)
    sources.base_keys = frozenset(base)
    return merged, sources
