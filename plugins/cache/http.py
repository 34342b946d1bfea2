"""HTTP caching semantics after RFC 9111 (shared cache): parsing, freshness, keys, answers.

Pure functions and small classes, no I/O: `parse_cache_control` (tolerant of
malformed input: a bad value makes the response uncacheable, never an error),
`StoredResponse` (what is kept: status, headers, body, validators, freshness),
the cache key, and the ASGI answers a hit needs (200, 304, 206, 416).
Stored responses go to Redis as JSON metadata plus the raw body
(`HTTPSerializer`), never pickle.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from overdrive.middleware.responses import PlainResponse

from .codec import HTTP, CorruptEntry

__all__ = [
    "HTTPSerializer",
    "StoredResponse",
    "VaryIndex",
    "answer",
    "normalize_query",
    "parse_age",
    "parse_cache_control",
    "parse_http_date",
]

MAX_DELTA = 2**31  # RFC 9111 1.2.2: larger delta-seconds are read as this
MAX_VARY_NAMES = 16
MAX_VARY_LENGTH = 512
# RFC 9110 7.6.1 hop-by-hop, and headers that must not be replayed to other clients.
DROP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"age",
        b"content-length",
        b"set-cookie",
        b"x-request-id",
        b"x-cache",
    }
)
NOT_MODIFIED_HEADERS = frozenset(
    {b"etag", b"last-modified", b"cache-control", b"expires", b"vary", b"date", b"content-location"}
)


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Directives, lower-cased; the first of a repeated directive wins (RFC 9111 4.2.1).

    Never raises: anything unparsable is kept as written and judged by the caller.
    """
    out: dict[str, str | None] = {}
    if not value:
        return out
    for part in value.split(","):
        name, eq, arg = part.partition("=")
        name = name.strip().lower()
        if not name or name in out:
            continue
        out[name] = arg.strip().strip('"') if eq else None
    return out


def delta_seconds(value: str | None) -> int | None:
    """A delta-seconds value, or None when it is missing or malformed."""
    if value is None or not value.isdigit() or not value.isascii():
        return None
    return min(int(value[:12]), MAX_DELTA)


_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
)}  # fmt: skip
_DAY = r"(?:mon|tue|wed|thu|fri|sat|sun)"
_LONG_DAY = r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_MON = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)"
_TIME = r"(\d\d):(\d\d):(\d\d)"
# RFC 9110 5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms that a
# recipient must also accept. Nothing else (other zones, 1-digit hours, two spaces):
# for Expires, an invalid date means "already expired" (RFC 9111 5.3).
_IMF = re.compile(_DAY + r", (\d\d) " + _MON + r" (\d{4}) " + _TIME + r" gmt", re.I)
_RFC850 = re.compile(_LONG_DAY + r", (\d\d)-" + _MON + r"-(\d\d) " + _TIME + r" gmt", re.I)
_ASCTIME = re.compile(_DAY + r" " + _MON + r" ([\d ]\d) " + _TIME + r" (\d{4})", re.I)


def parse_http_date(value: str | None, now: float | None = None) -> float | None:
    """An HTTP-date (RFC 9110 5.6.7) as a POSIX timestamp; None when it is not one."""
    if not value or len(value) > 64:
        return None
    value = value.strip()
    try:
        if m := _IMF.fullmatch(value):
            day, mon, year, hh, mm, ss = m.groups()
        elif m := _ASCTIME.fullmatch(value):
            mon, day, hh, mm, ss, year = m.groups()
        elif m := _RFC850.fullmatch(value):
            day, mon, yy, hh, mm, ss = m.groups()
            # A two-digit year more than 50 years ahead is in the past century (5.6.7).
            this_year = time.gmtime(now if now is not None else time.time()).tm_year
            year_n = this_year - this_year % 100 + int(yy)
            if year_n > this_year + 50:
                year_n -= 100
            year = str(year_n)
        else:
            return None
        if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
            return None
        when = datetime(int(year), _MONTHS[mon.lower()], int(day.strip()), tzinfo=UTC)
        return when.timestamp() + int(hh) * 3600 + int(mm) * 60 + int(ss)
    except (ValueError, OverflowError):
        return None


def parse_age(values: list[str]) -> float | None:
    """The Age a response arrived with: the first member of the first line (RFC 9111
    5.1 is a single delta-seconds; a recipient of a list reads its first value)."""
    if not values:
        return None
    first = values[0].split(",", 1)[0].strip()
    age = delta_seconds(first)
    return None if age is None else float(age)


