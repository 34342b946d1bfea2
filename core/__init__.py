"""Overdrive: a pluggy plugin host and one pure-ASGI middleware for slow, GPU-bound APIs."""

# Dynamic batching is a decorator, not a plugin: `@overdrive.batch(...)`.
from overdrive.plugins.batching import batch

from .config import HostSettings, PluginFlags
from .context import Capture, CapturedResponse, Lease, Operation, RequestContext
from .errors import (
    ConfigError,
    OperationRefused,
    OverdriveError,
    PluginError,
    PluginFailure,
    PluginLoadError,
)
from .hookspecs import hookimpl, hookspec
from .host import Overdrive
from .plugin import Plugin
from .routes import RoutePolicy, RouteRule
from .system import AdvancedPerformanceSystem, PerformanceOptimizationSystem

__version__ = "0.1.0"


__all__ = [
    "AdvancedPerformanceSystem",
    "Capture",
    "CapturedResponse",
    "ConfigError",
    "HostSettings",
    "Lease",
    "Operation",
    "OperationRefused",
    "Overdrive",
    "OverdriveError",
    "PerformanceOptimizationSystem",
    "Plugin",
    "PluginError",
    "PluginFailure",
    "PluginFlags",
    "PluginLoadError",
    "RequestContext",
    "RoutePolicy",
    "RouteRule",
    "__version__",
    "batch",
    "hookimpl",
    "hookspec",
]
