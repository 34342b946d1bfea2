"""`MemoryOptimizer`, the seed's memory primitive: figures, clean-up, monitoring.

psutil reports the machine's memory; inside a container the limit that kills
the process is the cgroup's, so `read_cgroup_memory` reads cgroup v2 (or v1
where the memory controller is v1) and the tighter of the two is used. Usage in
a cgroup is counted as the kernel's OOM logic and kubelet see it: usage minus
inactive file cache (the "working set"). Usable without the middleware.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from overdrive.redact import plain_traceback

__all__ = ["CgroupMemory", "MemoryOptimizer", "malloc_trim", "read_cgroup_memory"]

logger = logging.getLogger("overdrive.memory")
MB = 2**20
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge page-aligned number


# -- cgroups -----------------------------------------------------------------------


@dataclass(slots=True)
class CgroupMemory:
    """The memory cgroup this process is in. `limit` is None when there is none."""

    version: int
    path: str
    limit: int | None
    usage: int
    inactive_file: int

    @property
    def working_set(self) -> int:
        return max(0, self.usage - self.inactive_file)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _mounts(mountinfo: str) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(v2 mount, v1 memory mount), each as (root within the hierarchy, mount point)."""
    v2 = v1 = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = (fields[3], fields[4])
        elif fstype == "cgroup" and "memory" in options and v1 is None:
            v1 = (fields[3], fields[4])
    return v2, v1


def _directory(root: Path, mount: tuple[str, str], cgroup_path: str) -> tuple[Path, Path]:
    mount_root, mount_point = mount
    base = root / mount_point.lstrip("/")
    rel = cgroup_path
    if mount_root != "/" and (rel == mount_root or rel.startswith(mount_root + "/")):
        rel = rel[len(mount_root) :]
    leaf = base / rel.strip("/") if rel.strip("/") else base
    return (leaf if leaf.is_dir() else base), base


def read_cgroup_memory(root: str | Path = "/") -> CgroupMemory | None:
    """This process's memory cgroup, read from `root` (``/``, or a fixture tree).

    The limit is the tightest one from the process's cgroup up to the mount
    point (a parent's limit binds children too). None when no memory cgroup is
    mounted (not Linux, or a sandbox without /sys/fs/cgroup).
    """
    root = Path(root)
    try:
        own = (root / "proc/self/cgroup").read_text()
        mountinfo = (root / "proc/self/mountinfo").read_text()
    except OSError:
        return None
    v2_path = v1_path = None
    for line in own.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    v2_mount, v1_mount = _mounts(mountinfo)
    if v1_mount is not None and v1_path is not None:
        leaf, top = _directory(root, v1_mount, v1_path)
        limit_file, usage_file, inactive_key, version = (
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
            1,
        )
    elif v2_mount is not None and v2_path is not None:
        leaf, top = _directory(root, v2_mount, v2_path)
        limit_file, usage_file, inactive_key, version = (
            "memory.max",
            "memory.current",
            "inactive_file",
            2,
        )
    else:
        return None
    usage = _read_int(leaf / usage_file)
    if usage is None:
        return None
    limits = []
    node = leaf
    while True:
        limit = _read_int(node / limit_file)
        if limit is not None:
            limits.append(limit)
        if node == top or top not in node.parents:
            break
        node = node.parent
    stat = _stat(leaf / "memory.stat")
    if version == 1:
        hierarchical = stat.get("hierarchical_memory_limit")
        if hierarchical is not None and hierarchical < _UNLIMITED:
            limits.append(hierarchical)
    return CgroupMemory(
        version=version,
        path=str(leaf),
        limit=min(limits) if limits else None,
        usage=usage,
        inactive_file=stat.get(inactive_key, 0),
    )


# -- malloc_trim -------------------------------------------------------------------

_libc: Any = None


def malloc_trim() -> bool:
    """Give freed heap pages back to the OS (glibc's ``malloc_trim(0)``).

    Returns False where the C library has no such call (musl, macOS, Windows).
    """
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    fn = getattr(_libc, "malloc_trim", None) if _libc else None
    if fn is None:
        return False
    return bool(fn(0))


# -- MemoryOptimizer -------------------------------------------------------------------


class _ThreadMonitor:
    """`monitor_memory` outside an event loop: a daemon thread with `cancel()`."""

    def __init__(self, target: Callable[[threading.Event], None]) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=target, args=(self._stop,), name="overdrive-memory-monitor", daemon=True
        )
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()

    def done(self) -> bool:
        return not self._thread.is_alive()


