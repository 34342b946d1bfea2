"""Memory: the seed's `MemoryOptimizer` (`optimizer`) and the `memory` plugin that
sheds load (`plugin`). See docs/plugins/memory.md."""

from __future__ import annotations

from .optimizer import CgroupMemory, MemoryOptimizer, malloc_trim, read_cgroup_memory
from .plugin import MemoryPlugin, MemorySettings

__all__ = [
    "CgroupMemory",
    "MemoryOptimizer",
    "MemoryPlugin",
    "MemorySettings",
    "malloc_trim",
    "read_cgroup_memory",
]
