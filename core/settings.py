"""Typed plugin settings: validation and coercion of config tables into dataclasses.

Settings come from Python dicts, TOML and environment variables (always strings),
so validation coerces where the intent is unambiguous and otherwise fails with an
error that names the key, the value and what was expected. It runs at startup.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import weakref
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# Per settings class: its resolved type hints and init fields (`get_type_hints`
# evaluates every annotation string: the larger part of validating a table).
_shapes: weakref.WeakKeyDictionary[type, tuple[dict[str, Any], dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _shape(cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    shape = _shapes.get(cls)
    if shape is None:
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        shape = _shapes[cls] = (hints, fields)
    return shape


def validate_settings(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build `cls` (a dataclass) from `data`, coercing and checking every field.

    `where` prefixes error messages (for example ``"cache"`` gives
    ``cache.default_ttl: expected an integer, got 'abc'``).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = dict(data or {})
    hints, fields = _shape(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown setting (value {data[unknown[0]]!r}); "
            f"expected one of: {', '.join(sorted(fields)) or '(none)'}"
        )
    kwargs = {name: coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def merge_settings(base: T, overrides: Mapping[str, Any] | None, where: str) -> T:
    """`base` with `overrides` applied, validated as a whole."""
    if not overrides:
        return base
    current = {
        f.name: getattr(base, f.name)
        for f in dataclasses.fields(base)  # type: ignore[arg-type]
        if f.init
    }
    current.update(overrides)
    return validate_settings(type(base), current, where)


def settings_as_dict(settings: Any) -> dict[str, Any]:
    """A plain dict of a settings object, for display (`overdrive config`, `explain`)."""
    if settings is None:
        return {}
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return dataclasses.asdict(settings)
    return dict(vars(settings))


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}
    if tp in names:
        return names[tp]
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _describe(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Coerce `value` to the annotated type `tp` or raise ConfigError naming `key`."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(
            f"{key}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
        )
    if origin in (list, tuple, set, frozenset, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],)
        item = args[0] if len(args) == 1 else Any
        items = [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin in (tuple, typing.Sequence) or tp is tuple:
            return tuple(items)
        if origin in (set, frozenset):
            return frozenset(items)
        return items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return validate_settings(tp, value, key)
        raise ConfigError(f"{key}: expected a table for {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
