"""Hand-written wire codec of ``aotiserve.v1.RunRequest`` / ``RunResponse`` (the hot path).

grpcio hands the native ``Run`` handler the request's bytes; the generated
parser would copy every tensor's data into the message and again out of it.
:func:`parse_run_request` instead walks the bytes and keeps each tensor's data
as a ``memoryview`` slice of them (``tensor_codec.decode`` wraps it: no copy).
:func:`write_run_response` writes the response with one ``b"".join`` over the
field headers and a byte view of each output (one copy of the payload).

The fast parser handles the encodings a protobuf writer produces (known fields
with their own wire type, packed or unpacked shape, unknown fields of wire type
0/1/2/5, any order, repeats). Anything else it meets — a group, a known field
with another wire type, an over-long varint, truncated or invalid bytes — is
handed to the generated parser, which decides (and raises ``DecodeError`` on
what it refuses), so this accepts exactly what protobuf accepts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from aotiserve.client.wire import WireError
from aotiserve.client.wire import put_varint as _put_varint
from aotiserve.client.wire import read_varint as _varint
from aotiserve.v1 import model_runner_pb2 as pb

from . import tensor_codec as codec


class _Fallback(WireError):
    """The fast parser met an encoding it leaves to the generated parser."""


class WireTensor:
    """One ``Tensor`` of a request: ``data`` is a view of the received bytes."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: int, shape: list[int], data):
        self.dtype = dtype
        self.shape = shape
        self.data = data


class RunRequestView:
    """A parsed ``RunRequest`` (the fields servicers read: ``model``, ``inputs``)."""

    __slots__ = ("model", "inputs")

    def __init__(self, model: str, inputs: list[WireTensor]):
        self.model = model
        self.inputs = inputs


def _skip(buf: bytes, pos: int, end: int, wire_type: int) -> int:
    """Skips an unknown field's value; groups and bad wire types go to the fallback."""
    if wire_type == 0:
        return _varint(buf, pos, end)[1]
    if wire_type == 2:
        n, pos = _varint(buf, pos, end)
        pos += n
    elif wire_type == 1:
        pos += 8
    elif wire_type == 5:
        pos += 4
    else:
        raise _Fallback
    if pos > end:
        raise _Fallback
    return pos


def _tag(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    key, pos = _varint(buf, pos, end)
    if key >> 32 or key < 8:  # field number 0, or a key past 32 bits
        raise _Fallback
    return key >> 3, key & 7, pos


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def _tensor(buf: bytes, view: memoryview, pos: int, end: int) -> WireTensor:
    dtype = 0
    shape: list[int] = []
    data = view[0:0]
    while pos < end:
        field, wt, pos = _tag(buf, pos, end)
        if field == 1 and wt == 0:
            v, pos = _varint(buf, pos, end)
            dtype = _signed32(v)
        elif field == 2 and wt == 2:
            n, pos = _varint(buf, pos, end)
            stop = pos + n
            if stop > end:
                raise _Fallback
            while pos < stop:
                v, pos = _varint(buf, pos, stop)
                shape.append(_signed64(v))
        elif field == 2 and wt == 0:
            v, pos = _varint(buf, pos, end)
            shape.append(_signed64(v))
        elif field == 3 and wt == 2:
            n, pos = _varint(buf, pos, end)
            stop = pos + n
            if stop > end:
                raise _Fallback
            data = view[pos:stop]
            pos = stop
        elif field <= 3:
            raise _Fallback  # a known field with another wire type: protobuf decides
        else:
            pos = _skip(buf, pos, end, wt)
    if pos != end:
        raise _Fallback
    return WireTensor(dtype, shape, data)


def _fast(buf: bytes) -> RunRequestView:
    view = memoryview(buf)
    end = len(buf)
    pos = 0
    model = ""
    inputs: list[WireTensor] = []
    while pos < end:
        field, wt, pos = _tag(buf, pos, end)
        if field == 2 and wt == 2:
            n, pos = _varint(buf, pos, end)
            stop = pos + n
            if stop > end:
                raise _Fallback
            inputs.append(_tensor(buf, view, pos, stop))
            pos = stop
        elif field == 1 and wt == 2:
            n, pos = _varint(buf, pos, end)
            stop = pos + n
            if stop > end:
                raise _Fallback
            try:
                model = str(buf[pos:stop], "utf-8")
            except UnicodeDecodeError:
                raise _Fallback from None
            pos = stop
        elif field <= 2:
            raise _Fallback
        else:
            pos = _skip(buf, pos, end, wt)
    if pos != end:
        raise _Fallback
    return RunRequestView(model, inputs)


def _slow(buf: bytes) -> RunRequestView:
    """The generated parser (raises ``DecodeError`` on what protobuf refuses)."""
    request = pb.RunRequest.FromString(buf)
    return RunRequestView(request.model, [WireTensor(t.dtype, list(t.shape), t.data)
                                          for t in request.inputs])


# Below this size the generated (C) parser is faster and its copy costs nothing.
SMALL_REQUEST_BYTES = 16 * 1024


def parse_run_request(buf):
    """A ``RunRequest``'s wire bytes → ``.model`` and ``.inputs`` (each with ``dtype``,
    ``shape``, ``data``); a large request's tensor data are views of ``buf`` (no copy)."""
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    if len(buf) < SMALL_REQUEST_BYTES:
        return pb.RunRequest.FromString(buf)
    return parse_viewing(buf)


def parse_viewing(buf: bytes) -> RunRequestView:
    """The hand-written parse (tensor data are views of ``buf``), any size."""
    try:
        return _fast(buf)
    except WireError:  # _Fallback, or a malformed varint
        return _slow(buf)


# Writing ----------------------------------------------------------------------

def write_run_response(outputs: Sequence[torch.Tensor], wire_dtypes: Sequence[int],
                       weights_version: str) -> bytes:
    """``RunResponse`` bytes, as the generated serializer writes them, in one join.

    ``wire_dtypes[i]`` is the wire dtype of ``outputs[i]``.
    """
    parts: list = []
    append = parts.append
    for tensor, wire in zip(outputs, wire_dtypes):
        data = codec.byte_buffer(tensor)  # joins as its bytes
        size = len(data) if isinstance(data, bytes) else data.nbytes
        head = bytearray()
        if wire:
            head += b"\x08"
            head += _put_varint(wire)
        dims = tensor.shape
        if len(dims):
            packed = b"".join([_put_varint(d) for d in dims])
            head += b"\x12"
            head += _put_varint(len(packed))
            head += packed
        if size:
            head += b"\x1a"
            head += _put_varint(size)
        append(b"\x0a")
        append(_put_varint(len(head) + size))
        append(head)
        if size:
            append(data)
    if weights_version:
        text = weights_version.encode("utf-8")
        append(b"\x12")
        append(_put_varint(len(text)))
        append(text)
    return b"".join(parts)


def identity(data: bytes) -> bytes:
    """The response serializer of a handler that returns wire bytes."""
    return data
