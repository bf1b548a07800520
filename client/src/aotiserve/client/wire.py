"""Protobuf wire-format primitives: the one varint reader and writer, the walk
over a ``Tensor`` message that keeps its data as a view, and the bounds every
walk checks.

The client writes tensors and health requests by hand and reads large Run
responses by hand; the server parses Run requests and weight-upload chunks by
hand (zero-copy); all of them share these helpers. Plain Python, no torch.

Bounds. protobuf's parser builds one object per repeated entry (a 64 MiB message
of empty entries is 32 million of them) and only then can anyone count them.
Every walk here counts as it goes and stops at the first entry, dimension or
field past its :class:`Bounds` (:class:`BoundError`), keeping nothing for it;
messages the walk leaves to protobuf are first checked by :func:`check_bounds`,
a walk over the same bytes that keeps nothing at all.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass

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


def len_prefix(field: int, size: int) -> bytes:
    """The tag and length of a length-delimited field of ``size`` bytes."""
    return key(field, 2) + put_varint(size)


def text(field: int, value: str) -> bytes:
    """A string field (nothing for "", as protobuf writes it)."""
    raw = value.encode()
    return len_prefix(field, len(raw)) + raw if raw else b""


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


class BoundError(ValueError):
    """A message past one of its bounds (too many entries, dimensions or fields, or a
    dimension too large). Not a :class:`WireError`: such a message is refused as it
    is, never handed to protobuf."""


@dataclass(frozen=True)
class Bounds:
    """How much one message may hold; each walk counts as it reads."""

    #: Entries of one repeated field of tensors or parameters (a request's inputs).
    max_entries: int = 64
    #: Dimensions of one shape.
    max_rank: int = 16
    #: The largest single dimension.
    max_dim: int = 1 << 31
    #: Fields of one message besides those (names, ids, repeats, unknown fields).
    max_fields: int = 64
    #: Declared constants of one weight-upload header.
    max_constants: int = 1 << 16
    #: The settings behind the bounds, named in errors.
    settings: Mapping[str, str] | None = None

    def _setting(self, bound: str) -> str:
        name = (self.settings or {}).get(bound)
        return f" ({name})" if name else ""

    def too_many(self, what: str, entries: str, bound: str = "max_entries") -> BoundError:
        return BoundError(
            f"{what} has more than {getattr(self, bound)} {entries}, the "
            f"limit{self._setting(bound)}"
        )

    def too_many_dims(self, where: str) -> BoundError:
        return BoundError(
            f"{where}: rank exceeds the limit of {self.max_rank}{self._setting('max_rank')}"
        )

    def dim_too_large(self, where: str, index: int, value: int) -> BoundError:
        return BoundError(
            f"{where}: dimension {index} of its shape is {value}, above the "
            f"limit of {self.max_dim}{self._setting('max_dim')}"
        )

    def too_many_fields(self, what: str) -> BoundError:
        return BoundError(
            f"{what} has more than {self.max_fields} fields besides its "
            "bounded repeated entries (repeated or unknown fields), the limit"
        )


DEFAULT_BOUNDS = Bounds()
#: No bounds: exactly what protobuf accepts.
UNBOUNDED = Bounds(
    max_entries=sys.maxsize,
    max_rank=sys.maxsize,
    max_dim=sys.maxsize,
    max_fields=sys.maxsize,
    max_constants=sys.maxsize,
)


class TensorView:
    """One parsed ``Tensor`` message: ``data`` is a view of the received bytes."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: int, shape: list[int], data):
        self.dtype = dtype
        self.shape = shape
        self.data = data


def _bad_dim(shape: list, v: int, bounds: Bounds, where) -> BoundError | None:
    """The error for dimension ``v`` (signed) following ``shape``, if it passes a bound."""
    if len(shape) >= bounds.max_rank:
        return bounds.too_many_dims(_label(where))
    if v > bounds.max_dim:
        return bounds.dim_too_large(_label(where), len(shape), v)
    return None


