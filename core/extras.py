"""Which extra of the package installs each optional import, so that an error can say.

The core needs only starlette, pluggy, structlog and psutil. Everything else is an
extra (pyproject.toml), imported by the plugin that uses it, when it uses it; when
that import fails, the error says what to install instead of only what is missing:
``No module named 'tenacity': install the 'resilience' extra (pip install
'overdrive[resilience]')``. tests/test_extras.py checks this table against the
package's own metadata, and each plugin against the extra it declares here.
"""

from __future__ import annotations

#: Top-level import name -> the extra that installs it.
EXTRA_OF = {
    "aiohttp": "http",
    "aiosqlite": "postgres",
    "asgi_lifespan": "testing",
    "asyncpg": "postgres",
    "httptools": "http",
    "httpx": "testing",
    "limits": "resilience",
    "msgpack": "redis",
    "opentelemetry": "otel",
    "prometheus_client": "prometheus",
    "pytest": "testing",
    "pytest_asyncio": "testing",
    "pynvml": "gpu",
    "redis": "redis",
    "sqlalchemy": "postgres",
    "taskiq": "tasks",
    "taskiq_redis": "tasks",
    "tenacity": "resilience",
    "torch": "gpu",
    "zstandard": "redis",
}

#: Built-in plugin -> the extra it cannot load without. The others load and run on
#: the core alone; a backend they are configured for may need one (docs/plugins/).
PLUGIN_EXTRAS = {
    "otel": "otel",
    "prometheus": "prometheus",
    "ratelimit": "resilience",
    "retry": "resilience",
}


def install_hint(exc: BaseException) -> str | None:
    """What to install for `exc` (or the import error that caused it), or None."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ModuleNotFoundError) and seen.name:
            module = seen.name.partition(".")[0]
            extra = EXTRA_OF.get(module)
            if extra is None:
                return None
            return (
                f"No module named {module!r}: install the {extra!r} extra "
                f"(pip install 'overdrive[{extra}]')"
            )
        seen = seen.__cause__ or seen.__context__
    return None
