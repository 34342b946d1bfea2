"""Resilience: circuit breakers, retries, timeouts, concurrency limits and rate limits.

The seed's standalone components (`CircuitBreaker`, `CircuitBreakerConfig`,
`AsyncIOOptimizer`) and the plugins that put them in front of an app:
`breaker`, `retry`, `timeout`, `concurrency`, `ratelimit`.
"""

from __future__ import annotations

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
