"""An optional base class for plugins: a name, a typed settings dataclass, flags.

Plugins need not inherit from it; the host reads the same attributes from any
object. It exists so that a plugin module reads top to bottom: settings, the
standalone primitive, then the hook implementations.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Plugin:
    """Base for plugins. Subclasses set `name` and usually `Settings` (a dataclass).

    The host validates the plugin's config table into ``self.settings`` before
    `overdrive_configure` runs. `provides` maps attribute names on the host to
    attributes of the plugin, so that ``host.cache`` reaches the cache plugin's
    `AsyncCache` (the seed's ``system.cache``). `metric_families` declares the metric
    families its figures become (see `overdrive.metrics`).
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type | None] = None
    provides: ClassVar[dict[str, str]] = {}
    #: The plugin's metric families (`overdrive.metrics.MetricFamily`): what the
    #: Prometheus exporter reads out of its `collect_stats` figures, and nothing else.
    metric_families: ClassVar[tuple[Any, ...]] = ()
    fail_closed: bool = False
    shadow: bool = False

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings
