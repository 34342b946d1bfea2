"""`ScalingConfig` and `desired_size`: the seed's scaling bounds and the one rule that
applies them, shared by the tasks and concurrency plugins.

One definition, so that the same config means the same thing for a worker pool
(`overdrive.plugins.tasks.AutoScaler`) and a concurrency limit (the
`concurrency` plugin's ``scaling`` mode). It lives in a module of its own so
that neither plugin has to import the other (the tasks plugin pulls in taskiq).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from overdrive import ConfigError

__all__ = ["ScalingConfig", "desired_size"]


@dataclass
class ScalingConfig:
    """Bounds, thresholds and cooldowns. Fields may be changed while the scaler runs
    (``auto_scaler.config.scale_up_threshold = 0.7``); each change is validated."""

    min_workers: int = 1
    max_workers: int = 10
    scale_up_threshold: float = 0.8  # load per worker above which the pool grows
    scale_down_threshold: float = 0.3  # load per worker below which it shrinks
    check_interval: float = 1.0  # seconds between decisions
    scale_up_cooldown: float = 5.0  # seconds after a scale-up before the next one
    scale_down_cooldown: float = 30.0  # seconds after any change before a scale-down
    scale_up_step: int | None = None  # most workers added at once (None: no limit)
    scale_down_step: int | None = None  # most workers removed at once (None: no limit)

    def __post_init__(self) -> None:
        _validate({f.name: getattr(self, f.name) for f in fields(self)})
        object.__setattr__(self, "_ready", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_ready", False):
            values = {f.name: getattr(self, f.name) for f in fields(self)}
            if name not in values:
                raise AttributeError(f"ScalingConfig has no setting {name!r}")
            values[name] = value
            _validate(values)
        object.__setattr__(self, name, value)

    def update(self, **changes: Any) -> None:
        """Change several settings at once, validated together."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = sorted(set(changes) - set(values))
        if unknown:
            raise AttributeError(f"ScalingConfig has no setting {unknown[0]!r}")
        values.update(changes)
        _validate(values)
        for name, value in changes.items():
            object.__setattr__(self, name, value)


def _validate(v: dict[str, Any]) -> None:
    def fail(key: str, expected: str) -> None:
        raise ConfigError(f"scaling.{key}: expected {expected}, got {v[key]!r}")

    for key in ("min_workers", "max_workers"):
        if isinstance(v[key], bool) or not isinstance(v[key], int) or v[key] < 1:
            fail(key, "an integer >= 1")
    if v["max_workers"] < v["min_workers"]:
        fail("max_workers", f">= min_workers ({v['min_workers']})")
    for key in ("scale_up_threshold", "scale_down_threshold"):
        if isinstance(v[key], bool) or not isinstance(v[key], int | float) or not 0 < v[key] <= 1:
            fail(key, "a number in (0, 1]")
    if v["scale_down_threshold"] >= v["scale_up_threshold"]:
        fail("scale_down_threshold", f"< scale_up_threshold ({v['scale_up_threshold']})")
    if not isinstance(v["check_interval"], int | float) or v["check_interval"] <= 0:
        fail("check_interval", "a number of seconds > 0")
    for key in ("scale_up_cooldown", "scale_down_cooldown"):
        if not isinstance(v[key], int | float) or v[key] < 0:
            fail(key, "a number of seconds >= 0")
    for key in ("scale_up_step", "scale_down_step"):
        if v[key] is not None and (not isinstance(v[key], int) or v[key] < 1):
            fail(key, "an integer >= 1 or None")


def desired_size(
    c: ScalingConfig,
    current: int,
    load: float,
    now: float,
    last_up: float,
    last_change: float,
    unit: str = "worker",
) -> tuple[int, str]:
    """The scaling rule, without side effects: (desired size, reason).

    `load` is the units of work present (busy or waiting, on average). Per-unit
    load above ``scale_up_threshold`` grows the size to ``ceil(load /
    scale_up_threshold)`` (Kubernetes HPA's ``ceil(current * metric / target)``),
    at least one more and at most ``scale_up_step`` more, unless the last scale-up
    (`last_up`) is within ``scale_up_cooldown``; below ``scale_down_threshold`` it
    shrinks towards the same figure, unless the last change (`last_change`) is
    within ``scale_down_cooldown``. A size outside the bounds is brought back in.
    """
    pressure = load / current if current else math.inf
    target = max(c.min_workers, min(c.max_workers, math.ceil(load / c.scale_up_threshold)))
    if current < c.min_workers or current > c.max_workers:
        return min(max(current, c.min_workers), c.max_workers), "outside bounds"
    if pressure > c.scale_up_threshold and current < c.max_workers:
        if now - last_up < c.scale_up_cooldown:
            return current, "scale-up cooldown"
        desired = max(target, current + 1)
        if c.scale_up_step is not None:
            desired = min(desired, current + c.scale_up_step)
        return min(desired, c.max_workers), f"load {pressure:.2f}/{unit} > {c.scale_up_threshold}"
    if pressure < c.scale_down_threshold and current > c.min_workers:
        if now - last_change < c.scale_down_cooldown:
            return current, "scale-down cooldown"
        desired = min(target, current - 1)
        if c.scale_down_step is not None:
            desired = max(desired, current - c.scale_down_step)
        return max(desired, c.min_workers), f"load {pressure:.2f}/{unit} < {c.scale_down_threshold}"
    return current, "within thresholds"
