"""The seed's all-in-one systems: a host with the seed's components enabled.

`AdvancedPerformanceSystem(redis_url=...)` and
`PerformanceOptimizationSystem(redis_client=...)` are the names the seed's
guide uses. They are an `Overdrive` host that, when no configuration is given
(no argument, no overdrive.toml, no [tool.overdrive]), enables every installed
built-in plugin that implements one of the seed's components, on its embedded
default; and `get_system_stats()` also answers in the seed's keys
(``auto_scaler``, ``circuit_breakers``, ``profiles``, ``cache_hit_rate``,
``avg_response_time``) beside the per-plugin sections.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from .config import find_config_file
from .discovery import discover
from .host import Overdrive

# The plugins holding the seed's components (DESIGN.md section 5), in run order.
SEED_PLUGINS = (
    "profiler",
    "memory",
    "breaker",
    "retry",
    "timeout",
    "cache",
    "predictive",
    "gpu",
    "models",
    "query",
    "pools",
    "tasks",
)


def seed_plugins() -> list[str]:
    """The seed's plugins that are installed (built-in, from our own distribution)."""
    found = discover()
    return [n for n in SEED_PLUGINS if n in found and found[n].distribution == "overdrive"]


class AdvancedPerformanceSystem(Overdrive):
    """The seed's system: `initialize`, `cleanup`, `optimized_operation`,
    `get_system_stats`, and the components as attributes (``system.profiler``,
    ``system.cache``, ``system.gpu_optimizer``, ``system.connection_pool_manager``, ...).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        redis_url: str | None = None,
        redis_client: Any = None,
        plugins: Sequence[Any] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        if config is None and find_config_file() is None:
            config = {"plugins": seed_plugins()}
        # Plugins that use Redis take `redis_client` when they have no URL of their own.
        state = {"redis_client": redis_client} if redis_client is not None else {}
        super().__init__(config, plugins=plugins, env=env, redis_url=redis_url, state=state)

    async def get_system_stats(self, *, exclude: Collection[str] = ()) -> dict[str, Any]:
        stats = await super().get_system_stats(exclude=exclude)
        tasks = stats.get("tasks") or {}
        stats.setdefault(
            "auto_scaler",
            tasks.get("auto_scaler") or {"current_workers": tasks.get("current_workers", 0)},
        )
        stats.setdefault("circuit_breakers", stats.get("breaker") or {})

        profiler = stats.get("profiler") or {}
        stats.setdefault("profiles", profiler.get("profiles", {}))
        stats.setdefault("avg_response_time", (profiler.get("latency") or {}).get("avg", 0.0))
        stats.setdefault("cache_hit_rate", (stats.get("cache") or {}).get("hit_rate", 0.0))
        return stats


PerformanceOptimizationSystem = AdvancedPerformanceSystem
