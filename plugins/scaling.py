"""`ScalingConfig`, the seed's scaling bounds, shared by the tasks and concurrency plugins.

One definition, so that the same config means the same thing for a worker pool
(`overdrive.plugins.tasks.AutoScaler`) and a concurrency limit (the
`concurrency` plugin's ``scaling`` mode). It lives in a module of its own so
that neither plugin has to import the other (the tasks plugin pulls in taskiq).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from overdrive import ConfigError

__all__ = ["ScalingConfig"]


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
