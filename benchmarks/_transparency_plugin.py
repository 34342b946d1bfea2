"""pytest plugin for benchmarks/transparency.py: every app a `TestClient` drives gets
`OverdriveMiddleware` outermost, with the configuration named by
``OVERDRIVE_TRANSPARENCY`` (none: run the suite bare).

Loaded with ``-p _transparency_plugin`` into Starlette's and FastAPI's own test
suites; `TestClient` is patched once, before any test module imports it, so
fixtures, factories and direct calls all go through it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "no-plugins": {"plugins": []},
    "observability": {"plugins": ["access_log", "profiler", "prometheus"]},
    "defaults": {
        "plugins": [
            "cache",
            "ratelimit",
            "concurrency",
            "breaker",
            "timeout",
            "retry",
            "profiler",
            "access_log",
        ],
        "ratelimit": {"limit": "1000000/second"},
        "concurrency": {"max_concurrent": 100000, "max_queue": 100000},
        "timeout": {"seconds": 60},
    },
}


def pytest_configure(config: Any) -> None:
    name = os.environ.get("OVERDRIVE_TRANSPARENCY", "bare")
    if name == "bare":
        return
    overdrive_config = CONFIGS[name]
    from starlette import testclient

    from overdrive.middleware import OverdriveMiddleware

    # the access log goes to stdlib logging; the suites' caplog tests must not see it
    logging.getLogger("overdrive").propagate = False
    original = testclient.TestClient.__init__

    def __init__(self: Any, app: Any, *args: Any, **kwargs: Any) -> None:
        inner = app
        if not testclient._is_asgi3(app):
            # an ASGI 2 app (the suite tests that TestClient adapts them): adapt it
            # first, as TestClient would, since the middleware is ASGI 3
            inner = testclient._WrapASGI2(app)
        wrapped = OverdriveMiddleware(inner, config=dict(overdrive_config), env={})
        original(self, wrapped, *args, **kwargs)
        self.overdrive_app = app

    testclient.TestClient.__init__ = __init__  # type: ignore[method-assign]
