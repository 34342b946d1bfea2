"""The ASGI lifespan around the app's own, and what happens when Overdrive cannot start.

Kept apart from the request path (`asgi.py`) because its rules are about startup:

- Our startup runs when the app reads ``lifespan.startup``, so it comes before the
  app's own; our shutdown runs after the app has answered the shutdown.
- A configuration, plugin-load or startup error is answered to the server as one
  ``lifespan.startup.failed`` with a one-line message (uvicorn prints it and exits
  non-zero before serving), then raised, as Starlette does for its own; the app's
  own startup never runs.
- Anything the app itself does on the lifespan scope reaches the server exactly as it
  would without Overdrive: its messages, and its exceptions re-raised (an app that
  raises to say it has no lifespan support included; the ASGI spec has the server go
  on without lifespan then, and `uvicorn --lifespan on` refuse to start).
- An app that returns without reading the startup message gets the lifespan answered
  by us, so that our startup and shutdown still run.
- When start-up has completed (ours and the app's), start-up's objects are frozen out
  of the garbage collector (`overdrive.collector`, host setting ``gc_freeze``).
- Without a lifespan from the server, the first request starts the host; when that
  cannot work, every request is answered 500 and the reason logged once, at error level.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from overdrive.collector import freeze_after_startup

from .responses import INTERNAL_ERROR, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from .asgi import OverdriveMiddleware

logger = logging.getLogger("overdrive.middleware")

_ENDS = ("lifespan.shutdown.complete", "lifespan.shutdown.failed", "lifespan.startup.failed")


class _Aborted(Exception):
    """Raised into the app's lifespan when our startup failed: the app must not start."""


def one_line(exc: BaseException) -> str:
    """The message a server prints for a startup that failed: one line, cause included."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) not in text:
        text = f"{text}: {type(cause).__name__}: {cause}"
    return " ".join(text.split())


async def run_lifespan(mw: OverdriveMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    """The lifespan scope, with our startup before the app's and our shutdown after."""
    if mw.error is not None:  # the configuration was refused: the app's lifespan never runs
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.failed", "message": one_line(mw.error)})
        raise mw.error
    host = mw.host
    seen_startup = False
    failure: Exception | None = None  # ours, answered: what the app sends after it is dropped

    async def lifespan_receive() -> Message:
        nonlocal seen_startup, failure
        if failure is not None:
            raise _Aborted
        message = await receive()
        if message["type"] == "lifespan.startup":
            seen_startup = True
            try:
                await mw._startup()
            except Exception as exc:
                failure = exc
                await send({"type": "lifespan.startup.failed", "message": one_line(exc)})
                raise _Aborted from exc
        return message

    async def lifespan_send(message: Message) -> None:
        if failure is not None:
            return
        if message["type"] in _ENDS:
            await host.cleanup()
        elif message["type"] == "lifespan.startup.complete":
            freeze_after_startup(host.settings.gc_freeze)
        await send(message)

    try:
        await mw.app(scope, lifespan_receive, lifespan_send)
    except BaseException:
        if failure is not None:  # whatever the app made of our abort
            raise failure from failure.__cause__
        if seen_startup:
            await host.cleanup()
        raise
    if failure is not None:
        raise failure from failure.__cause__
    if seen_startup:
        return
    await _own_lifespan(mw, receive, send)


async def _own_lifespan(mw: OverdriveMiddleware, receive: Receive, send: Send) -> None:
    """The lifespan for an app that returned without reading it."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await mw._startup()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": one_line(exc)})
                raise
            freeze_after_startup(mw.host.settings.gc_freeze)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await mw.host.cleanup()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def start_on_request(
    mw: OverdriveMiddleware, scope: Scope, receive: Receive, send: Send
) -> bool:
    """Start the host at a request (the server sent no lifespan); False: answered 500.

    A host that cannot start stays refused: the reason is logged once, at error level,
    and every request gets a 500 (never the exception text).
    """
    if mw.error is None:
        try:
            await mw._startup()
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            mw.error = exc
    if not mw.error_logged:
        mw.error_logged = True
        logger.error("Overdrive cannot start, answering 500: %s", one_line(mw.error))
    await INTERNAL_ERROR(scope, receive, send)
    return False
