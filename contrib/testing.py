"""The plugin authors' kit: build a host and an app, drive requests, see which hooks ran.

    from overdrive.contrib.testing import HookRecorder, serve

    async with serve(app, plugins=[MyPlugin(), HookRecorder()]) as h:
        response = await h.client.get("/")
        assert h.host.get_plugin("recorder").hooks == ["before_request", ...]

`serve` runs the ASGI lifespan (startup and shutdown hooks included) and an
httpx client on `ASGITransport`, so no server or port is needed.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pluggy

from overdrive import hookimpl, hookspecs
from overdrive.discovery import plugin_name
from overdrive.host import Overdrive
from overdrive.middleware import OverdriveMiddleware
from overdrive.settings import validate_settings

__all__ = [
    "Harness",
    "HookRecorder",
    "PluginContractError",
    "check_plugin",
    "find_host",
    "make_host",
    "serve",
]


def make_host(
    *plugins: Any, config: Mapping[str, Any] | None = None, **host_kwargs: Any
) -> Overdrive:
    """A host with `plugins` enabled; the environment is ignored, so tests are hermetic."""
    return Overdrive(dict(config or {}), plugins=plugins, env={}, **host_kwargs)


@dataclass
class Harness:
    """What `serve` yields: the wrapped app, its host and a client bound to it."""

    app: Any
    host: Overdrive
    client: Any  # httpx.AsyncClient


@asynccontextmanager
async def serve(
    app: Any,
    *,
    plugins: Sequence[Any] = (),
    config: Mapping[str, Any] | None = None,
    host: Overdrive | None = None,
    base_url: str = "http://testserver",
    lifespan: bool = True,
    raise_app_exceptions: bool = True,
) -> AsyncIterator[Harness]:
    """Wrap `app` in `OverdriveMiddleware` (unless it already is), run its lifespan,
    and yield a `Harness` with an httpx client. Requires the `test` extra.
    """
    import httpx
    from asgi_lifespan import LifespanManager, LifespanNotSupported

    has_own = isinstance(app, OverdriveMiddleware) or any(
        m.cls is OverdriveMiddleware for m in getattr(app, "user_middleware", ())
    )
    if has_own and (plugins or config is not None or host is not None):
        raise TypeError("this app already has an OverdriveMiddleware; pass no plugins/config/host")
    wrapped = (
        app
        if has_own
        else OverdriveMiddleware(app, host=host or make_host(*plugins, config=config))
    )
    transport = httpx.ASGITransport(app=wrapped, raise_app_exceptions=raise_app_exceptions)
    async with AsyncExitStack() as stack:
        if lifespan:
            try:
                await stack.enter_async_context(
                    LifespanManager(wrapped, startup_timeout=30, shutdown_timeout=30)
                )
            except LifespanNotSupported:
                # The app raised on the lifespan scope before reading it: go on without
                # one, as uvicorn does; the host starts at the first request.
                lifespan = False
        if not lifespan:
            stack.push_async_callback(_shutdown, wrapped)
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url=base_url)
        )
        if not lifespan and has_own:
            await client.get("/__overdrive_warmup__")  # builds the app's middleware stack
        yield Harness(wrapped, find_host(wrapped), client)


async def _shutdown(app: Any) -> None:
    """No lifespan ran: stop the host the first request started, as a lifespan would."""
    try:
        host = find_host(app)
    except LookupError:
        return
    await host.cleanup()


def find_host(app: Any, depth: int = 32) -> Overdrive:
    """The host of the OverdriveMiddleware in `app`'s middleware stack."""
    for _ in range(depth):
        if isinstance(app, OverdriveMiddleware):
            return app.host
        app = getattr(app, "middleware_stack", None) or getattr(app, "app", None)
        if app is None:
            break
    raise LookupError("no OverdriveMiddleware found in this app")


