"""The host: loading, ordering, firstresult across sync/async, fault isolation, operations."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from starlette.responses import PlainTextResponse

import overdrive
from overdrive import ConfigError, OperationRefused, PluginFailure, PluginLoadError
from overdrive.contrib.testing import HookRecorder, make_host


class Answer(overdrive.Plugin):
    """Answers before_request with a response (sync or async)."""

    def __init__(self, name: str, value: Any, *, is_async: bool = False) -> None:
        self.name = name  # type: ignore[misc]
        self.value = value
        self.is_async = is_async
        self.calls = 0

    @overdrive.hookimpl
    def before_request(self, ctx: Any) -> Any:
        self.calls += 1
        if self.is_async:

            async def later() -> Any:
                return self.value

            return later()
        return self.value


class AsyncAnswer(Answer):
    @overdrive.hookimpl
    async def before_request(self, ctx: Any) -> Any:  # type: ignore[override]
        self.calls += 1
        return self.value


class Boom(overdrive.Plugin):
    name = "boom"

    def __init__(self) -> None:
        self.calls = 0

    @overdrive.hookimpl
    def before_request(self, ctx: Any) -> None:
        self.calls += 1
        raise RuntimeError("secret detail")


def test_request_hooks_in_order_response_hooks_reversed() -> None:
    log: list[tuple[str, str]] = []
    host = make_host(HookRecorder("a", log), HookRecorder("b", log), HookRecorder("c", log))
    names = lambda hook: [info.name for _, _, info, _ in host.chain(hook)]  # noqa: E731
    assert names("before_request") == ["a", "b", "c"]
    assert names("cache_lookup") == ["a", "b", "c"]
    assert names("on_failure") == ["a", "b", "c"]
    assert names("on_response_start") == ["c", "b", "a"]
    assert names("after_request") == ["c", "b", "a"]
    assert names("gpu_release") == ["c", "b", "a"]


def test_config_order_decides_and_tryfirst_trylast_move() -> None:
    class Late(overdrive.Plugin):
        name = "late"

        @overdrive.hookimpl(trylast=True)
        def before_request(self, ctx: Any) -> None: ...

    class Early(overdrive.Plugin):
        name = "early"

        @overdrive.hookimpl(tryfirst=True)
        def before_request(self, ctx: Any) -> None: ...

    host = make_host(
        Late(),
        HookRecorder("x"),
        Early(),
        HookRecorder("y"),
        config={"plugins": ["y", "late", "x", "early"]},
    )
    assert [i.name for _, _, i, _ in host.chain("before_request")] == ["early", "y", "x", "late"]


async def test_firstresult_across_sync_and_async() -> None:
    response = PlainTextResponse("hit")
    first = Answer("first", None)
    second = AsyncAnswer("second", None)
    third = Answer("third", response, is_async=True)  # sync def returning a coroutine
    fourth = Answer("fourth", PlainTextResponse("never"))
    host = make_host(first, second, third, fourth)
    assert await host.call_first("before_request", object()) is response
    assert (first.calls, second.calls, third.calls, fourth.calls) == (1, 1, 1, 0)


async def test_a_raising_plugin_is_isolated_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    after = Answer("after", None)
    host = make_host(Boom(), after)
    with caplog.at_level(logging.ERROR):
        assert await host.call_first("before_request", object()) is None
    assert after.calls == 1  # the request went on
    stats = (await host.get_system_stats())["host"]["plugins"]["boom"]
    assert stats["errors"] == 1
    assert "secret detail" in stats["last_error"]


async def test_fail_closed_plugin_fails_the_call() -> None:
    host = make_host(Boom(), config={"boom": {"fail_closed": True}})
    with pytest.raises(PluginFailure) as info:
        await host.call_first("before_request", object())
    assert info.value.plugin == "boom"


async def test_non_asgi_result_is_a_plugin_error_naming_plugin_and_hook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = make_host(Answer("liar", "not a response"))
    assert await host.call_first("before_request", object()) is None
    stats = (await host.get_system_stats())["host"]["plugins"]["liar"]
    assert stats["errors"] == 1
    assert "before_request" in stats["last_error"]
    assert "not an ASGI callable" in stats["last_error"]


async def test_quarantine_after_repeated_errors_then_release() -> None:
    boom = Boom()
    host = make_host(
        boom,
        config={"quarantine_after": 3, "quarantine_window": 60, "quarantine_seconds": 0.05},
    )
    for _ in range(5):
        await host.call_first("before_request", object())
    assert boom.calls == 3  # skipped once quarantined
    plugin_stats = (await host.get_system_stats())["host"]["plugins"]["boom"]
    assert plugin_stats["quarantined"] is True
    assert plugin_stats["quarantines"] == 1
    import asyncio
    from time import perf_counter

    await asyncio.sleep(0.06)
    host.release_quarantine(perf_counter())
    await host.call_first("before_request", object())
    assert boom.calls == 4


async def test_shadow_plugin_runs_but_never_short_circuits() -> None:
    blocker = Answer("blocker", PlainTextResponse("blocked"))
    host = make_host(blocker, config={"blocker": {"shadow": True}})
    assert await host.call_first("before_request", object()) is None
    assert blocker.calls == 1
    stats = (await host.get_system_stats())["host"]["plugins"]["blocker"]
    assert stats["shadow_short_circuits"] == 1


async def test_trace_mode_goes_through_pluggy() -> None:
    seen: list[str] = []
    host = make_host(Answer("a", None), config={"trace": True})
    host.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: seen.append(name), lambda *args: None
    )
    host._compile()
    await host.call_first("before_request", object())
    assert seen == ["before_request"]


async def test_implementations_may_take_a_subset_of_arguments() -> None:
    got: list[Any] = []

    class Partial(overdrive.Plugin):
        name = "partial"

        @overdrive.hookimpl
        def on_failure(self, error: BaseException) -> None:
            got.append(error)

    host = make_host(Partial())
    err = ValueError("x")
    await host.call_first("on_failure", object(), err)
    assert got == [err]


def test_unknown_hook_is_refused_at_startup() -> None:
    class Typo(overdrive.Plugin):
        name = "typo"

        @overdrive.hookimpl
        def before_requets(self, ctx: Any) -> None: ...

    with pytest.raises(ConfigError, match="typo"):
        make_host(Typo())


def test_unknown_plugin_lists_the_available_ones() -> None:
    with pytest.raises(PluginLoadError, match=r"unknown plugin 'nosuch'; available: .*recorder"):
        make_host(HookRecorder(), config={"plugins": ["nosuch"]})


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match="cahce: unknown key"):
        make_host(config={"cahce": {}})


def test_plugin_settings_validated_at_startup() -> None:
    @dataclasses.dataclass
    class S:
        ttl: int = 1

    class WithSettings(overdrive.Plugin):
        name = "ws"
        Settings = S

        @overdrive.hookimpl
        def before_request(self, ctx: Any) -> None: ...

    host = make_host(WithSettings(), config={"ws": {"ttl": "5"}})
    assert host.get_plugin("ws").settings.ttl == 5
    with pytest.raises(ConfigError, match=r"ws\.ttl: expected an integer, got 'x'"):
        make_host(WithSettings(), config={"ws": {"ttl": "x"}})


def test_plugins_by_dotted_path() -> None:
    host = make_host(config={"plugins": ["overdrive.contrib.testing:HookRecorder"]})
    assert isinstance(host.get_plugin("recorder"), HookRecorder)
    with pytest.raises(PluginLoadError, match="failed to load"):
        make_host(config={"plugins": ["overdrive.contrib.testing:Nope"]})


async def test_run_retries_when_a_plugin_says_so_and_reports() -> None:
    class RetryTwice(overdrive.Plugin):
        name = "retry"

        def __init__(self) -> None:
            self.after: list[tuple[int, Any]] = []

        @overdrive.hookimpl
        def on_operation_failure(self, op: Any, error: BaseException) -> float | None:
            return 0.0 if op.attempt < 3 else None

        @overdrive.hookimpl
        def after_operation(self, op: Any) -> None:
            self.after.append((op.attempt, op.error))

    plugin = RetryTwice()
    host = make_host(plugin)
    attempts = 0

    async def flaky(x: int) -> int:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("down")
        return x * 2

    assert await host.run("api", flaky, 21) == 42
    assert plugin.after == [(3, None)]

    async def always() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await host.optimized_operation("api", always)
    assert plugin.after[-1][0] == 3
    assert isinstance(plugin.after[-1][1], ConnectionError)


async def test_run_refused_by_a_plugin() -> None:
    class Open(overdrive.Plugin):
        name = "open"

        @overdrive.hookimpl
        def before_operation(self, op: Any) -> BaseException:
            return OperationRefused("breaker open", retry_after=3)

    called = False

    def fn() -> None:
        nonlocal called
        called = True

    with pytest.raises(OperationRefused, match="breaker open"):
        await make_host(Open()).run("api", fn)
    assert called is False


async def test_run_with_a_plugin_timeout() -> None:
    import asyncio

    class Bound(overdrive.Plugin):
        name = "bound"

        @overdrive.hookimpl
        def before_operation(self, op: Any) -> None:
            op.timeout = 0.01

    with pytest.raises(TimeoutError):
        await make_host(Bound()).run("slow", asyncio.sleep, 10)


async def test_stats_survive_a_raising_collect_stats() -> None:
    class BadStats(overdrive.Plugin):
        name = "bad"

        @overdrive.hookimpl
        def collect_stats(self, host: Any) -> dict[str, Any]:
            raise RuntimeError("nope")

    host = make_host(BadStats(), HookRecorder())
    stats = await host.get_system_stats()
    assert stats["bad"] == {"error": "RuntimeError: nope"}
    # Counted in the same call, apart from request-hook errors (never a quarantine).
    assert stats["host"]["plugins"]["bad"]["stats_errors"] == 1
    assert stats["host"]["plugins"]["bad"]["errors"] == 0

    assert stats["recorder"] == {"calls": 1}  # overdrive_configure
    assert {"cpu_percent", "memory_percent", "process_rss_mb"} <= set(stats["system"])


async def test_hook_timings_are_sampled_into_stats() -> None:
    host = make_host(Answer("a", None), config={"hook_timing_sample": 1})
    host.timed = True
    for _ in range(3):
        await host.call_first("before_request", object())
    hooks = (await host.get_system_stats())["host"]["plugins"]["a"]["hooks"]
    assert hooks["before_request"]["count"] == 3
    assert hooks["before_request"]["max_ms"] >= 0


async def test_lifecycle_is_idempotent_and_reversed() -> None:
    log: list[tuple[str, str]] = []
    host = make_host(HookRecorder("a", log), HookRecorder("b", log))
    await host.initialize()
    await host.initialize()
    await host.cleanup()
    await host.cleanup()
    events = [entry for entry in log if entry[1] != "overdrive_configure"]
    assert events == [
        ("a", "overdrive_startup"),
        ("b", "overdrive_startup"),
        ("b", "overdrive_shutdown"),
        ("a", "overdrive_shutdown"),
    ]


def test_provides_reaches_plugin_attributes() -> None:
    class Thing(overdrive.Plugin):
        name = "thing"
        provides = {"widget": "widget"}  # noqa: RUF012

        def __init__(self) -> None:
            self.widget = object()

        @overdrive.hookimpl
        def after_request(self, ctx: Any) -> None: ...

    plugin = Thing()
    host = make_host(plugin)
    assert host.widget is plugin.widget
    with pytest.raises(AttributeError, match="no enabled plugin provides it"):
        host.gadget  # noqa: B018


async def test_unregister_recompiles() -> None:
    a = Answer("a", None)
    host = make_host(a)
    host.unregister("a")
    await host.call_first("before_request", object())
    assert a.calls == 0


async def test_environment_overrides() -> None:
    host = overdrive.Overdrive(
        {"plugins": []},
        plugins=[HookRecorder()],
        env={"OVERDRIVE_TRACE": "true", "OVERDRIVE_QUARANTINE_AFTER": "7"},
    )
    assert host.settings.trace is True
    assert host.settings.quarantine_after == 7
