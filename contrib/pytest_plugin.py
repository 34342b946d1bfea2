"""pytest fixtures for plugin authors (registered through the `pytest11` entry point).

- ``hook_recorder``: a fresh `HookRecorder` plugin.
- ``overdrive_serve``: an async factory, ``h = await overdrive_serve(app, plugins=[...])``,
  that runs the app's lifespan and gives a `Harness` (host, wrapped app, httpx client);
  everything it opened is closed at teardown. Needs pytest-asyncio.

This module is imported by every pytest run in an environment where overdrive is
installed, so it imports nothing heavy until a fixture is used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest


@pytest.fixture
def hook_recorder() -> Any:
    from overdrive.contrib.testing import HookRecorder

    return HookRecorder()


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def overdrive_serve() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
        from overdrive.contrib.testing import serve

        async with AsyncExitStack() as stack:

            async def factory(app: Any, **kwargs: Any) -> Any:
                return await stack.enter_async_context(serve(app, **kwargs))

            yield factory
