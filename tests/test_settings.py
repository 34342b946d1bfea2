"""Typed settings: coercion from TOML and environment strings, errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from overdrive import ConfigError
from overdrive.settings import merge_settings, validate_settings


@dataclass
class Example:
    ttl: int = 60
    ratio: float = 0.5
    enabled: bool = True
    url: str | None = None
    policy: Literal["lru", "s3fifo"] = "lru"
    names: list[str] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ttl < 0:
            raise ConfigError(f"ttl: expected >= 0, got {self.ttl}")


def test_defaults_and_values() -> None:
    s = validate_settings(Example, {"ttl": 5, "names": ["a"]}, "cache")
    assert (s.ttl, s.names, s.policy) == (5, ["a"], "lru")


def test_environment_strings_are_coerced() -> None:
    s = validate_settings(
        Example,
        {"ttl": "60", "ratio": "0.25", "enabled": "false", "url": "none", "names": "a, b"},
        "cache",
    )
    assert (s.ttl, s.ratio, s.enabled, s.url, s.names) == (60, 0.25, False, None, ["a", "b"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"ttl": "abc"}, "cache.ttl: expected an integer, got 'abc'"),
        ({"ttl": True}, "cache.ttl: expected an integer, got True"),
        ({"enabled": "maybe"}, "cache.enabled: expected a boolean, got 'maybe'"),
        ({"policy": "fifo"}, "cache.policy: expected one of 'lru', 's3fifo', got 'fifo'"),
        ({"limits": {"a": "x"}}, "cache.limits.a: expected an integer, got 'x'"),
        ({"nope": 1}, "cache.nope: unknown setting (value 1); expected one of:"),
        ({"ttl": -1}, "ttl: expected >= 0, got -1"),
    ],
)
def test_errors_name_key_value_and_expectation(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_settings(Example, data, "cache")
    assert message in str(info.value)


def test_merge_validates_the_whole() -> None:
    base = validate_settings(Example, {"ttl": 5}, "cache")
    merged = merge_settings(base, {"ratio": 0.9}, "routes[0].cache")
    assert (merged.ttl, merged.ratio) == (5, 0.9)
    assert base.ratio == 0.5  # the base is untouched
    with pytest.raises(ConfigError, match=r"routes\[0\]\.cache\.ttl"):
        merge_settings(base, {"ttl": "x"}, "routes[0].cache")
