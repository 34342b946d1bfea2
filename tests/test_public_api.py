"""The public names are exported once, sorted, and pinned here (as httpx does)."""

import overdrive
import overdrive.middleware


def test_all_is_sorted_and_pinned() -> None:
    assert overdrive.__all__ == sorted(overdrive.__all__)
    assert overdrive.__all__ == [
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
    for name in overdrive.__all__:
        assert hasattr(overdrive, name), name


def test_middleware_exports() -> None:
    assert overdrive.middleware.__all__ == ["OverdriveMiddleware"]
