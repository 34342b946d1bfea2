"""The garbage collector in a serving process: what start-up built is frozen out of it.

A serving process holds a few hundred thousand long-lived objects that its imports
and start-up made (torch, FastAPI, pydantic: about 0.5M in the batching benchmark).
Each full collection walks them all while the one event loop waits, and that pause
lands in the tail latency of every request in flight. `gc.freeze()` moves them to a
permanent generation that collections skip. Done once, when the app's lifespan
start-up has completed, after one collection, so that start-up's garbage is freed
rather than frozen; objects made later are collected as usual.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["freeze_after_startup"]

logger = logging.getLogger("overdrive.collector")


def freeze_after_startup(enabled: bool) -> int:
    """Collect, then freeze what is left; the number of objects frozen (0 when off).

    An app that switched the collector off altogether is told once: nothing then
    frees reference cycles, and the process grows for as long as it serves.
    """
    if not enabled:
        return 0
    if not gc.isenabled():
        logger.warning(
            "the garbage collector is disabled (gc.disable()): reference cycles are never "
            "freed and memory grows while serving; leave it on, Overdrive freezes start-up's "
            "objects out of its passes (host setting gc_freeze)"
        )
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
