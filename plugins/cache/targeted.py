"""Targeted cache control (RFC 9213): `CDN-Cache-Control` and names of our own.

A response can carry cache directives meant only for one class of cache, in a
field named for it (``CDN-Cache-Control``, or ``Overdrive-Cache-Control`` set
with the ``cache.targeted_cache_control`` setting). When such a field is present
and valid, the cache uses its directives *instead of* ``Cache-Control`` for its
own decisions (store, how long), and passes both fields on unchanged.

The field is a Structured Field Dictionary (RFC 8941 3.2); a field that does not
parse as one is ignored as a whole (RFC 9213 2.1), and a directive whose value
has the wrong type is ignored on its own. This is a parser for exactly that: the
dictionary members and their parameters, bare items of every type, inner lists.
It is small and allocation-light because it runs on every cacheable response; a
general Structured Fields library (http-sf) would add a dependency to the request
path for the few lines used here.
"""

from __future__ import annotations

import re

__all__ = ["parse_targeted"]

_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_NUMBER = re.compile(r"-?\d{1,15}(\.\d{1,3})?")
_BYTES = re.compile(r":[A-Za-z0-9+/=]*:")
MAX_FIELD = 4096
#: Directives whose value is delta-seconds; any other value type ignores the directive.
_INTEGER_DIRECTIVES = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})


class _Invalid(Exception):
    pass


class _Parser:
    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def ows(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def sp(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def key(self) -> str:
        m = _KEY.match(self.text, self.pos)
        if m is None:
            raise _Invalid
        self.pos = m.end()
        return m.group()

    def bare_item(self) -> object:
        c = self.peek()
        if c == '"':
            out = []
            self.pos += 1
            while True:
                if self.pos >= len(self.text):
                    raise _Invalid
                ch = self.text[self.pos]
                self.pos += 1
                if ch == "\\":
                    if self.peek() not in ('"', "\\"):
                        raise _Invalid
                    out.append(self.text[self.pos])
                    self.pos += 1
                elif ch == '"':
                    return "".join(out)
                elif not " " <= ch <= "~":
                    raise _Invalid
                else:
                    out.append(ch)
        if c == "?":
            value = self.text[self.pos + 1 : self.pos + 2]
            if value not in ("0", "1"):
                raise _Invalid
            self.pos += 2
            return value == "1"
        if c == ":":
            m = _BYTES.match(self.text, self.pos)
            if m is None:
                raise _Invalid
            self.pos = m.end()
            return m.group().encode()
        if c == "-" or c.isdigit():
            m = _NUMBER.match(self.text, self.pos)
            if m is None:
                raise _Invalid
            self.pos = m.end()
            if m.group(1):
                if len(m.group().split(".")[0].lstrip("-")) > 12:
                    raise _Invalid
                return float(m.group())
            return int(m.group())
        m = _TOKEN.match(self.text, self.pos)
        if m is None:
            raise _Invalid
        self.pos = m.end()
        return _Token(m.group())

    def parameters(self) -> None:
        while self.peek() == ";":
            self.pos += 1
            self.sp()
            self.key()
            if self.peek() == "=":
                self.pos += 1
                self.bare_item()

    def member(self) -> object:
        if self.peek() == "(":  # an inner list: never a valid directive value here
            self.pos += 1
            while True:
                self.sp()
                if self.peek() == ")":
                    self.pos += 1
                    break
                self.bare_item()
                self.parameters()
                if self.peek() not in (" ", ")"):
                    raise _Invalid
            self.parameters()
            return _Token("(inner list)")
        value = self.bare_item()
        self.parameters()
        return value


class _Token(str):
    """A token (not a string) in a Structured Field."""

    __slots__ = ()


def parse_targeted(value: str) -> dict[str, str | None] | None:
    """The field's directives in `parse_cache_control`'s form, or None: invalid, ignore it.

    Flags (``?1``) have no argument; integers are kept as their digits, negative ones
    and wrong types for delta-seconds directives are left out (RFC 9213 2.1).
    """
    if len(value) > MAX_FIELD:
        return None
    p = _Parser(value)
    out: dict[str, str | None] = {}
    try:
        p.sp()
        if p.pos == len(value):
            return out
        while True:
            name = p.key()
            item: object = True
            if p.peek() == "=":
                p.pos += 1
                item = p.member()
            else:
                p.parameters()
            out.pop(name, None)  # RFC 8941 3.2: a later duplicate overrides an earlier one
            if name in _INTEGER_DIRECTIVES:
                if type(item) is int and item >= 0:
                    out[name] = str(item)
            elif item is True:
                out[name] = None
            elif item is not False:
                out[name] = str(item)
            p.ows()
            if p.pos == len(value):
                return out
            if p.peek() != ",":
                raise _Invalid
            p.pos += 1
            p.ows()
            if p.pos == len(value):
                raise _Invalid  # a trailing comma
    except _Invalid:
        return None