def _label(where) -> str:
    """``where`` is a name, or (entry, index): formatted only for an error."""
    return where if isinstance(where, str) else f"{where[0]} {where[1]}"


def read_tensor(
    buf,
    view: memoryview,
    pos: int,
    end: int,
    bounds: Bounds = DEFAULT_BOUNDS,
    where: str | tuple[str, int] = "tensor",
) -> TensorView:
    """The ``Tensor`` message in ``buf[pos:end]`` (``view`` is ``memoryview(buf)``);
    ``where`` names it in errors (a name, or (entry, index))."""
    dtype = 0
    shape: list[int] = []
    data = view[0:0]
    fields = 0
    max_rank, max_dim = bounds.max_rank, bounds.max_dim
    while pos < end:
        field, wt, pos = read_tag(buf, pos, end)
        if field == 2 and (wt == 2 or wt == 0):
            if wt == 2:
                pos, stop = read_length(buf, pos, end)
            else:
                stop = end
            while pos < stop:
                v, pos = read_varint(buf, pos, stop)
                v = signed64(v)
                if len(shape) >= max_rank or v > max_dim:
                    raise _bad_dim(shape, v, bounds, where)
                shape.append(v)
                if wt == 0:
                    break
            continue
        fields += 1
        if fields > bounds.max_fields:
            raise bounds.too_many_fields(_label(where))
        if field == 1 and wt == 0:
            v, pos = read_varint(buf, pos, end)
            dtype = signed32(v)
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


def read_text_and_tensors(
    buf,
    text_field: int,
    tensor_field: int,
    bounds: Bounds = DEFAULT_BOUNDS,
    what: str = "the message",
    entry: str = "tensor",
) -> tuple[str, list[TensorView]]:
    """A message of one string field and one repeated ``Tensor`` field (``RunRequest``:
    model = 1, inputs = 2; ``RunResponse``: outputs = 1, weights_version = 2), the tensors'
    data views of ``buf``. Other fields are skipped. ``what`` names the message and
    ``entry`` one tensor in errors (``BoundError``)."""
    view = memoryview(buf)
    pos, end = 0, len(buf)
    text = ""
    tensors: list[TensorView] = []
    fields = 0
    while pos < end:
        field, wt, pos = read_tag(buf, pos, end)
        if field == tensor_field and wt == 2:
            if len(tensors) >= bounds.max_entries:
                raise bounds.too_many(what, f"{entry}s")
            start, pos = read_length(buf, pos, end)
            tensors.append(read_tensor(buf, view, start, pos, bounds, (entry, len(tensors))))
            continue
        fields += 1
        if fields > bounds.max_fields:
            raise bounds.too_many_fields(what)
        if field == text_field and wt == 2:
            start, pos = read_length(buf, pos, end)
            text = utf8(buf, start, pos)
        elif field in (text_field, tensor_field):
            raise Fallback  # a known field with another wire type: protobuf decides
        else:
            pos = skip_field(buf, pos, end, wt)
    return text, tensors


