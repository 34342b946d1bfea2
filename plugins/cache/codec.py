"""What a value looks like in Redis: a small frame, a serializer, optional compression.

Frame: ``b"ODC"`` + version byte + flags byte + 8-byte big-endian expiry (epoch
seconds as a double, 0 for none) + payload. Flags: low nibble the serializer
(0 bytes as they are, 1 JSON, 2 msgpack, 3 the HTTP response format), high
nibble the compression (0 none, 1 zlib, 2 zstd). Anything else under our key
(another program's value, garbage, a truncated or bomb-sized frame) raises
`CorruptEntry`, which the cache counts and treats as a miss. Nothing read back
is ever unpickled or executed.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Protocol

__all__ = [
    "CorruptEntry",
    "JSONSerializer",
    "MsgpackSerializer",
    "Serializer",
    "decode_frame",
    "encode_frame",
    "serializer_for",
]

MAGIC = b"ODC\x01"
_HEAD = struct.Struct(">4sBd")  # magic+version, flags, expires_at
RAW, JSON, MSGPACK, HTTP = 0, 1, 2, 3
NONE, ZLIB, ZSTD = 0, 1, 2

_zstd: Any
try:  # zstd: faster and smaller than zlib; zlib (stdlib) when it is not installed
    import zstandard as _zstd
except ImportError:  # pragma: no cover - the redis extra installs it
    _zstd = None


class CorruptEntry(ValueError):
    """A value under our key that is not a frame we wrote (or is damaged)."""


class Serializer(Protocol):
    code: int

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JSONSerializer:
    code = JSON

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackSerializer:
    code = MSGPACK

    def __init__(self) -> None:
        import msgpack

        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb

    def dumps(self, value: Any) -> bytes:
        return bytes(self._packb(value, use_bin_type=True))

    def loads(self, data: bytes) -> Any:
        # strict_map_key=False: dict keys may be ints; no ext types are registered.
        return self._unpackb(data, raw=False, strict_map_key=False)


def serializer_for(name: str) -> Serializer:
    return MsgpackSerializer() if name == "msgpack" else JSONSerializer()


def compressor_for(name: str) -> int:
    if name == "zlib" or _zstd is None:
        return ZLIB
    return ZSTD


def encode_frame(
    payload: bytes,
    code: int,
    expires_at: float,
    *,
    compression: int = NONE,
    threshold: int = 1024,
) -> bytes:
    """Frame `payload`; compress it when asked, over `threshold` bytes and when it pays."""
    method = NONE
    if compression != NONE and len(payload) > threshold:
        packed = (
            _zstd.ZstdCompressor(level=3).compress(payload)
            if compression == ZSTD and _zstd is not None
            else zlib.compress(payload, 6)
        )
        if len(packed) < len(payload) * 0.9:
            payload = packed
            method = ZSTD if compression == ZSTD and _zstd is not None else ZLIB
    return _HEAD.pack(MAGIC, code | (method << 4), expires_at) + payload


def decode_frame(data: bytes, max_bytes: int) -> tuple[int, float, bytes]:
    """(serializer code, expires_at, payload) of a frame, or `CorruptEntry`."""
    if not isinstance(data, bytes) or len(data) < _HEAD.size:
        raise CorruptEntry("too short for a frame")
    magic, flags, expires_at = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CorruptEntry("not an Overdrive cache frame")
    code, method = flags & 0x0F, flags >> 4
    if code > HTTP or expires_at != expires_at or expires_at < 0:  # NaN or negative
        raise CorruptEntry(f"bad frame header (flags {flags:#x})")
    payload = data[_HEAD.size :]
    try:
        if method == ZLIB:
            d = zlib.decompressobj()
            payload = d.decompress(payload, max_bytes)
            if d.unconsumed_tail or not d.eof:
                raise CorruptEntry("zlib payload truncated or over max_value_bytes")
        elif method == ZSTD:
            if _zstd is None:  # pragma: no cover
                raise CorruptEntry("zstd payload but zstandard is not installed")
            reader = _zstd.ZstdDecompressor().stream_reader(payload)
            parts, total = [], 0
            while chunk := reader.read(1 << 20):  # bounded reads: no bomb is expanded
                total += len(chunk)
                if total > max_bytes:
                    raise CorruptEntry("zstd payload over max_value_bytes")
                parts.append(chunk)
            payload = b"".join(parts)
        elif method != NONE:
            raise CorruptEntry(f"unknown compression {method}")
    except CorruptEntry:
        raise
    except Exception as exc:
        raise CorruptEntry(f"payload does not decompress: {exc}") from None
    return code, expires_at, payload
