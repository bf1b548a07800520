"""Protobuf wire-format primitives: the one varint reader and writer.

The client writes tensors and health requests by hand, and the server parses
Run requests and weight-upload chunks by hand (zero-copy); all of them share
these helpers. Plain Python, no torch.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
_SMALL = tuple(bytes((i,)) for i in range(0x80))


class WireError(ValueError):
    """Bytes that are not a well-formed varint (truncated, or over 10 bytes)."""


def put_varint(n: int) -> bytes:
    """The varint bytes of ``n``; negatives as int64 two's complement, as protobuf does."""
    if 0 <= n < 0x80:
        return _SMALL[n]
    n &= MASK64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    """A field's tag bytes."""
    return put_varint(field << 3 | wire_type)


def read_varint(buf, pos: int, end: int | None = None) -> tuple[int, int]:
    """(unsigned 64-bit value, next position) of the varint at ``pos`` in ``buf[:end]``."""
    if end is None:
        end = len(buf)
    if pos >= end:
        raise WireError("truncated varint")
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result = b & 0x7F
    shift = 7
    pos += 1
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint" if pos >= end else "varint longer than 10 bytes")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & MASK64, pos
        shift += 7
