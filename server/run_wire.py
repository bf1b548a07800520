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

Both count as they read (``wire.Bounds``: inputs, dimensions, other fields): a
request past a bound is refused (INVALID_ARGUMENT naming it) before anything is
kept for the entry past it, and before protobuf's parser, which builds an object
per entry, ever sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aotiserve.client import wire
from aotiserve.client.wire import put_varint as _put_varint
from aotiserve.v1 import model_runner_pb2 as pb

from . import tensor_codec as codec
from .errors import InvalidArgument

# RunRequest as check_bounds walks it: inputs (field 2), each a Tensor with a shape (2).
_SCHEMA = {2: wire.Rule("entries", {2: wire.Rule("dims")}, entries="inputs")}
_WHAT = "RunRequest"


class RunRequestView:
    """A parsed ``RunRequest`` (the fields servicers read: ``model``, ``inputs``)."""

    __slots__ = ("model", "inputs")

    def __init__(self, model: str, inputs: list[wire.TensorView]):
        self.model = model
        self.inputs = inputs


def _fast(buf: bytes, bounds: wire.Bounds) -> RunRequestView:
    model, inputs = wire.read_text_and_tensors(
        buf, text_field=1, tensor_field=2, bounds=bounds, what=_WHAT, entry="input"
    )
    return RunRequestView(model, inputs)


def _slow(buf: bytes) -> RunRequestView:
    """The generated parser (raises ``DecodeError`` on what protobuf refuses)."""
    request = pb.RunRequest.FromString(buf)
    return RunRequestView(
        request.model, [wire.TensorView(t.dtype, list(t.shape), t.data) for t in request.inputs]
    )


SMALL_REQUEST_BYTES = wire.VIEWING_MIN_BYTES


def parse_run_request(buf, bounds: wire.Bounds = wire.UNBOUNDED):
    """A ``RunRequest``'s wire bytes → ``.model`` and ``.inputs`` (each with ``dtype``,
    ``shape``, ``data``); a large request's tensor data are views of ``buf`` (no copy).
    Past ``bounds``: ``InvalidArgument`` naming what."""
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    if len(buf) >= SMALL_REQUEST_BYTES:
        return parse_viewing(buf, bounds)
    # Small: protobuf's parser is faster, and so few bytes bound what it builds (each
    # shape is checked as its tensor is decoded).
    request = pb.RunRequest.FromString(buf)
    if len(request.inputs) > bounds.max_entries:
        raise InvalidArgument(str(bounds.too_many(_WHAT, "inputs")))
    return request


def parse_viewing(buf: bytes, bounds: wire.Bounds = wire.UNBOUNDED) -> RunRequestView:
    """The hand-written parse (tensor data are views of ``buf``), any size."""
    try:
        try:
            return _fast(buf, bounds)
        except wire.WireError:  # Fallback, or a malformed varint: protobuf decides
            wire.check_bounds(buf, _SCHEMA, bounds, _WHAT)
            return _slow(buf)
    except wire.BoundError as exc:
        raise InvalidArgument(str(exc)) from None


# Writing ----------------------------------------------------------------------


def write_run_response(
    outputs: Sequence[torch.Tensor], wire_dtypes: Sequence[int], weights_version: str
) -> bytes:
    """``RunResponse`` bytes, as the generated serializer writes them, in one join.

    ``wire_dtypes[i]`` is the wire dtype of ``outputs[i]``.
    """
    parts: list = []
    append = parts.append
    for tensor, wire_dtype in zip(outputs, wire_dtypes):
        data = codec.byte_buffer(tensor)  # joins as its bytes
        size = len(data) if isinstance(data, bytes) else data.nbytes
        head = bytearray()
        if wire_dtype:
            head += b"\x08"
            head += _put_varint(wire_dtype)
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
