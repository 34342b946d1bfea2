"""Resilience: circuit breakers, retries, timeouts, concurrency limits and rate limits.

The seed's standalone components (`CircuitBreaker`, `CircuitBreakerConfig`,
`AsyncIOOptimizer`) and the plugins that put them in front of an app:
`breaker`, `retry`, `timeout`, `concurrency`, `ratelimit`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from overdrive.extras import install_hint

if TYPE_CHECKING:
    from .aio import AsyncIOOptimizer, BatchResults
    from .breaker import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError
    from .breaker_plugin import BreakerPlugin, BreakerSettings
    from .concurrency_plugin import ConcurrencyPlugin, ConcurrencySettings
    from .limiter import (
        AIMDController,
        ConcurrencyLimiter,
        GradientController,
        ScalingConfig,
        ScalingController,
        Shed,
    )
    from .ratelimit import RateLimiter, RateLimitPlugin, RateLimitSettings
    from .retry import RetryBudget, RetryPolicy
    from .retry_plugin import RetryPlugin, RetrySettings
    from .timeout_plugin import TimeoutPlugin, TimeoutSettings

# Imported on first use, not here: `ratelimit` needs `limits` and `retry` needs
# tenacity (the `resilience` extra), while `breaker`, `timeout` and `concurrency`
# need nothing beyond the core and must load without that extra.
_HOME = {
    "AsyncIOOptimizer": "aio",
    "BatchResults": "aio",
    "CircuitBreaker": "breaker",
    "CircuitBreakerConfig": "breaker",
    "CircuitOpenError": "breaker",
    "BreakerPlugin": "breaker_plugin",
    "BreakerSettings": "breaker_plugin",
    "ConcurrencyPlugin": "concurrency_plugin",
    "ConcurrencySettings": "concurrency_plugin",
    "AIMDController": "limiter",
    "ConcurrencyLimiter": "limiter",
    "GradientController": "limiter",
    "ScalingConfig": "limiter",
    "ScalingController": "limiter",
    "Shed": "limiter",
    "RateLimiter": "ratelimit",
    "RateLimitPlugin": "ratelimit",
    "RateLimitSettings": "ratelimit",
    "RetryBudget": "retry",
    "RetryPolicy": "retry",
    "RetryPlugin": "retry_plugin",
    "RetrySettings": "retry_plugin",
    "TimeoutPlugin": "timeout_plugin",
    "TimeoutSettings": "timeout_plugin",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        imported = importlib.import_module(f".{module}", __name__)
    except ModuleNotFoundError as exc:
        hint = install_hint(exc)
        if hint:
            exc.add_note(hint)
        raise
    value = getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


__all__ = [
    "AIMDController",
    "AsyncIOOptimizer",
    "BatchResults",
    "BreakerPlugin",
    "BreakerSettings",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitOpenError",
    "ConcurrencyLimiter",
    "ConcurrencyPlugin",
    "ConcurrencySettings",
    "GradientController",
    "RateLimitPlugin",
    "RateLimitSettings",
    "RateLimiter",
    "RetryBudget",
    "RetryPlugin",
    "RetryPolicy",
    "RetrySettings",
    "ScalingConfig",
    "ScalingController",
    "Shed",
    "TimeoutPlugin",
    "TimeoutSettings",
]
