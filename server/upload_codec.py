"""Zero-copy decoding of ``UpdateConstantBuffer`` chunk messages.

protobuf copies a chunk's payload twice on the way in (into the parsed message,
then into a new ``bytes`` on ``chunk.data``); at weights sizes those copies cost
more than writing the bytes into the staging buffer. :func:`decode_update_request`
reads a chunk message straight off the wire and hands out ``data`` as a memoryview
of the received bytes. Anything it does not fully recognise (the header, a field
it does not expect, a repeated field, a malformed message) goes to protobuf, so
what is accepted and what is refused stays exactly protobuf's, once
``wire.check_bounds`` found it within its bounds (declared constants, dimensions,
fields): past them, INVALID_ARGUMENT before protobuf builds anything.
"""

from __future__ import annotations

from aotiserve.client import wire
from aotiserve.client.wire import read_varint
from aotiserve.v1 import model_runner_pb2 as pb

from .errors import InvalidArgument

# Wire tags (field number << 3 | wire type).
_CHUNK = 2 << 3 | 2  # UpdateConstantBufferRequest.chunk
_NAME = 1 << 3 | 2  # ConstantChunk.name
_OFFSET = 2 << 3 | 0  # ConstantChunk.offset
_DATA = 3 << 3 | 2  # ConstantChunk.data

# UpdateConstantBufferRequest as wire.check_bounds walks it: the header's declared
# constants (TensorSpec, shape = 3) and a chunk's shape (5); header and chunk are
# singular, so protobuf merges their repeats.
_SPEC = {3: wire.Rule("dims")}
_SCHEMA = {
    1: wire.Rule(
        "merged",
        {5: wire.Rule("entries", _SPEC, entries="declared constants", bound="max_constants")},
    ),
    2: wire.Rule("merged", {5: wire.Rule("dims")}),
}


class ChunkView:
    """A ``ConstantChunk`` whose ``data`` is a read-only view of the received bytes."""

    __slots__ = ("name", "offset", "data")

    def __init__(self, name: str, offset: int, data: memoryview):
        self.name, self.offset, self.data = name, offset, data


class ChunkRequest:
    """Stands for ``UpdateConstantBufferRequest(chunk=...)`` where the servicer reads it."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: ChunkView):
        self.chunk = chunk

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 (protobuf's name)
        return "chunk" if group == "part" else None


_varint = read_varint


def _fast_chunk(raw: bytes) -> ChunkRequest | None:
    if not raw or raw[0] != _CHUNK:
        return None
    size, pos = _varint(raw, 1)
    if pos + size != len(raw):  # more than one field, or truncated: protobuf decides
        return None
    name, offset, data = "", 0, None
    seen = set()
    view = memoryview(raw)
    while pos < len(raw):
        tag = raw[pos]  # our tags are one byte; any other encoding: protobuf decides
        pos += 1
        if tag in seen or tag not in (_NAME, _OFFSET, _DATA):
            return None
        seen.add(tag)
        if tag == _OFFSET:
            offset, pos = _varint(raw, pos)
            offset &= (1 << 64) - 1  # protobuf keeps the low 64 bits of a longer varint
            if offset >= 1 << 63:  # int64 on the wire: two's complement
                offset -= 1 << 64
            continue
        n, pos = _varint(raw, pos)
        end = pos + n
        if end > len(raw):
            return None
        if tag == _NAME:
            name = str(view[pos:end], "utf-8")  # UnicodeDecodeError: the caller falls back
        else:
            data = view[pos:end]
        pos = end
    return ChunkRequest(ChunkView(name, offset, data if data is not None else view[0:0]))


def decode_update_request(
    raw: bytes, bounds: wire.Bounds = wire.UNBOUNDED
) -> pb.UpdateConstantBufferRequest | ChunkRequest:
    """One ``UpdateConstantBufferRequest`` off the wire; chunks without a payload copy.
    Past ``bounds``: ``InvalidArgument`` naming what."""
    try:
        fast = _fast_chunk(raw)
    except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        fast = None
    if fast is not None:
        return fast
    try:
        wire.check_bounds(raw, _SCHEMA, bounds, "UpdateConstantBufferRequest")
    except wire.BoundError as exc:
        raise InvalidArgument(str(exc)) from None
    return pb.UpdateConstantBufferRequest.FromString(raw)