# Bounds of messages protobuf parses -------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How :func:`check_bounds` treats one field of a message.

    ``kind``: ``"entries"``, a repeated field whose occurrences count against the
    bound named ``bound`` (and, with ``message``, each is walked as that message);
    ``"dims"``, a repeated int64 shape (packed or not) within ``max_rank`` and
    ``max_dim``; ``"merged"``, a singular message (protobuf merges its occurrences,
    so they share their counts), walked as ``message``; ``"name"``, a string naming
    its message in errors. ``entries`` names the field's entries (plural).
    """

    kind: str
    message: Mapping[int, Rule] | None = None
    entries: str = ""
    bound: str = "max_entries"


_MAX_GROUP_DEPTH = 100  # protobuf's own recursion limit


def check_bounds(buf, schema: Mapping[int, Rule], bounds: Bounds, what: str) -> None:
    """Raises :class:`BoundError` if ``buf``, read as protobuf reads it, holds more than
    ``bounds`` allow where ``schema`` says; keeps nothing per entry. Fields the schema
    does not name (unknown fields and groups included) count against ``max_fields``.
    Stops quietly at the first bytes protobuf refuses: its parser stops there too,
    having built only what came before."""
    with contextlib.suppress(WireError):
        _scan(buf, 0, len(buf), schema, bounds, what, {})


def _scan(
    buf, pos: int, end: int, schema: Mapping[int, Rule], bounds: Bounds, where: str, counts: dict
) -> None:
    """Walks one message in ``buf[pos:end]``; ``counts`` are its counts so far (shared
    by the occurrences of a merged message)."""
    name = ""
    while pos < end:
        field, wt, pos = _key(buf, pos, end)
        rule = schema.get(field)
        kind = rule.kind if rule is not None else ""
        if kind == "dims" and wt in (0, 2):
            n = counts.get(field, 0)
            if wt == 0:
                start, stop = pos, end
            else:
                start, stop = read_length(buf, pos, end)
            pos = start
            while pos < stop:
                v, pos = read_varint(buf, pos, stop)
                if n >= bounds.max_rank:
                    raise bounds.too_many_dims(_named(where, name))
                d = signed64(v)
                if d > bounds.max_dim:
                    raise bounds.dim_too_large(_named(where, name), n, d)
                n += 1
                if wt == 0:
                    break
            counts[field] = n
            continue
        if kind == "entries":
            n = counts.get(field, 0)
            if n >= getattr(bounds, rule.bound):
                raise bounds.too_many(_named(where, name), rule.entries, rule.bound)
            counts[field] = n + 1
            if rule.message is not None and wt == 2:
                start, pos = read_length(buf, pos, end)
                entry = f"{rule.entries.removesuffix('s')} {n}"
                _scan(buf, start, pos, rule.message, bounds, entry, {})
            else:
                pos = _skip(buf, pos, end, field, wt, counts, bounds, where)
            continue
        _count_field(counts, bounds, _named(where, name))
        if kind == "merged" and wt == 2:
            start, pos = read_length(buf, pos, end)
            _scan(buf, start, pos, rule.message, bounds, where, counts.setdefault(field, {}))
        elif kind == "name" and wt == 2:
            start, pos = read_length(buf, pos, end)
            name = str(buf[start : min(pos, start + 64)], "utf-8", "replace")
        else:
            pos = _skip(buf, pos, end, field, wt, counts, bounds, where)


def _key(buf, pos: int, end: int) -> tuple[int, int, int]:
    key, pos = read_varint(buf, pos, end)
    if key >> 32 or key < 8 or key & 7 in (6, 7):
        raise Fallback  # protobuf refuses the message here
    return key >> 3, key & 7, pos


def _count_field(counts: dict, bounds: Bounds, where: str) -> None:
    n = counts.get(None, 0) + 1
    if n > bounds.max_fields:
        raise bounds.too_many_fields(where)
    counts[None] = n


def _named(where: str, name: str) -> str:
    return f"{where} ({name!r})" if name else where


def _skip(
    buf, pos: int, end: int, field: int, wt: int, counts: dict, bounds: Bounds, where: str
) -> int:
    """The position after a field's value; a group's fields count as fields of the
    message (protobuf keeps an unknown group's bytes)."""
    if wt != 3:
        return skip_field(buf, pos, end, wt)
    open_groups = [field]
    while open_groups:
        if len(open_groups) > _MAX_GROUP_DEPTH:
            raise Fallback
        inner, inner_wt, pos = _key(buf, pos, end)
        if inner_wt == 4:
            if inner != open_groups.pop():
                raise Fallback
            continue
        _count_field(counts, bounds, where)
        if inner_wt == 3:
            open_groups.append(inner)
        else:
            pos = skip_field(buf, pos, end, inner_wt)
    return pos
