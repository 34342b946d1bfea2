"""Errors the framework raises, so that callers can catch ours and not others'."""

from __future__ import annotations


class OverdriveError(Exception):
    """Base of every error raised by Overdrive itself."""


class ConfigError(OverdriveError, ValueError):
    """The configuration is malformed; raised at startup, never at a request.

    The message names the key, the value and what was expected.
    """


class PluginLoadError(OverdriveError):
    """An enabled plugin could not be found, imported or instantiated."""


class PluginError(OverdriveError):
    """A plugin broke the hook contract (for example returned a non-ASGI response)."""

    def __init__(self, plugin: str, hook: str, message: str) -> None:
        super().__init__(f"plugin {plugin!r}, hook {hook!r}: {message}")
        self.plugin = plugin
        self.hook = hook


class PluginFailure(OverdriveError):
    """A fail-closed plugin raised: the request must fail (500, no exception text)."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        super().__init__(f"fail-closed plugin {plugin!r} raised in {hook!r}")
        self.plugin = plugin
        self.hook = hook
        self.error = error


class OperationRefused(OverdriveError):
    """An operation was refused before it ran (for example: its breaker is open).

    `retry_after` is a hint in seconds, or None.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
