"""MemoryOptimizer (psutil + cgroups) and the `memory` plugin that sheds load."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import overdrive.plugins.memory as memory_mod
from overdrive import ConfigError, hookimpl
from overdrive.contrib.testing import check_plugin, make_host, serve
from overdrive.plugins.memory import (
    MemoryOptimizer,
    MemoryPlugin,
    malloc_trim,
    read_cgroup_memory,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cgroup"
MiB = 2**20


def test_public_names() -> None:
    assert memory_mod.__all__ == sorted(memory_mod.__all__)
    assert memory_mod.__all__ == [
        "CgroupMemory",
        "MemoryOptimizer",
        "MemoryPlugin",
        "MemorySettings",
        "malloc_trim",
        "read_cgroup_memory",
    ]


def test_check_plugin() -> None:
    check_plugin(MemoryPlugin)


# -- cgroup parsing on fixture trees ------------------------------------------------


def test_cgroup_v2_parent_limit_binds_the_container() -> None:
    cg = read_cgroup_memory(FIXTURES / "v2")
    assert cg is not None
    assert cg.version == 2
    assert cg.path.endswith("sys/fs/cgroup/kubepods/pod1/ctr")
    assert cg.limit == 512 * MiB  # the pod's memory.max; the container's own is "max"
    assert cg.usage == 384 * MiB
    assert cg.working_set == 384 * MiB - 96 * MiB  # usage minus inactive file cache


def test_cgroup_v2_in_a_cgroup_namespace() -> None:
    cg = read_cgroup_memory(FIXTURES / "v2ns")
    assert cg is not None
    assert (cg.version, cg.limit, cg.usage, cg.working_set) == (2, 1024 * MiB, 512 * MiB, 512 * MiB)


def test_cgroup_v1_memory_controller_wins_over_the_v2_mount() -> None:
    cg = read_cgroup_memory(FIXTURES / "v1")
    assert cg is not None
    assert cg.version == 1
    assert cg.limit == 256 * MiB
    assert cg.usage == 192 * MiB
    assert cg.working_set == 128 * MiB  # total_inactive_file, the hierarchical figure


def test_cgroup_v1_without_a_limit() -> None:
    cg = read_cgroup_memory(FIXTURES / "v1unlimited")
    assert cg is not None
    assert cg.version == 1 and cg.limit is None and cg.usage == 1241571328


def test_no_memory_cgroup_mounted() -> None:
    assert read_cgroup_memory(FIXTURES / "none") is None
    assert read_cgroup_memory(FIXTURES / "does-not-exist") is None


def test_a_tighter_cgroup_limit_is_what_get_memory_usage_reports() -> None:
    usage = MemoryOptimizer(cgroup_root=FIXTURES / "v2").get_memory_usage()
    assert usage["source"] == "cgroup v2"
    assert usage["percent"] == pytest.approx(100 * 288 / 512, abs=0.1)
    assert usage["available"] <= 224 * MiB
    assert usage["total"] == 512 * MiB
    assert usage["rss"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux only")
def test_the_real_cgroup_of_this_machine() -> None:
    if not Path("/sys/fs/cgroup").is_dir():
        pytest.skip("no /sys/fs/cgroup here")
    cg = read_cgroup_memory()
    assert cg is not None, "a memory cgroup is mounted but was not found"
    assert cg.version in (1, 2)
    usage_file = "memory.current" if cg.version == 2 else "memory.usage_in_bytes"
    assert (Path(cg.path) / usage_file).is_file()
    assert cg.usage > 0
    assert cg.limit is None or cg.limit > 0
    assert 0 <= cg.working_set <= cg.usage
    usage = MemoryOptimizer().get_memory_usage()
    assert usage["cgroup"]["version"] == cg.version
    if cg.limit is None:
        assert usage["source"] == "system"


# -- MemoryOptimizer: the seed's snippets, as written ---------------------------------------


def test_seed_snippet_runs_as_written_without_an_event_loop() -> None:
    alerts: list[dict[str, Any]] = []
    alerted = threading.Event()

    def memory_alert_callback(stats: dict[str, Any]) -> None:
        alerts.append(stats)
        alerted.set()

    memory_optimizer = MemoryOptimizer()
    memory_stats = memory_optimizer.get_memory_usage()
    assert f"Memory usage: {memory_stats['percent']:.1f}%"
    if memory_optimizer.should_optimize_memory():
        memory_optimizer.optimize_memory()
    freed = memory_optimizer.optimize_memory()
    assert freed["freed_bytes"] >= 0 and freed["gc_collected"] >= 0
    memory_optimizer.threshold_percent = 0.0  # so that the monitor calls back at once
    monitor = memory_optimizer.monitor_memory(callback=memory_alert_callback, interval=0.05)
    assert alerted.wait(10)
    monitor.cancel()
    assert alerts[0]["percent"] >= 0


def test_malloc_trim_where_libc_has_it() -> None:
    result = malloc_trim()
    assert isinstance(result, bool)
    if sys.platform.startswith("linux") and Path("/lib/x86_64-linux-gnu/libc.so.6").exists():
        malloc_trim()  # glibc: callable twice, no error


class PressureRecorder:
    name = "pressure"

    def __init__(self) -> None:
        self.levels: list[str] = []

    @hookimpl
    async def on_memory_pressure(self, host: Any, level: str) -> None:
        self.levels.append(level)


async def test_optimize_tells_every_plugin_and_monitor_is_a_task() -> None:
    recorder = PressureRecorder()
    host = make_host(recorder)
    optimizer = MemoryOptimizer(host)
    result = await optimizer.optimize_memory_async("critical")
    assert result["plugins_notified"] is True
    assert recorder.levels == ["critical"]
    # The sync call inside a running loop schedules the notification.
    assert optimizer.optimize_memory()["plugins_notified"] == "scheduled"
    await asyncio.sleep(0)
    assert recorder.levels == ["critical", "warning"]

    seen = asyncio.Event()
    optimizer.threshold_percent = 0.0
    task = optimizer.monitor_memory(callback=lambda usage: seen.set(), interval=0.01)
    await asyncio.wait_for(seen.wait(), 10)
    task.cancel()


def test_sync_optimize_without_a_loop_notifies_the_host() -> None:
    recorder = PressureRecorder()
    optimizer = MemoryOptimizer(make_host(recorder))
    assert optimizer.optimize_memory()["plugins_notified"] is True
    assert recorder.levels == ["warning"]


# -- the plugin -----------------------------------------------------------------------------


def app() -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/work", ok), Route("/health", ok)])


async def test_sheds_above_critical_and_recovers_below(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    shutil.copytree(FIXTURES / "v2ns", root)  # limit 1024 MiB, working set 512 MiB: 50%
    current = root / "sys/fs/cgroup/memory.current"
    recorder = PressureRecorder()
    plugin = MemoryPlugin(cgroup_root=root)
    config = {
        "plugins": ["memory", "pressure"],
        "memory": {"warning_percent": 30, "critical_percent": 45, "recover_percent": 35},
        "routes": [{"path": "/health", "memory": {"shed": False}}],
    }
    host = make_host(plugin, recorder, config=config)
    async with serve(app(), host=host) as h:
        r = await h.client.get("/work")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert (await h.client.get("/health")).status_code == 200  # exempt by route rule
        assert recorder.levels == ["critical"]

        current.write_text(str(410 * MiB))  # 40%: under critical, above recover: still shed
        await plugin.check()
        assert (await h.client.get("/work")).status_code == 503

        current.write_text(str(300 * MiB))  # 29%: recovered
        await plugin.check()
        assert (await h.client.get("/work")).status_code == 200
        stats = (await h.host.get_system_stats())["memory"]
        assert stats["shedding"] is False
        assert stats["shed_requests"] == 2 and stats["sheds_entered"] == 1
        assert stats["source"] == "cgroup v2"


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="warning_percent"):
        make_host(
            MemoryPlugin(), config={"memory": {"warning_percent": 95, "critical_percent": 90}}
        )
    with pytest.raises(ConfigError, match="critical_percent"):
        make_host(MemoryPlugin(), config={"memory": {"critical_percent": 120}})