class MemoryOptimizer:
    """Memory figures, clean-up and monitoring; usable without the middleware.

    `threshold_percent` is where `should_optimize_memory` says yes. Attached to a
    host (``MemoryOptimizer(host)``, or through the `memory` plugin),
    `optimize_memory` also tells every plugin (`on_memory_pressure`) so caches
    trim and models unload.
    """

    def __init__(
        self,
        host: Any = None,
        threshold_percent: float = 80.0,
        cgroup_root: str | Path = "/",
    ) -> None:
        self.host = host
        self.threshold_percent = threshold_percent
        self.cgroup_root = cgroup_root
        self._process = psutil.Process()
        self._pending: set[asyncio.Task[Any]] = set()

    def get_memory_usage(self) -> dict[str, Any]:
        """Process RSS, and the memory percent and available bytes that bind.

        ``percent`` and ``available`` come from the cgroup when its limit is
        tighter than the machine's memory (``source`` says which). Sizes are
        bytes; the ``_mb`` twins are for people.
        """
        vm = psutil.virtual_memory()
        rss = self._process.memory_info().rss
        out: dict[str, Any] = {
            "rss": rss,
            "rss_mb": round(rss / MB, 1),
            "percent": vm.percent,
            "available": vm.available,
            "available_mb": round(vm.available / MB, 1),
            "total": vm.total,
            "system_percent": vm.percent,
            "source": "system",
        }
        cg = read_cgroup_memory(self.cgroup_root)
        if cg is not None:
            out["cgroup"] = {
                "version": cg.version,
                "limit": cg.limit,
                "usage": cg.usage,
                "working_set": cg.working_set,
            }
            if cg.limit is not None and cg.limit < vm.total:
                available = max(0, cg.limit - cg.working_set)
                percent = round(100.0 * cg.working_set / cg.limit, 1)
                if percent >= vm.percent or available < vm.available:
                    out.update(
                        percent=percent,
                        available=min(available, vm.available),
                        available_mb=round(min(available, vm.available) / MB, 1),
                        total=cg.limit,
                        source=f"cgroup v{cg.version}",
                    )
        return out

    def should_optimize_memory(self) -> bool:
        return bool(self.get_memory_usage()["percent"] >= self.threshold_percent)

    def _collect(self) -> dict[str, Any]:
        before = self._process.memory_info().rss
        collected = gc.collect()
        trimmed = malloc_trim()
        return {"rss_before": before, "gc_collected": collected, "malloc_trim": trimmed}

    def _result(self, out: dict[str, Any], notified: Any) -> dict[str, Any]:
        after = self._process.memory_info().rss
        freed = max(0, out.pop("rss_before") - after)
        out.update(freed_bytes=freed, freed_mb=round(freed / MB, 1), rss_mb=round(after / MB, 1))
        out["plugins_notified"] = notified
        return out

    def optimize_memory(self, level: str = "warning") -> dict[str, Any]:
        """Collect garbage, trim the C heap, tell the plugins; returns what was freed.

        Sync, as the seed calls it. Inside a running event loop the plugins are
        told in a task (``plugins_notified: "scheduled"``); use
        `optimize_memory_async` to wait for them.
        """
        out = self._collect()
        notified: Any = False
        if self.host is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                asyncio.run(self.host.memory_pressure(level))
                notified = True
            else:
                task = loop.create_task(self.host.memory_pressure(level))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                notified = "scheduled"
        return self._result(out, notified)

    async def optimize_memory_async(self, level: str = "warning") -> dict[str, Any]:
        """`optimize_memory`, awaiting every plugin's `on_memory_pressure` first."""
        notified = False
        if self.host is not None:
            await self.host.memory_pressure(level)
            notified = True
        out = await asyncio.to_thread(self._collect)
        return self._result(out, notified)

    def monitor_memory(
        self, callback: Callable[[dict[str, Any]], Any] | None = None, interval: float = 5.0
    ) -> Any:
        """Check every `interval` s; over the threshold, call ``callback(usage)``.

        Returns the monitor (``.cancel()`` stops it): an asyncio task inside an
        event loop, else a daemon thread. With no callback it optimizes instead.
        An async callback is awaited. A callback that raises is logged.
        """
        if interval <= 0:
            raise ValueError(f"interval: expected > 0, got {interval!r}")
        act = callback or (lambda usage: self.optimize_memory())

        def check() -> Any:
            usage = self.get_memory_usage()
            if usage["percent"] >= self.threshold_percent:
                return act(usage)
            return None

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:

            def run(stop: threading.Event) -> None:
                while not stop.is_set():
                    try:
                        result = check()
                        if inspect.isawaitable(result):
                            asyncio.run(_await(result))
                    except Exception as exc:
                        logger.error("memory monitor callback raised\n%s", plain_traceback(exc))
                    stop.wait(interval)

            return _ThreadMonitor(run)

        async def watch() -> None:
            while True:
                try:
                    result = check()
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    logger.error("memory monitor callback raised\n%s", plain_traceback(exc))
                await asyncio.sleep(interval)

        return loop.create_task(watch(), name="overdrive-memory-monitor")


async def _await(awaitable: Any) -> Any:
    return await awaitable
