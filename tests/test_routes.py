"""Route rules: patterns, methods, merge order, and a cost that does not grow with rules."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from overdrive import ConfigError
from overdrive.routes import RouteTable, parse_rules


@dataclass
class CacheSettings:
    ttl: int | None = None
    enabled: bool = True


def table(*rules: dict[str, object]) -> RouteTable:
    return RouteTable(parse_rules(list(rules), {"cache"}), {"cache": CacheSettings()})


def ttl(t: RouteTable, path: str, method: str = "GET") -> int | None:
    return t.lookup(method, path).settings["cache"].ttl


def test_patterns() -> None:
    t = table(
        {"path": "/thumbnails/*", "cache": {"ttl": 1}},
        {"path": "/videos/{id}/stream", "cache": {"ttl": 2}},
        {"path": "/static/**", "cache": {"ttl": 3}},
        {"path": "/files/{rest:path}", "cache": {"ttl": 4}},
        {"path": "/exact", "cache": {"ttl": 5}},
    )
    assert ttl(t, "/thumbnails/42") == 1
    assert ttl(t, "/thumbnails/42/big") is None  # * is one segment
    assert ttl(t, "/thumbnails") is None
    assert ttl(t, "/videos/7/stream") == 2
    assert ttl(t, "/static/css/site.css") == 3
    assert ttl(t, "/static") == 3  # ** matches an empty rest too
    assert ttl(t, "/files/a/b/c") == 4
    assert ttl(t, "/exact/") == 5  # trailing slash is not a different route
    assert ttl(t, "/other") is None


def test_methods_and_later_rules_win() -> None:
    t = table(
        {"path": "/api/**", "cache": {"ttl": 10, "enabled": False}},
        {"path": "/api/videos/*", "methods": ["get"], "cache": {"ttl": 20}},
    )
    get = t.lookup("GET", "/api/videos/1")
    assert (get.settings["cache"].ttl, get.settings["cache"].enabled) == (20, False)
    assert [r.path for r in get.rules] == ["/api/**", "/api/videos/*"]
    assert ttl(t, "/api/videos/1", "POST") == 10
    # A path no rule matches shares the one default policy object.
    assert t.lookup("GET", "/x") is t.default


def test_thousand_rules_resolve_like_one() -> None:
    rules = [{"path": f"/area{i}/*/x", "cache": {"ttl": i}} for i in range(1000)]
    t = table(*rules)
    assert ttl(t, "/area999/abc/x") == 999
    assert ttl(t, "/area5/abc/x") == 5
    # Cached per (method, path): the second lookup is the same object.
    assert t.lookup("GET", "/area5/abc/x") is t.lookup("GET", "/area5/abc/x")


def test_cache_is_bounded_under_a_scanner() -> None:
    t = table({"path": "/a/*", "cache": {"ttl": 1}})
    for i in range(20000):
        t.lookup("GET", f"/a/{i}")
    assert len(t._cache) <= 8192


def test_absurd_paths_are_not_cached() -> None:
    t = table({"path": "/a/*", "cache": {"ttl": 1}})
    assert ttl(t, "/a/" + "x" * 100_000) == 1
    assert all(len(path) <= 2048 for _, path in t._cache)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"path": "thumbs"}, r"routes\[0\]\.path: expected a pattern starting with '/'"),
        ({"path": "/a/**/b"}, r"'\*\*' may only end a pattern"),
        ({"path": "/a", "methods": 3}, r"routes\[0\]\.methods: expected a list of strings"),
        ({"path": "/a", "nosuch": {}}, r"routes\[0\]\.nosuch: unknown plugin"),
        ({"path": "/a", "cache": 5}, r"routes\[0\]\.cache: expected a table"),
        ({"path": "/a", "cache": {"ttl": "x"}}, r"routes\[0\]\.cache\.ttl: expected an integer"),
    ],
)
def test_bad_rules_fail_at_startup(rule: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        table(rule)
