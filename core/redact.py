"""One routine that takes secrets out of anything printed or served.

Every place that prints or serves a URL or a settings value (``overdrive
config``/``explain``, `host.get_system_stats()` and so every stats endpoint,
the Prometheus labels, the logs of an isolated plugin error) goes through
`redact`, so a fix here is a fix everywhere.

What is replaced by ``***``:

- the password of a URL's user info (``redis://default:***@host``), found
  the way urllib and the database/Redis clients find it: the authority ends
  at the first ``/``, ``?`` or ``#`` and the user info at its *last* ``@``, so
  a password containing ``@`` or ``:`` is replaced whole. A password with an
  unescaped ``/``, ``?`` or ``#`` (RFC 3986 wants them percent-encoded, and
  those clients cannot parse them either) is still replaced, unless what
  precedes that character reads as a port (``u:1234/x@h``);
- user info without a password (``https://ghp_token@github.com``), whole:
  it is often a token (pip does the same);
- the value of a query parameter whose name says secret (``?password=``,
  ``sslpassword``, ``token``, ``api_key``, ``secret``, ``auth``, ...);
- in a mapping, the value under a key whose name says secret
  (``{"token": "..."}``), whatever it is.

URLs are found inside longer strings too (an error message naming the
server it could not reach); a URL ends at whitespace or a quote.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "is_secret_name", "plain_traceback", "redact", "redact_text", "redact_url"]

MASK = "***"
# Names (of query parameters, settings keys) whose values are secrets. Matched on the
# lowercased name with "-" and "_" removed, as substrings: "sslpassword", "X-Api-Key".
_SECRET_PARTS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "privatekey",
    "credential",
    "signature",
    "auth",
    "cookie",
    "sessionid",
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_AUTHORITY_END = re.compile(r"[/?#]")


def is_secret_name(name: str) -> bool:
    """Whether a parameter or settings key of this name holds a secret."""
    folded = name.lower().replace("-", "").replace("_", "")
    return any(part in folded for part in _SECRET_PARTS)


def redact_url(url: str) -> str:
    """`url` with its password, token-like user info and secret query values as ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = _AUTHORITY_END.search(rest)
    authority = rest[: end.start()] if end else rest
    at = authority.rfind("@")
    if at < 0 and end is not None and "@" in rest[end.start() :]:
        # No "@" before the first "/", "?" or "#": either there is no user info, or the
        # password holds one of those characters unescaped ("u:p/w@h"). The latter when
        # the authority has a ":" not followed by a port number.
        # Over-redacting such a URL is safe; stopping short would leak: the last "@".
        # "[::1]" is an IPv6 host, never user info.
        _, colon, after = authority.rpartition(":")
        if colon and not after.isdigit() and not authority.startswith("["):
            at = rest.rfind("@")
    if at >= 0:
        userinfo, host_and_rest = rest[:at], rest[at + 1 :]
        user, colon, _ = userinfo.partition(":")
        masked = f"{user}:{MASK}" if colon else MASK
        rest = f"{masked}@{host_and_rest}"
    query_at = rest.find("?")
    if query_at < 0:
        return f"{scheme}://{rest}"
    head, query = rest[: query_at + 1], rest[query_at + 1 :]
    query, hash_sign, fragment = query.partition("#")
    return f"{scheme}://{head}{_redact_query(query)}{hash_sign}{fragment}"


def _redact_query(query: str) -> str:
    parts = []
    for pair in query.split("&"):
        name, eq, _value = pair.partition("=")
        if eq and is_secret_name(_unquote(name)):
            pair = f"{name}={MASK}"
        parts.append(pair)
    return "&".join(parts)


def _unquote(name: str) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(name) if "%" in name or "+" in name else name


def redact_text(text: str) -> str:
    """Every URL inside `text` redacted (`redact_url`); the rest unchanged."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def redact(value: Any) -> Any:
    """`value` with every secret replaced, through nested mappings, lists and tuples.

    Strings are `redact_text`-ed; a mapping's value under a secret-sounding key
    (`is_secret_name`) becomes ``***`` when it is set (``None`` and empty stay,
    so "not configured" still reads as such). A number under such a key (a rate
    limiter's ``tokens``) is a figure, not a secret: only strings and bytes are
    masked by name. Other values are returned as they are.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: (
                MASK
                if v and isinstance(v, (str, bytes)) and isinstance(k, str) and is_secret_name(k)
                else redact(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def plain_traceback(exc: BaseException) -> str:
    """The traceback of `exc` as text, redacted, with no local variables.

    For logging an isolated failure: structlog's rich and dict tracebacks show
    each frame's locals by default, and a frame's locals can be a request's
    headers or a connection URL. Pass this as a field instead of ``exc_info``.
    """
    return redact_text("".join(traceback.format_exception(exc)).rstrip())