class HookRecorder:
    """A plugin that implements every hook and records the calls, in order.

    Several recorders may share one `log` to show the order across plugins:
    entries are ``(recorder name, hook name)``.
    """

    def __init__(self, name: str = "recorder", log: list[tuple[str, str]] | None = None) -> None:
        self.name = name
        self.log: list[tuple[str, str]] = [] if log is None else log

    @property
    def hooks(self) -> list[str]:
        """The hook names this recorder saw, in order."""
        return [hook for who, hook in self.log if who == self.name]

    def _record(self, hook: str) -> None:
        self.log.append((self.name, hook))

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        self._record("overdrive_configure")

    @hookimpl
    async def overdrive_startup(self, host: Any) -> None:
        self._record("overdrive_startup")

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        self._record("overdrive_shutdown")

    @hookimpl
    async def before_request(self, ctx: Any) -> None:
        self._record("before_request")

    @hookimpl
    async def cache_lookup(self, ctx: Any) -> None:
        self._record("cache_lookup")

    @hookimpl
    async def gpu_allocate(self, ctx: Any) -> None:
        self._record("gpu_allocate")

    @hookimpl
    def on_response_start(self, ctx: Any, status: int, headers: Any) -> None:
        self._record("on_response_start")

    @hookimpl
    async def cache_store(self, ctx: Any, response: Any) -> None:
        self._record("cache_store")

    @hookimpl
    async def on_failure(self, ctx: Any, error: Any) -> None:
        self._record("on_failure")

    @hookimpl
    async def gpu_release(self, ctx: Any, lease: Any) -> None:
        self._record("gpu_release")

    @hookimpl
    async def after_request(self, ctx: Any) -> None:
        self._record("after_request")

    @hookimpl
    async def before_operation(self, op: Any) -> None:
        self._record("before_operation")

    @hookimpl
    async def on_operation_failure(self, op: Any, error: Any) -> None:
        self._record("on_operation_failure")

    @hookimpl
    async def after_operation(self, op: Any) -> None:
        self._record("after_operation")

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        return {"calls": len(self.hooks)}

    @hookimpl
    async def on_memory_pressure(self, host: Any, level: str) -> None:
        self._record("on_memory_pressure")


class PluginContractError(AssertionError):
    """`check_plugin` found the plugin at odds with the hook contract."""


def check_plugin(plugin: Any) -> None:
    """Check `plugin` (a class or an instance) against the hook contract.

    Known hook names only; argument names that the hookspec has; sync hooks
    not ``async``; a `Settings` dataclass whose defaults validate. Raises
    `PluginContractError` listing every problem.
    """
    problems: list[str] = []
    try:
        instance = plugin() if isinstance(plugin, type) else plugin
    except Exception as exc:
        raise PluginContractError(f"plugin {plugin!r} cannot be created: {exc}") from exc
    name = plugin_name(instance)
    if not isinstance(getattr(instance, "name", None), str) or not instance.name:
        problems.append("no `name` attribute: the host will call it by its class name")
    specs: dict[str, tuple[str, ...]] = {}
    for hook_name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if getattr(fn, "overdrive_spec", None) is not None:
            specs[hook_name] = tuple(inspect.signature(fn).parameters)
    marker_attr = "overdrive_impl"
    cls = plugin if isinstance(plugin, type) else type(plugin)
    found = 0
    for attr in dir(cls):
        member = getattr(cls, attr, None)
        if member is None or getattr(member, marker_attr, None) is None:
            continue
        found += 1
        impl_opts = getattr(member, marker_attr)
        hook = impl_opts.get("specname") or attr
        if hook not in specs:
            problems.append(f"{attr}: unknown hook {hook!r}; known: {', '.join(sorted(specs))}")
            continue
        params = [p for p in inspect.signature(member).parameters if p != "self"]
        extra = [p for p in params if p not in specs[hook]]
        if extra:
            problems.append(f"{attr}: argument(s) {extra} not in the hookspec {hook}{specs[hook]}")
        if hook in hookspecs.SYNC_HOOKS and inspect.iscoroutinefunction(member):
            problems.append(f"{attr}: {hook} is a sync hook; it must not be async")
    if not found:
        problems.append("implements no hook (no method marked with @overdrive.hookimpl)")
    settings_cls = getattr(plugin, "Settings", None)
    if settings_cls is not None:
        if not (isinstance(settings_cls, type) and dataclasses.is_dataclass(settings_cls)):
            problems.append("Settings is not a dataclass")
        else:
            defaults = {
                f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
                for f in dataclasses.fields(settings_cls)
                if f.init
                and (
                    f.default is not dataclasses.MISSING
                    or f.default_factory is not dataclasses.MISSING
                )
            }
            try:
                validate_settings(settings_cls, defaults, name)
            except Exception as exc:
                problems.append(f"Settings defaults do not validate: {exc}")
    # pluggy's own validation, on a scratch manager.
    pm = pluggy.PluginManager("overdrive")
    pm.add_hookspecs(hookspecs)
    try:
        pm.register(instance, name=name)
        pm.check_pending()
    except Exception as exc:
        problems.append(f"pluggy refuses it: {exc}")
    if problems:
        raise PluginContractError(f"plugin {name!r}:\n  - " + "\n  - ".join(problems))
