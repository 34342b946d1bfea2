"""Request ids: trust a sane incoming one, else make one that is cheap and unique.

A generated id is a random per-process prefix and a counter: unique across
processes and restarts without a syscall per request. Incoming ids are kept
only when short and made of URL-safe characters, so they are safe to log and
to echo in a header (no header or log injection).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

_ALLOWED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:@+=/"
MAX_LENGTH = 128

_prefix = os.urandom(6).hex() + "-"
_counter = itertools.count(1)


def is_sane(value: bytes) -> bool:
    """True for 1..128 bytes of letters, digits and ``-_.:@+=/``."""
    return 0 < len(value) <= MAX_LENGTH and not value.translate(None, _ALLOWED)


def sets_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    """True when the response `headers` (ASGI pairs) already carry `name` (lowercase):
    the app set its own request id, which is kept rather than sent twice."""
    n = len(name)
    for key, _ in headers:  # noqa: SIM110 (a loop: any() of a generator is slower here)
        if len(key) == n and key.lower() == name:
            return True
    return False


def new_request_id() -> str:
    return _prefix + format(next(_counter), "x")


def reseed() -> None:
    """A fresh prefix, for a forked worker that inherited its parent's."""
    global _prefix, _counter
    _prefix = os.urandom(6).hex() + "-"
    _counter = itertools.count(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reseed)
