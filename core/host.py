"""The host: one pluggy PluginManager, the enabled plugins, their compiled chains.

`Overdrive` is also the seed's `AdvancedPerformanceSystem`: `initialize()`,
`cleanup()`, `run()` (alias `optimized_operation`) and `get_system_stats()`.
Construction validates everything (plugins, settings, routes) so that a bad
configuration fails at startup, never at the first request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from asyncio import _get_running_loop
from collections.abc import Callable, Collection, Mapping, Sequence
from time import perf_counter
from typing import Any

import anyio
import pluggy
import psutil
import structlog

from . import hookspecs
from .chains import Chain, PluginInfo, PluginManager, compile_chains
from .config import HostSettings, PluginFlags, resolve_sources
from .context import Operation
from .discovery import Discovered, discover, import_path, plugin_name
from .errors import ConfigError, PluginFailure, PluginLoadError
from .extras import install_hint
from .redact import plain_traceback, redact, redact_text
from .routes import RouteRule, RouteTable, parse_rules
from .settings import validate_settings
from .sources import Sources
from .walk import ChainWalker

logger = structlog.get_logger("overdrive")
log = logging.getLogger("overdrive")

# Keys a plugin's table may hold besides its own settings.
_PLUGIN_FLAGS = ("fail_closed", "shadow")
_EMPTY: Chain = ()


class Overdrive(ChainWalker):
    """The plugin host. See DESIGN.md section 2."""

    def __init__(
        self,
        config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        plugins: Sequence[Any] = (),
        env: Mapping[str, str] | None = None,
        redis_url: str | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        raw, sources = resolve_sources(config, env)
        try:
            self._build(raw, plugins, redis_url, state, sources)
        except (ConfigError, PluginLoadError) as exc:
            sources.annotate(exc)  # "(from OVERDRIVE_X)" or "(at overdrive.toml, line 4)"
            raise

    def _build(
        self,
        raw: dict[str, Any],
        plugins: Sequence[Any],
        redis_url: str | None,
        state: Mapping[str, Any] | None,
        sources: Sources,
    ) -> None:
        if redis_url is not None:  # the seed's AdvancedPerformanceSystem(redis_url=...)
            raw.setdefault("redis_url", redis_url)
        self.config = raw
        self.redis_url: str | None = raw.pop("redis_url", None)
        self.pm = PluginManager("overdrive")
        self.pm.add_hookspecs(hookspecs)
        self.discovered: dict[str, Discovered] = discover()
        self.plugins: dict[str, PluginInfo] = {}
        # Shared resources: given by the caller (a "redis_client"), published by plugins.
        self.state: dict[str, Any] = dict(state or {})

        self.started = False
        self._start_lock: anyio.Lock | None = None
        self._release_at = 0.0
        self._ticks = 0
        # Hook timings are sampled: every Nth request is timed (HostSettings.hook_timing_sample).
        self.timed = False
        self.chains: dict[str, Chain] = {}
        self.sync_hooks: frozenset[str] = frozenset()

        enabled = raw.get("plugins", [])
        if isinstance(enabled, str):
            enabled = [p.strip() for p in enabled.split(",") if p.strip()]
        if not isinstance(enabled, list) or not all(isinstance(p, str) for p in enabled):
            raise ConfigError(f"plugins: expected a list of plugin names, got {enabled!r}")
        host_keys = {k: v for k, v in raw.items() if k in HostSettings.__dataclass_fields__}
        self.settings = validate_settings(HostSettings, host_keys, "overdrive")

        objects = self._load(enabled, plugins)
        known = set(self.discovered) | set(objects)
        for key in list(raw):
            if key in ("plugins", "routes") or key in host_keys or key in objects:
                continue
            if key in self.discovered:
                continue  # a table for a discovered plugin that is not enabled
            stray = sources.stray(key)
            if stray:  # OVERDRIVE_HOME=/opt/x belongs to someone else: say so, go on
                log.warning("%s: not an Overdrive setting (no key %r), ignored", stray, key)
                del raw[key]
                continue
            raise ConfigError(
                f"{key}: unknown key; expected 'plugins', 'routes', a host setting "
                f"({', '.join(sorted(HostSettings.__dataclass_fields__))}) or a plugin "
                f"({', '.join(sorted(known)) or 'none available'})"
            )
        for index, (name, (obj, dist, version)) in enumerate(objects.items()):
            self._register(name, obj, index, dist, version)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
            message = str(exc).replace(repr(exc.plugin), repr(name))
            raise ConfigError(f"plugin {name!r}: {message}") from None
        self._base_settings = {
            name: info.obj.settings
            for name, info in self.plugins.items()
            if getattr(info.obj, "settings", None) is not None
        }
        raw_routes = raw.get("routes", [])
        if not isinstance(raw_routes, list):
            raise ConfigError(f"routes: expected a list of tables, got {raw_routes!r}")
        self._rules: list[RouteRule] = parse_rules(raw_routes, known)
        self.routes = RouteTable(self._rules, self._base_settings)
        if self.settings.trace:
            self.pm.trace.root.setwriter(lambda msg: logger.debug("pluggy", trace=msg.rstrip()))
            self.pm.enable_tracing()
        self._compile()
        self._call_sync_all("overdrive_configure", self, startup=True)

    # -- plugins ---------------------------------------------------------------

    def _load(self, enabled: list[str], given: Sequence[Any]) -> dict[str, tuple[Any, str, str]]:
        """Name -> (plugin object, distribution, version), in run order."""
        by_name = {plugin_name(obj): obj for obj in given}
        out: dict[str, tuple[Any, str, str]] = {}
        for spec in enabled:
            if spec in by_name:
                out[spec] = (by_name.pop(spec), "", "")
            elif spec in self.discovered:
                d = self.discovered[spec]
                out[spec] = (d.load(), d.distribution, d.version)
            elif ":" in spec or "." in spec:
                obj = import_path(spec)
                if isinstance(obj, type):
                    obj = _instantiate(spec, obj)
                out[plugin_name(obj)] = (obj, "", "")
            else:
                raise PluginLoadError(
                    f"plugins: unknown plugin {spec!r}; available: "
                    f"{', '.join(sorted(set(self.discovered) | set(by_name))) or '(none)'}"
                )
        for name, obj in by_name.items():
            out[name] = (obj, "", "")
        return out

    def _register(self, name: str, obj: Any, index: int, dist: str, version: str) -> None:
        table = self.config.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: expected a table of settings, got {table!r}")
        table = dict(table)
        flags = {key: table.pop(key) for key in _PLUGIN_FLAGS if key in table}
        if isinstance(obj, type):
            obj = _instantiate(name, obj)
        settings_cls = getattr(obj, "Settings", None)
        if settings_cls is not None and (table or getattr(obj, "settings", None) is None):
            obj.settings = validate_settings(settings_cls, table, name)
        elif table:
            raise ConfigError(f"{name}: this plugin takes no settings, got {sorted(table)}")
        given = validate_settings(PluginFlags, flags, name)
        fail_closed = given.fail_closed if "fail_closed" in flags else obj_flag(obj, "fail_closed")
        shadow = given.shadow if "shadow" in flags else obj_flag(obj, "shadow")
        try:
            self.pm.register(obj, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise ConfigError(f"plugin {name!r}: {exc}") from None
        self.plugins[name] = PluginInfo(
            name,
            obj,
            index,
            fail_closed=bool(fail_closed),
            shadow=bool(shadow),
            distribution=dist,
            version=version,
        )

    def __getattr__(self, name: str) -> Any:
        # Only reached for missing attributes: the seed's `system.cache`, `system.profiler`.
        if name.startswith("_") or "plugins" not in self.__dict__:
            raise AttributeError(name)
        for info in self.plugins.values():
            target = getattr(info.obj, "provides", {}).get(name)
            if target is not None:
                return getattr(info.obj, target)
        raise AttributeError(
            f"{type(self).__name__!r} has no attribute {name!r} (no enabled plugin provides it)"
        )

    def get_plugin(self, name: str) -> Any:
        """The enabled plugin object called `name`, or None."""
        info = self.plugins.get(name)
        return info.obj if info is not None else None

    def unregister(self, name: str) -> None:
        """Disable a plugin at run time; chains are recompiled."""
        info = self.plugins.pop(name)
        self.pm.unregister(info.obj)
        self._base_settings.pop(name, None)
        self.routes = RouteTable(self._rules, self._base_settings)
        self._compile()

    def add_routes(self, rules: Sequence[Mapping[str, Any]], *, first: bool = False) -> None:
        """Add `[[routes]]`-shaped rules at run time (endpoint policies do this).

        With `first`, they go before the configured rules, so configuration wins.
        """
        known = set(self.discovered) | set(self.plugins)
        added = parse_rules(list(rules), known)
        self._rules = added + self._rules if first else self._rules + added
        self.routes = RouteTable(self._rules, self._base_settings)

    def _compile(self) -> None:
        now = perf_counter()
        self.chains = compile_chains(self.pm, self.plugins, now, trace=self.settings.trace)
        # Hooks whose implementations are all plain functions: walked without a coroutine.
        self.sync_hooks = frozenset(
            hook for hook, chain in self.chains.items() if not any(e[1] for e in chain)
        )

        pending = [i.quarantined_until for i in self.plugins.values() if i.quarantined_until > now]
        self._release_at = min(pending) if pending else 0.0

    def chain(self, hook: str) -> Chain:
        return self.chains.get(hook, _EMPTY)

    def release_quarantine(self, now: float) -> None:
        """Bring back plugins whose quarantine has ended (the middleware calls this)."""
        if self._release_at and now >= self._release_at:
            self._compile()

    # -- fault isolation -------------------------------------------------------

    def fault(self, info: PluginInfo, hook: str, exc: BaseException) -> None:
        """A plugin raised: log, count, maybe quarantine; re-raise if it is fail-closed."""
        now = perf_counter()
        info.errors += 1
        error = redact_text(f"{type(exc).__name__}: {exc}")
        info.last_error = f"{hook}: {error}"[:500]
        # The traceback as plain text, not exc_info: structlog's rich and dict tracebacks
        # show every frame's locals (a request's headers, a connection URL).
        logger.error(
            "plugin hook raised",
            plugin=info.name,
            hook=hook,
            error=error,
            traceback=plain_traceback(exc),
        )
        if info.fail_closed:
            raise PluginFailure(info.name, hook, exc) from exc
        recent = info.recent_errors
        recent.append(now)
        window = self.settings.quarantine_window
        while recent and now - recent[0] > window:
            recent.popleft()
        if len(recent) >= self.settings.quarantine_after:
            recent.clear()
            info.quarantines += 1
            info.quarantined_until = now + self.settings.quarantine_seconds
            logger.warning(
                "plugin quarantined",
                plugin=info.name,
                seconds=self.settings.quarantine_seconds,
            )
            self._compile()

    def stats_fault(self, info: PluginInfo, exc: BaseException) -> None:
        """A plugin's `collect_stats` raised: counted apart from its request-hook errors.

        Never a quarantine and never a PluginFailure: whoever can scrape the stats
        (a /metrics endpoint) must not be able to switch off a plugin's request checks.
        """
        info.stats_errors += 1
        error = f"{type(exc).__name__}: {exc}"[:500]
        if error != info.last_stats_error:  # logged when it changes, not at every scrape
            logger.error("plugin collect_stats raised", plugin=info.name, error=error, exc_info=exc)
        info.last_stats_error = error

    def _call_sync_all(self, hook: str, *args: Any, startup: bool = False) -> None:
        for fn, _, info, _timing in self.chains.get(hook, _EMPTY):
            try:
                fn(*args)
            except Exception as exc:
                if startup:
                    reason = install_hint(exc) or exc
                    raise ConfigError(
                        f"plugin {info.name!r} failed to configure: {reason}"
                    ) from exc
                self.fault(info, hook, exc)

    # -- lifecycle (the seed's initialize/cleanup) -------------------------------

    async def initialize(self) -> None:
        """Run `overdrive_startup` once (idempotent; safe under concurrent callers)."""
        if self.started:
            return
        if self._start_lock is None:
            self._start_lock = anyio.Lock()
        async with self._start_lock:
            if not self.started:
                await self.call_all("overdrive_startup", self)
                self.started = True

    startup = initialize

    async def cleanup(self) -> None:
        """Run `overdrive_shutdown` in reverse order (idempotent)."""
        if not self.started:
            return
        self.started = False
        chain = tuple(reversed(self.chains.get("overdrive_shutdown", _EMPTY)))
        for fn, is_async, info, _ in chain:
            try:
                result = fn(self)
                if is_async:
                    await result
            except Exception as exc:
                self.fault(info, "overdrive_shutdown", exc)

    shutdown = cleanup

    async def memory_pressure(self, level: str) -> None:
        """Tell every plugin that memory is short (`warning` or `critical`)."""
        await self.call_all("on_memory_pressure", self, level)

    # -- operations ----------------------------------------------------------------

    async def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` as the operation `name`, through the operation hooks.

        Plugins may refuse it (`before_operation`), bound it (``op.timeout``) or
        ask for a retry after a delay (`on_operation_failure`); the host loops.
        """
        op = Operation(name, fn, args, kwargs)
        try:
            while True:
                op.attempt += 1
                refusal = await self.call_first("before_operation", op)
                if refusal is not None:
                    raise refusal
                try:
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        if op.timeout is None:
                            result = await result
                        elif _get_running_loop() is not None:
                            # asyncio's own timeout where it runs: ~3 us cheaper than
                            # anyio's cancel scope, which trio (no asyncio loop) gets.
                            async with asyncio.timeout(op.timeout):
                                result = await result
                        else:
                            with anyio.fail_after(op.timeout):
                                result = await result
                except Exception as exc:
                    delay = await self.call_first("on_operation_failure", op, exc)
                    if delay is None:
                        op.error = exc
                        raise
                    await anyio.sleep(float(delay))
                    continue
                op.result = result
                return result
        except BaseException as exc:
            op.error = op.error or exc
            raise
        finally:
            op.duration = perf_counter() - op.started
            await self.call_all("after_operation", op)

    optimized_operation = run

    # -- stats ---------------------------------------------------------------------

    async def get_system_stats(self, *, exclude: Collection[str] = ()) -> dict[str, Any]:
        """Every plugin's `collect_stats` under its name, host and system figures.

        A plugin whose `collect_stats` raises shows ``{"error": ...}``; the others still appear.
        `exclude` names plugins whose `collect_stats` is not called (the Prometheus
        exporter reads the profiler's series directly and skips its percentile table).
        """
        stats: dict[str, Any] = {"timestamp": time.time()}
        for fn, is_async, info, _ in self.chains.get("collect_stats", _EMPTY):
            if exclude and info.name in exclude:
                continue
            try:
                figures = fn(self)
                if is_async:
                    figures = await figures
            except Exception as exc:
                self.stats_fault(info, exc)
                stats[info.name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            if figures is not None:
                stats[info.name] = figures
        # After collect_stats, so that a collect_stats failure is already counted.
        now = perf_counter()
        stats["host"] = {
            "started": self.started,
            "plugins": {name: info.stats(now) for name, info in self.plugins.items()},
            "routes": len(self.routes),
        }
        stats["system"] = system_figures()
        # One redaction for every consumer (stats endpoints, Prometheus, the dashboard,
        # an app's own stats route): no URL password or token leaves through the figures.
        redacted: dict[str, Any] = redact(stats)
        return redacted

    def explain(self, method: str, path: str) -> dict[str, Any]:
        """The chain a request would run, hook by hook, and each plugin's effective settings."""
        from .settings import settings_as_dict

        policy = self.routes.lookup(method.upper(), path)
        hooks = {}
        for hook in (
            *hookspecs.REQUEST_HOOKS[:3],
            *hookspecs.RESPONSE_HOOKS[:2],
            "on_failure",
            *hookspecs.RESPONSE_HOOKS[2:],
        ):
            hooks[hook] = [info.name for _, _, info, _ in self.chains.get(hook, _EMPTY)]
        return {
            "method": method.upper(),
            "path": path,
            "rules": [r.path for r in policy.rules],
            "hooks": hooks,
            "settings": {name: settings_as_dict(s) for name, s in policy.settings.items()},
        }


def _instantiate(name: str, cls: type) -> Any:
    try:
        return cls()
    except Exception as exc:
        raise PluginLoadError(f"plugin {name!r} could not be created: {exc}") from exc


def obj_flag(obj: Any, name: str) -> bool:
    return bool(getattr(obj, name, False))


def system_figures() -> dict[str, Any]:
    """CPU, memory and disk I/O of the machine and this process (psutil)."""
    vm = psutil.virtual_memory()
    proc = psutil.Process()
    figures: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_percent": vm.percent,
        "memory_available_mb": round(vm.available / 2**20, 1),
        "process_rss_mb": round(proc.memory_info().rss / 2**20, 1),
    }
    try:
        io = psutil.disk_io_counters()
    except (OSError, RuntimeError):
        io = None
    if io is not None:
        figures["disk_read_mb"] = round(io.read_bytes / 2**20, 1)
        figures["disk_write_mb"] = round(io.write_bytes / 2**20, 1)
    return figures
