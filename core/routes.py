"""Per-route policy: `[[routes]]` rules compiled once into a segment trie.

A request's policy is looked up by (method, path) in a bounded dict first, so
the steady-state cost is one dict lookup whatever the number of rules; a new
path walks the trie, which costs the path's depth, not the number of rules.

Patterns: literal segments, ``*`` (one segment), ``**`` (any rest, last only),
and FastAPI-style ``{name}`` (one segment) or ``{name:path}`` (any rest).
Every rule that matches applies, in file order; a later rule's key wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .settings import merge_settings

_CACHE_LIMIT = 8192
# Longer paths are matched but not remembered, so that a scanner cannot fill memory.
_CACHEABLE_PATH = 2048


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One `[[routes]]` entry: a pattern, optional methods, per-plugin overrides."""

    path: str
    methods: frozenset[str] | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    name: str = ""


class RoutePolicy:
    """What applies to one (method, path): the effective settings of every plugin.

    Also what the middleware needs to bound the request, compiled once from the
    settings objects that name it: `deadline` (seconds from the request's start;
    the least `request_deadline` of any plugin's settings), `body_deadline` (the
    least `body_deadline`) and `body_first` (bytes of body to read before
    admission; the largest `body_before_admission`). `guarded` is True when any
    of them is set.
    """

    __slots__ = ("body_deadline", "body_first", "deadline", "guarded", "rules", "settings")

    def __init__(self, settings: dict[str, Any], rules: tuple[RouteRule, ...] = ()) -> None:
        self.settings = settings
        self.rules = rules
        self.deadline = _least(settings, "request_deadline")
        self.body_deadline = _least(settings, "body_deadline")
        self.body_first = max(
            (int(getattr(s, "body_before_admission", 0) or 0) for s in settings.values()),
            default=0,
        )
        self.guarded = (
            self.deadline is not None or self.body_deadline is not None or self.body_first > 0
        )

    def __repr__(self) -> str:
        return f"RoutePolicy(rules={[r.path for r in self.rules]!r})"


def _least(settings: dict[str, Any], name: str) -> float | None:
    values = [v for s in settings.values() if (v := getattr(s, name, None)) is not None]
    return float(min(values)) if values else None


class _Node:
    __slots__ = ("children", "rest", "rules", "star")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.rest: list[int] = []  # rules ending in ** here
        self.rules: list[int] = []  # rules ending exactly here


def _segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def parse_rules(raw: Sequence[Mapping[str, Any]], known_plugins: set[str]) -> list[RouteRule]:
    """Validate the shape of `[[routes]]` tables (settings are validated by `RouteTable`)."""
    rules = []
    for i, entry in enumerate(raw):
        where = f"routes[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a table, got {entry!r}")
        path = entry.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"{where}.path: expected a pattern starting with '/', got {path!r}")
        methods = entry.get("methods")
        if methods is not None:
            if isinstance(methods, str):
                methods = [methods]
            if not isinstance(methods, (list, tuple)) or not all(
                isinstance(m, str) for m in methods
            ):
                raise ConfigError(f"{where}.methods: expected a list of strings, got {methods!r}")
            methods = frozenset(m.upper() for m in methods)
        overrides: dict[str, Mapping[str, Any]] = {}
        for key, value in entry.items():
            if key in ("path", "methods", "name"):
                continue
            if key not in known_plugins:
                raise ConfigError(
                    f"{where}.{key}: unknown plugin in a route rule; expected one of: "
                    f"{', '.join(sorted(known_plugins)) or '(none)'}"
                )
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{key}: expected a table, got {value!r}")
            overrides[key] = dict(value)
        for seg in _segments(path)[:-1]:
            if seg == "**" or seg.endswith(":path}"):
                raise ConfigError(f"{where}.path: '**' may only end a pattern, got {path!r}")
        rules.append(RouteRule(path, methods, overrides, str(entry.get("name", ""))))
    return rules


class RouteTable:
    """Compiled rules plus the bounded (method, path) -> policy cache."""

    def __init__(self, rules: Sequence[RouteRule], base_settings: dict[str, Any]) -> None:
        self.rules = tuple(rules)
        self.base_settings = base_settings
        self.default = RoutePolicy(base_settings)
        self._root = _Node()
        self._cache: dict[tuple[str, str], RoutePolicy] = {}
        self._combos: dict[tuple[int, ...], RoutePolicy] = {}
        for index, rule in enumerate(self.rules):
            self._insert(index, rule)
            # Validate each rule alone at startup so that errors name the rule.
            self._policy_for((index,))

    def __len__(self) -> int:
        return len(self.rules)

    def _insert(self, index: int, rule: RouteRule) -> None:
        node = self._root
        for seg in _segments(rule.path):
            if seg == "**" or (seg.startswith("{") and seg.endswith(":path}")):
                node.rest.append(index)
                return
            if seg == "*" or (seg.startswith("{") and seg.endswith("}")):
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                node = node.children.setdefault(seg, _Node())
        node.rules.append(index)

    def _match(self, path: str) -> list[int]:
        matched: list[int] = []
        nodes = [self._root]
        for seg in _segments(path):
            following: list[_Node] = []
            for node in nodes:
                matched.extend(node.rest)
                child = node.children.get(seg)
                if child is not None:
                    following.append(child)
                if node.star is not None:
                    following.append(node.star)
            nodes = following
            if not nodes:
                break
        for node in nodes:
            matched.extend(node.rules)
            matched.extend(node.rest)
        return sorted(set(matched))

    def _policy_for(self, indices: tuple[int, ...]) -> RoutePolicy:
        policy = self._combos.get(indices)
        if policy is None:
            settings = dict(self.base_settings)
            for i in indices:
                for plugin, overrides in self.rules[i].overrides.items():
                    if plugin in settings:
                        settings[plugin] = merge_settings(
                            settings[plugin], overrides, f"routes[{i}].{plugin}"
                        )
            policy = RoutePolicy(settings, tuple(self.rules[i] for i in indices))
            self._combos[indices] = policy
        return policy

    def lookup(self, method: str, path: str) -> RoutePolicy:
        """The policy for this request; cached per (method, path), bounded."""
        key = (method, path)
        policy = self._cache.get(key)
        if policy is not None:
            return policy
        indices = tuple(
            i
            for i in self._match(path)
            if self.rules[i].methods is None or method in self.rules[i].methods  # type: ignore[operator]
        )
        policy = self._policy_for(indices) if indices else self.default
        if len(path) <= _CACHEABLE_PATH:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = policy
        return policy
