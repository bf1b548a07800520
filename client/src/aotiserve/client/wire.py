"""Protobuf wire-format primitives: the one varint reader and writer, and the
walk over a ``Tensor`` message that keeps its data as a view.

The client writes tensors and health requests by hand and reads large Run
responses by hand; the server parses Run requests and weight-upload chunks by
hand (zero-copy); all of them share these helpers. Plain Python, no torch.
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


#: Below this size protobuf's own (C) parser is faster than walking the bytes
#: here, and the copy of the data it makes costs nothing.
VIEWING_MIN_BYTES = 16 * 1024


class Fallback(WireError):
    """An encoding the hand-written parsers leave to protobuf's parser, which decides."""


def read_tag(buf, pos: int, end: int) -> tuple[int, int, int]:
    """(field number, wire type, next position) of the key at ``pos``."""
    k, pos = read_varint(buf, pos, end)
    if k >> 32 or k < 8:  # field number 0, or a key past 32 bits
        raise Fallback
    return k >> 3, k & 7, pos


def read_length(buf, pos: int, end: int) -> tuple[int, int]:
    """(start, stop) of the length-delimited value at ``pos``."""
    n, pos = read_varint(buf, pos, end)
    if pos + n > end:
        raise Fallback
    return pos, pos + n


def skip_field(buf, pos: int, end: int, wire_type: int) -> int:
    """The position after an unknown field's value; groups and bad wire types fall back."""
    if wire_type == 0:
        return read_varint(buf, pos, end)[1]
    if wire_type == 2:
        return read_length(buf, pos, end)[1]
    if wire_type == 1:
        pos += 8
    elif wire_type == 5:
        pos += 4
    else:
        raise Fallback
    if pos > end:
        raise Fallback
    return pos


def signed64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def utf8(buf, start: int, stop: int) -> str:
    try:
        return str(buf[start:stop], "utf-8")
    except UnicodeDecodeError:
        raise Fallback from None


class TensorView:
    """One parsed ``Tensor`` message: ``data`` is a view of the received bytes."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: int, shape: list[int], data):
        self.dtype = dtype
        self.shape = shape
        self.data = data


def read_tensor(buf, view: memoryview, pos: int, end: int) -> TensorView:
    """The ``Tensor`` message in ``buf[pos:end]`` (``view`` is ``memoryview(buf)``)."""
    dtype = 0
    shape: list[int] = []
    data = view[0:0]
    while pos < end:
        field, wt, pos = read_tag(buf, pos, end)
        if field == 1 and wt == 0:
            v, pos = read_varint(buf, pos, end)
            dtype = signed32(v)
        elif field == 2 and wt == 2:
            pos, stop = read_length(buf, pos, end)
            while pos < stop:
                v, pos = read_varint(buf, pos, stop)
                shape.append(signed64(v))
        elif field == 2 and wt == 0:
            v, pos = read_varint(buf, pos, end)
            shape.append(signed64(v))
        elif field == 3 and wt == 2:
            start, pos = read_length(buf, pos, end)
            data = view[start:pos]
        elif field <= 3:
            raise Fallback  # a known field with another wire type: protobuf decides
        else:
            pos = skip_field(buf, pos, end, wt)
    if pos != end:
        raise Fallback
    return TensorView(dtype, shape, data)


def read_text_and_tensors(buf, text_field: int, tensor_field: int) -> tuple[str, list[TensorView]]:
    """A message of one string field and one repeated ``Tensor`` field (``RunRequest``:
    model = 1, inputs = 2; ``RunResponse``: outputs = 1, weights_version = 2), the tensors'
    data views of ``buf``. Other fields are skipped."""
    view = memoryview(buf)
    pos, end = 0, len(buf)
    text = ""
    tensors: list[TensorView] = []
    while pos < end:
        field, wt, pos = read_tag(buf, pos, end)
        if field == tensor_field and wt == 2:
            start, pos = read_length(buf, pos, end)
            tensors.append(read_tensor(buf, view, start, pos))
        elif field == text_field and wt == 2:
            start, pos = read_length(buf, pos, end)
            text = utf8(buf, start, pos)
        elif field in (text_field, tensor_field):
            raise Fallback  # a known field with another wire type: protobuf decides
        else:
            pos = skip_field(buf, pos, end, wt)
    return text, tensors
