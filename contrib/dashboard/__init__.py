"""The live dashboard's files: one HTML page, its script and its styles.

They ship in the wheel as package data (no CDN, no build step) and are served
by the `stats` plugin at ``/overdrive/``. The page polls ``/overdrive/stats``
and draws its charts on plain canvases; it reads whichever sections the
stats hold and shows "not enabled" for the others.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

__all__ = ["ASSETS", "generate_performance_dashboard", "performance_dashboard", "read_asset"]

ASSETS = ("index.html", "dashboard.js", "dashboard.css")


def read_asset(name: str) -> bytes:
    """The bytes of one of `ASSETS`."""
    if name not in ASSETS:
        raise KeyError(name)
    return files(__name__).joinpath(name).read_bytes()


def performance_dashboard(stats: dict[str, Any]) -> dict[str, Any]:
    """`host.get_system_stats()` in the shape of the seed's monitoring dashboard.

    ``system_health`` (cpu_usage, memory_usage in percent, gpu_usage, active_connections),
    ``performance_metrics`` (cache_hit_rate, avg_response_time in seconds, active_workers),
    ``circuit_breakers`` and ``profiles``; figures of plugins that are not enabled are
    absent or zero, as the seed's ``.get(..., 0)`` reads them.
    """
    system = stats.get("system") or {}
    profiler = stats.get("profiler") or {}
    cache = stats.get("cache") or {}
    tasks = stats.get("tasks") or {}
    pools = stats.get("pools") or {}
    breaker = stats.get("breaker") or {}
    return {
        "timestamp": stats.get("timestamp"),
        "system_health": {
            "cpu_usage": system.get("cpu_percent", 0),
            "memory_usage": system.get("memory_percent", 0),
            "gpu_usage": stats.get("gpu") or {},
            "active_connections": len(pools.get("pools") or {}) if isinstance(pools, dict) else 0,
        },
        "performance_metrics": {
            "cache_hit_rate": cache.get("hit_rate", 0),
            "avg_response_time": (profiler.get("latency") or {}).get("avg", 0),
            "active_workers": tasks.get("current_workers", 0),
        },
        "circuit_breakers": _breakers(breaker),
        "profiles": profiler.get("profiles", {}),
    }


def _breakers(section: Any) -> dict[str, Any]:
    """{name: stats} from the breaker section: the plugin's own shape or {"breakers": ...}."""
    if not isinstance(section, dict):
        return {}
    if isinstance(section.get("breakers"), dict):
        return dict(section["breakers"])
    return {k: v for k, v in section.items() if isinstance(v, dict) and "state" in v}


async def generate_performance_dashboard(host: Any) -> dict[str, Any]:
    """The seed's ``generate_performance_dashboard()``, from a host."""
    return performance_dashboard(await host.get_system_stats())
