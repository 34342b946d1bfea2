"""Small pieces the resilience plugins share: the reject response, route naming and the
checks of per-operation setting tables."""

from __future__ import annotations

import dataclasses
from typing import Any

from overdrive.errors import ConfigError
from overdrive.middleware.responses import PlainResponse
from overdrive.settings import merge_settings

__all__ = ["REJECTED", "check_operations", "reject", "route_name"]

# ctx.state key set by a plugin that answered instead of the app (shed, limited, open):
# the breaker does not count such answers as the app's outcome.
REJECTED = "rejected"


def reject(
    status: int,
    text: str,
    retry_after: float | None,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> PlainResponse:
    """A short text answer with ``Retry-After`` in whole seconds (at least 1)."""
    seconds = None if retry_after is None else max(1, retry_after)
    return PlainResponse(status, text.encode(), list(headers), retry_after=seconds)


def route_name(policy: Any, plugin: str) -> str | None:
    """The name of the route rules that configure `plugin` for this policy, or None."""
    paths = [
        rule.name or rule.path for rule in getattr(policy, "rules", ()) if plugin in rule.overrides
    ]
    return "|".join(paths) if paths else None


def check_operations(settings: Any, plugin: str) -> None:
    """Validate ``settings.operations`` (name -> table of overrides) now, at config time:
    each table must merge onto `settings` (no nested ``operations``), errors naming
    ``<plugin>.operations.<name>.<key>``."""
    for op, table in settings.operations.items():
        where = f"{plugin}.operations.{op}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {table!r}")
        if "operations" in table:
            raise ConfigError(f"{where}.operations: not allowed inside an operation")
        try:
            merge_settings(dataclasses.replace(settings, operations={}), table, where)
        except ConfigError as exc:
            message = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
            raise ConfigError(message) from None
