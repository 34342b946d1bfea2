"""The `models` plugin: lazy loading (`LazyLoader`, `LazyDict`) and `ModelCache`.

`host.model_cache` is the plugin's `ModelCache`; register models on it at
startup. The plugin unloads models on `on_memory_pressure`, reports them in
`collect_stats` and unloads everything at shutdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from overdrive import ConfigError, Plugin, hookimpl
from overdrive.metrics import MetricFamily as F

from .cache import ModelCache, ModelCacheFull, measure_bytes
from .lazy import LazyDict, LazyLoader, LoadError

__all__ = [
    "LazyDict",
    "LazyLoader",
    "LoadError",
    "ModelCache",
    "ModelCacheFull",
    "ModelsPlugin",
    "measure_bytes",
]


@dataclass
class ModelsSettings:
    max_host_bytes: int | None = None  # host RAM for models (parked ones included); None: no limit
    max_gpu_bytes: int | None = None  # per accelerator device; None: no limit
    park_on_evict: bool = True  # a model evicted from a GPU is kept in host RAM if it fits
    load_timeout: float | None = None  # seconds a loader may take; None: no limit

    def __post_init__(self) -> None:
        for key in ("max_host_bytes", "max_gpu_bytes", "load_timeout"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"models.{key}: expected > 0 or none, got {value!r}")


class ModelsPlugin(Plugin):
    name = "models"
    metric_families = (
        F(
            "model_state",
            "gauge",
            "1 for the state each model is in",
            "models.*.state",
            labels=("model", "state"),
            states=("unloaded", "loaded", "parked"),
        ),
        F(
            "model_size_bytes",
            "gauge",
            "Memory a model takes when loaded",
            "models.*.size_bytes",
            unit="bytes",
            labels=("model",),
        ),
        F(
            "model_pinned",
            "gauge",
            "1 when the model is never evicted",
            "models.*.pinned",
            labels=("model",),
        ),
        F(
            "model_loads",
            "counter",
            "Times a model was loaded",
            "models.*.loads",
            labels=("model",),
        ),
        F(
            "model_hits",
            "counter",
            "get_model calls answered by a loaded model",
            "models.*.hits",
            labels=("model",),
        ),
        F(
            "model_evictions",
            "counter",
            "Times a model was evicted",
            "models.*.evictions",
            labels=("model",),
        ),
        F(
            "model_parks",
            "counter",
            "Times a model was parked on the CPU",
            "models.*.parks",
            labels=("model",),
        ),
        F(
            "model_restores",
            "counter",
            "Times a parked model was restored",
            "models.*.restores",
            labels=("model",),
        ),
        F("model_failures", "counter", "Loads that failed", "models.*.failures", labels=("model",)),
        F(
            "model_load_duration_seconds",
            "gauge",
            "Seconds the model's last load took",
            "models.*.load_seconds",
            unit="seconds",
            labels=("model",),
        ),
        F(
            "models_used_bytes",
            "gauge",
            "Memory held by loaded models, per device",
            "used_bytes.*",
            unit="bytes",
            labels=("device",),
        ),
        F(
            "models_lookups",
            "counter",
            "get_model calls, by result",
            "(hits=hit|misses=miss)",
            labels=("result",),
        ),
        F(
            "models_pressure_unloads",
            "counter",
            "Models unloaded under memory pressure",
            "pressure_unloads",
        ),
    )
    Settings = ModelsSettings
    provides: ClassVar[dict[str, str]] = {"model_cache": "model_cache", "models": "model_cache"}

    def __init__(self, settings: ModelsSettings | None = None) -> None:
        super().__init__(settings)
        self.model_cache = ModelCache()

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: ModelsSettings = self.settings
        mc = self.model_cache
        mc.max_host_bytes = s.max_host_bytes
        mc.max_gpu_bytes = s.max_gpu_bytes
        mc.park_on_evict = s.park_on_evict
        mc.load_timeout = s.load_timeout
        if mc.cache is None:
            cache_plugin = host.get_plugin("cache")
            mc.cache = getattr(cache_plugin, "cache", None)

    @hookimpl
    async def on_memory_pressure(self, host: Any, level: str) -> None:
        await self.model_cache.on_memory_pressure(level)

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        return self.model_cache.stats()

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        await self.model_cache.unload_all()
