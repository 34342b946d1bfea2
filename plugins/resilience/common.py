"""Small pieces the resilience plugins share: the reject response and route naming."""

from __future__ import annotations

from typing import Any

from overdrive.middleware.responses import PlainResponse

__all__ = ["REJECTED", "reject", "route_name"]

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