def normalize_query(query: bytes, ignore: frozenset[bytes], sort: bool = True) -> bytes:
    """The query as the key holds it: empty and ignored parameters dropped and, with
    `sort`, the parameters stably sorted by their decoded name; bytes are kept as sent.

    Only reorderings that no framework can tell apart are made: parameters with
    the same name keep their relative order (``?id=1&id=2`` is not ``?id=2&id=1``:
    Starlette's ``query_params["id"]`` is the last one), and names are compared
    percent- and plus-decoded (``%61=1&a=2`` is ``a=1&a=2`` to the app, whose
    order matters). Empty parts (``a=1&&b=2``) are skipped by every parser.
    """
    if not query:
        return b""
    parts = [p for p in query.split(b"&") if p and p.split(b"=", 1)[0] not in ignore]
    if sort and len(parts) > 1:
        parts.sort(key=_decoded_name)  # list.sort is stable
    return b"&".join(parts)


def _decoded_name(part: bytes) -> bytes:
    name = part.partition(b"=")[0]
    if b"%" in name or b"+" in name:
        return unquote_to_bytes(name.replace(b"+", b" "))
    return name


def vary_names(values: Iterable[bytes]) -> tuple[str, ...] | None:
    """Lower-cased, sorted, de-duplicated names; None for ``*`` or an oversized Vary."""
    names: set[str] = set()
    total = 0
    for raw in values:
        total += len(raw)
        if total > MAX_VARY_LENGTH:
            return None
        for item in raw.decode("latin-1").split(","):
            item = item.strip().lower()
            if item == "*":
                return None
            if item:
                names.add(item)
    if len(names) > MAX_VARY_NAMES:
        return None
    return tuple(sorted(names))


def vary_suffix(names: tuple[str, ...], headers: Mapping[str, str]) -> str:
    """The secondary key part: a digest of the request's values for the Vary names."""
    h = hashlib.blake2b(digest_size=12)
    for name in names:
        h.update(name.encode("latin-1", "replace") + b"\x00")
        value = headers.get(name)
        if value is None:
            h.update(b"\x02")  # absent matches only absent (RFC 9111 4.1), never empty
        else:
            h.update(b"=" + " ".join(value.split()).encode("latin-1", "replace"))
        h.update(b"\x01")
    return "\n~" + h.hexdigest()


def strong_etag(body: bytes) -> bytes:
    """A validator computed from the bytes: the same in every process (unlike ``hash()``)."""
    return b'"' + hashlib.blake2b(body, digest_size=16).hexdigest().encode() + b'"'


class VaryIndex:
    """Stored under the primary key when the response varies: which headers to key on."""

    __slots__ = ("names",)
    nbytes = 128

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names


class StoredResponse:
    """A cached response and what RFC 9111 needs to answer from it."""

    __slots__ = (
        "body",
        "etag",
        "fresh_for",
        "headers",
        "initial_age",
        "last_modified",
        "stale_if_error",
        "stale_while_revalidate",
        "status",
        "stored_at",
        "vary",
    )

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        stored_at: float,
        fresh_for: float,
        initial_age: float = 0.0,
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
        etag: bytes | None = None,
        last_modified: float | None = None,
        vary: tuple[str, ...] = (),
    ) -> None:
        self.status = status
        self.headers = headers  # ready to send, content-length included, no Age
        self.body = body
        self.stored_at = stored_at
        self.fresh_for = fresh_for
        self.initial_age = initial_age
        self.stale_while_revalidate = stale_while_revalidate
        self.stale_if_error = stale_if_error
        self.etag = etag
        self.last_modified = last_modified
        self.vary = vary

    @property
    def nbytes(self) -> int:
        """What this object holds in memory, from tracemalloc: the body's bytes object,
        each header's tuple, list slot and two bytes objects, this object and its floats."""
        return len(self.body) + 33 + sum(len(k) + len(v) + 80 for k, v in self.headers) + 250

    def age(self, now: float) -> float:
        return max(0.0, self.initial_age + now - self.stored_at)


