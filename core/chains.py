"""Compiled hook chains: the ordered implementations of each hook, walked without pluggy.

A pluggy hook call costs about ten times a walk over a precompiled tuple, so
the host compiles, on every register/unregister/quarantine, one tuple per hook
of `(function, is_async, plugin, timing)` entries, and walks those. Each
function takes the hook's arguments positionally, in the hookspec's order.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections import deque
from collections.abc import Callable
from typing import Any

import pluggy

from .hookspecs import RESPONSE_HOOKS

# [count, total seconds, max seconds]; a list so that the walk updates it in place.
Timing = list[float]
Entry = tuple[Callable[..., Any], bool, "PluginInfo", Timing]
Chain = tuple[Entry, ...]


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, with what `register` finds on a plugin class kept per process.

    pluggy inspects every attribute of a plugin (``inspect.getattr_static``, twice
    each) at every registration: with all built-in plugins that was most of the
    cost of building a host. Which attributes of a class are hook implementations
    does not change, so it is looked up once per (class, attribute). Not cached:
    modules and classes registered as plugins, and attributes set on the instance.
    """

    _opts: typing.ClassVar[dict[tuple[type, str], Any]] = {}

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if isinstance(plugin, (types.ModuleType, type)) or name in getattr(plugin, "__dict__", ()):
            return super().parse_hookimpl_opts(plugin, name)
        key = (type(plugin), name)
        try:
            opts = self._opts[key]
        except KeyError:
            opts = self._opts[key] = super().parse_hookimpl_opts(plugin, name)
        return None if opts is None else dict(opts)


class PluginInfo:
    """The host's record of one enabled plugin: flags, fault counts, hook timings."""

    __slots__ = (
        "distribution",
        "errors",
        "fail_closed",
        "index",
        "last_error",
        "last_stats_error",
        "name",
        "obj",
        "quarantined_until",
        "quarantines",
        "recent_errors",
        "shadow",
        "shadow_hits",
        "stats_errors",
        "timings",
        "version",
    )

    def __init__(
        self,
        name: str,
        obj: Any,
        index: int,
        *,
        fail_closed: bool = False,
        shadow: bool = False,
        distribution: str = "",
        version: str = "",
    ) -> None:
        self.name = name
        self.obj = obj
        self.index = index
        self.fail_closed = fail_closed
        self.shadow = shadow
        self.distribution = distribution
        self.version = version
        self.errors = 0
        self.last_error = ""
        self.recent_errors: deque[float] = deque()
        self.quarantined_until = 0.0
        self.quarantines = 0
        self.shadow_hits = 0
        # collect_stats failures, apart from `errors`: a scrape never quarantines a plugin.
        self.stats_errors = 0
        self.last_stats_error = ""
        self.timings: dict[str, Timing] = {}

    def stats(self, now: float) -> dict[str, Any]:
        return {
            "errors": self.errors,
            "last_error": self.last_error,
            "fail_closed": self.fail_closed,
            "shadow": self.shadow,
            "shadow_short_circuits": self.shadow_hits,
            "quarantined": self.quarantined_until > now,
            "quarantined_for_s": max(0.0, round(self.quarantined_until - now, 3)),
            "quarantines": self.quarantines,
            "stats_errors": self.stats_errors,
            "last_stats_error": self.last_stats_error,
            # Sampled: every Nth request is timed (HostSettings.hook_timing_sample).
            "hooks": {
                hook: {
                    "count": int(t[0]),
                    "total_ms": round(t[1] * 1000, 3),
                    "mean_us": round(t[1] / t[0] * 1e6, 2) if t[0] else 0.0,
                    "max_ms": round(t[2] * 1000, 3),
                }
                for hook, t in self.timings.items()
                if t[0]
            },
        }


def _positional(impl: pluggy.HookImpl, spec_args: tuple[str, ...]) -> Callable[..., Any]:
    """A callable taking the spec's arguments positionally, whatever subset `impl` names."""
    fn = impl.function
    names = tuple(impl.argnames)
    if names == spec_args:
        return fn
    picks = tuple(spec_args.index(n) for n in names)
    if picks == tuple(range(len(picks))):
        count = len(picks)
        return lambda *args: fn(*args[:count])
    return lambda *args: fn(*[args[i] for i in picks])


def _traced(
    pm: pluggy.PluginManager, hook: str, impl: pluggy.HookImpl, spec_args: tuple[str, ...]
) -> Callable[..., Any]:
    """A callable that goes through pluggy's own hook execution, so tracing sees it."""
    hookexec = pm._hookexec  # pluggy's monitored call path (add_hookcall_monitoring wraps it)

    def call(*args: Any) -> Any:
        results = hookexec(hook, [impl], dict(zip(spec_args, args, strict=True)), False)
        return results[0] if results else None  # type: ignore[index]

    return call


def compile_chains(
    pm: pluggy.PluginManager,
    infos: dict[str, PluginInfo],
    now: float,
    *,
    trace: bool = False,
) -> dict[str, Chain]:
    """One ordered chain per hookspec, skipping quarantined plugins.

    Request-side hooks run in configured order, response-side hooks in reverse;
    within that, ``tryfirst`` implementations come first and ``trylast`` last.
    """
    chains: dict[str, Chain] = {}
    for hook_name in sorted(pm.hook.__dict__):
        caller = getattr(pm.hook, hook_name)
        if not isinstance(caller, pluggy.HookCaller) or caller.spec is None:
            continue
        spec_args = tuple(caller.spec.argnames)
        entries: list[tuple[tuple[int, int], Entry]] = []
        reverse = hook_name in RESPONSE_HOOKS
        for impl in caller.get_hookimpls():
            info = infos.get(impl.plugin_name)
            if info is None or info.quarantined_until > now:
                continue
            rank = 0 if impl.tryfirst else 2 if impl.trylast else 1
            position = -info.index if reverse else info.index
            fn = _traced(pm, hook_name, impl, spec_args) if trace else _positional(impl, spec_args)
            timing = info.timings.setdefault(hook_name, [0, 0.0, 0.0])
            is_async = inspect.iscoroutinefunction(impl.function)
            entries.append(((rank, position), (fn, is_async, info, timing)))
        entries.sort(key=lambda pair: pair[0])
        chains[hook_name] = tuple(entry for _, entry in entries)
    return chains
