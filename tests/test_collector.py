"""The collector policy: start-up's objects frozen out of the collector's passes."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from overdrive.collector import freeze_after_startup
from overdrive.middleware import OverdriveMiddleware


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    enabled = gc.isenabled()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def app_with(**config: Any) -> OverdriveMiddleware:
    return OverdriveMiddleware(Starlette(), config={"plugins": [], **config})


async def test_startup_objects_are_frozen_when_the_lifespan_completes() -> None:
    built_at_startup = [object() for _ in range(1000)]
    async with LifespanManager(app_with()):
        assert gc.get_freeze_count() >= len(built_at_startup)


async def test_an_app_without_lifespan_support_is_frozen_too() -> None:
    async def no_lifespan(scope: Any, receive: Any, send: Any) -> None:
        return  # never reads the lifespan messages: the middleware answers them

    async with LifespanManager(OverdriveMiddleware(no_lifespan, config={"plugins": []})):
        assert gc.get_freeze_count() > 0


async def test_one_setting_turns_it_off() -> None:
    async with LifespanManager(app_with(gc_freeze=False)):
        assert gc.get_freeze_count() == 0


def test_garbage_is_collected_before_the_freeze() -> None:
    class Cycle:
        pass

    a, b = Cycle(), Cycle()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    gone = weakref.ref(a)
    del a, b
    assert freeze_after_startup(True) > 0
    # The cycle was freed by the collection, not frozen for the life of the process.
    assert gone() is None


def test_a_disabled_collector_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    gc.disable()
    with caplog.at_level(logging.WARNING, logger="overdrive.collector"):
        freeze_after_startup(True)
    assert "garbage collector is disabled" in caplog.text