class HTTPSerializer:
    """StoredResponse / VaryIndex <-> bytes: 4-byte length, JSON metadata, then the body."""

    code = HTTP
    _LEN = struct.Struct(">I")

    def dumps(self, value: Any) -> bytes:
        if isinstance(value, VaryIndex):
            meta: list[Any] = [0, list(value.names)]
            body = b""
        elif isinstance(value, StoredResponse):
            flat = [part.decode("latin-1") for pair in value.headers for part in pair]
            meta = [
                1,
                value.status,
                value.stored_at,
                value.fresh_for,
                value.initial_age,
                value.stale_while_revalidate,
                value.stale_if_error,
                value.etag.decode("latin-1") if value.etag else None,
                value.last_modified,
                list(value.vary),
                flat,
            ]
            body = value.body
        else:
            raise TypeError(f"HTTPSerializer cannot store {type(value).__name__}")
        head = json.dumps(meta, separators=(",", ":")).encode()
        return self._LEN.pack(len(head)) + head + body

    def loads(self, data: bytes) -> Any:
        """Checks every field's type: a damaged entry raises `CorruptEntry`, never later."""
        try:
            (n,) = self._LEN.unpack_from(data)
            meta = json.loads(data[4 : 4 + n])
            if meta[0] == 0:
                return VaryIndex(tuple(str(x) for x in meta[1]))
            kind, status, stored_at, fresh, age, swr, sie, etag, lm, vary, flat = meta
            if kind != 1 or type(status) is not int or not 100 <= status <= 599:
                raise ValueError("bad kind or status")
            if len(flat) % 2 or not all(type(x) is str for x in flat):
                raise ValueError("bad headers")
            encoded = [x.encode("latin-1") for x in flat]
            it = iter(encoded)
            return StoredResponse(
                status,
                list(zip(it, it, strict=True)),
                data[4 + n :],
                stored_at=float(stored_at),
                fresh_for=float(fresh),
                initial_age=float(age),
                stale_while_revalidate=float(swr),
                stale_if_error=float(sie),
                etag=etag.encode("latin-1") if etag else None,
                last_modified=float(lm) if lm is not None else None,
                vary=tuple(str(x) for x in vary),
            )
        except (
            AttributeError,
            IndexError,
            KeyError,
            TypeError,
            ValueError,
            struct.error,
            UnicodeError,
        ) as exc:
            raise CorruptEntry(f"not a stored HTTP response: {exc}") from None


# -- answering from a stored response ----------------------------------------------------


class Answer(PlainResponse):
    """A `PlainResponse` with headers prepared from the stored response, sent as they are
    (content-length included; HEAD and 304: no body)."""

    __slots__ = ()

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def _etag_matches(header: str, etag: bytes | None) -> bool:
    """If-None-Match, weak comparison (RFC 9110 13.1.2)."""
    if etag is None:
        return False
    if header.strip() == "*":
        return True
    mine = etag.decode("latin-1").removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == mine for tag in header.split(","))


def answer(
    stored: StoredResponse,
    age: float,
    head: bool,
    if_none_match: str | None,
    if_modified_since: str | None,
    range_header: str | None,
    if_range: str | None,
) -> Answer:
    """The answer to a request from `stored`: 304, 206/416 for a Range, or 200."""
    age_header = (b"age", b"%d" % int(age))
    if stored.status == 200 and (if_none_match is not None or if_modified_since is not None):
        if if_none_match is not None:
            not_modified = _etag_matches(if_none_match, stored.etag)
        else:
            since = parse_http_date(if_modified_since)
            last = stored.last_modified
            if last is None:  # RFC 9111 4.3.2: without Last-Modified, the stored Date
                last = parse_http_date(next((v for k, v in stored.headers if k == b"date"),
                                            b"").decode("latin-1"))  # fmt: skip
            not_modified = since is not None and last is not None and last <= since
        if not_modified:
            headers = [h for h in stored.headers if h[0] in NOT_MODIFIED_HEADERS]
            headers.append(age_header)
            return Answer(304, headers, b"")
    if range_header is not None and stored.status == 200:
        ranged = _range(stored, range_header, if_range, age_header, head)
        if ranged is not None:
            return ranged
    headers = [*stored.headers, age_header]
    return Answer(stored.status, headers, b"" if head else stored.body)


def _range(
    stored: StoredResponse,
    header: str,
    if_range: str | None,
    age_header: tuple[bytes, bytes],
    head: bool,
) -> Answer | None:
    """A single byte range (RFC 9110 14); None means: answer 200 with the whole body."""
    if if_range is not None:
        value = if_range.strip()
        if value.startswith(('"', "W/")):
            if stored.etag is None or value != stored.etag.decode("latin-1"):
                return None  # weak or different validator: the whole representation
        else:
            since = parse_http_date(value)
            if since is None or stored.last_modified is None or stored.last_modified > since:
                return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # other units and multiple ranges: 200 is always allowed
    first, dash, last = spec.strip().partition("-")
    size = len(stored.body)
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise ValueError
            start, end = max(0, size - n), size - 1
        else:
            start = int(first)
            end = int(last) if last else max(size - 1, start)
            if start < 0 or end < start:
                return None  # malformed: ignore the Range (RFC 9110 14.2)
            end = min(end, size - 1)
    except ValueError:
        return None
    base = [h for h in stored.headers if h[0] != b"content-length"]
    if start >= size or size == 0:
        base.append((b"content-range", b"bytes */%d" % size))
        base.append((b"content-length", b"0"))
        base.append(age_header)
        return Answer(416, base, b"")
    body = stored.body[start : end + 1]
    base.append((b"content-range", b"bytes %d-%d/%d" % (start, end, size)))
    base.append((b"content-length", b"%d" % len(body)))
    base.append(age_header)
    return Answer(206, base, b"" if head else body)
