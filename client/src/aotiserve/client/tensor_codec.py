"""Tensors <-> wire bytes, for numpy arrays and torch tensors alike.

Encoding writes the protobuf wire format of the big messages (``RunRequest``
and upload chunks) by hand: one ``b"".join`` over a memoryview of each array
is the only copy. Going through protobuf objects costs three (``tobytes``,
the assignment into the message, serialization): 0.48 s against 0.11 s for a
64 MiB tensor on the 2-core dev machine, byte-identical output. The
hand-written bytes are plain proto3 that the generated parser reads back
(tests check it field for field).

Decoding uses ``numpy.frombuffer`` / ``torch.frombuffer`` on the received bytes,
so outputs are not copied again: a large ``RunResponse`` is read by hand
(:func:`parse_run_response`), its outputs views of the bytes grpc handed over,
where protobuf's parser would copy each output's data into the message. numpy
outputs decoded that way are read-only views (``numpy.array(x)`` makes a
writable copy); torch tensors are writable.

torch is never imported here unless a torch tensor is passed in or torch
outputs are asked for; bfloat16 and float8 values need torch (numpy has no
such dtypes).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from aotiserve.client import wire
from aotiserve.client.dtypes import BY_NUMPY_NAME, BY_TORCH_NAME, BY_WIRE, DType
from aotiserve.client.wire import key, put_varint
from aotiserve.v1 import model_runner_pb2 as pb

OutputFormat = Literal["auto", "numpy", "torch"]

#: Upload chunk payload size: large enough that per-message overhead (a gRPC
#: message and a server-side write each) is noise, far below any message-size
#: limit. bench/weights.py, 1 GiB on 2 cores: 4 MiB stages at 1.05-1.10 GB/s,
#: 1 MiB at 0.73-0.83.
DEFAULT_CHUNK_BYTES = 4 << 20

_LITTLE = np.dtype("<u2").isnative


# ---------------------------------------------------------------- torch, lazily


def torch_available() -> bool:
    """True when torch can be imported (without importing it)."""
    if "torch" in sys.modules:  # imported, or blocked (None)
        return sys.modules["torch"] is not None
    return importlib.util.find_spec("torch") is not None


def _torch():
    import torch

    return torch


def is_torch_tensor(value: Any) -> bool:
    # Checked without importing torch: a tensor can only exist if torch is loaded.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def resolve_format(fmt: OutputFormat) -> Literal["numpy", "torch"]:
    if fmt == "auto":
        return "torch" if torch_available() else "numpy"
    if fmt not in ("numpy", "torch"):
        raise ValueError(f"output format must be 'auto', 'numpy' or 'torch', not {fmt!r}")
    return fmt


# ---------------------------------------------------------------- encoding


class WireTensor(NamedTuple):
    """A tensor ready for the wire: dtype, shape and its C-contiguous little-endian bytes."""

    dtype: DType
    shape: tuple[int, ...]
    data: memoryview  # format "B", contiguous

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


# Lookups by dtype object: ``numpy.dtype.name`` alone costs more than the
# rest of encoding a small tensor.
_BY_NUMPY_DTYPE = {np.dtype(d.numpy_name).newbyteorder("<"): d for d in BY_NUMPY_NAME.values()}
_NUMPY_DTYPE_BY_WIRE = {
    d.wire: np.dtype(d.numpy_name).newbyteorder("<") for d in BY_NUMPY_NAME.values()
}
_torch_dtypes: dict = {}  # torch.dtype -> DType, filled when torch is first used


def _bytes_of(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    if array.size == 0:
        return memoryview(b"")
    return memoryview(array).cast("B")


def _plain_wire(value: Any) -> WireTensor | None:
    """The common case of :func:`to_wire` in the fewest steps (a non-empty C-contiguous
    numpy array of a supported dtype in native order); None for anything else."""
    if type(value) is np.ndarray and value.flags.c_contiguous and value.size:
        dtype = _BY_NUMPY_DTYPE.get(value.dtype)
        if dtype is not None:
            return WireTensor(dtype, value.shape, memoryview(value).cast("B"))
    return None


def to_wire(value: Any, what: str = "tensor") -> WireTensor:
    """A numpy array, torch tensor or array-like as a :class:`WireTensor`.

    Copies only when it must: non-contiguous or big-endian numpy arrays,
    non-contiguous or non-CPU torch tensors.
    """
    plain = _plain_wire(value)
    if plain is not None:
        return plain
    if is_torch_tensor(value):
        return _torch_to_wire(value, what)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what}: expected an array or tensor, got {type(value).__name__}")
    array = np.asarray(value)
    dtype = _BY_NUMPY_DTYPE.get(array.dtype)
    if dtype is None:
        if array.dtype.byteorder == ">" and array.dtype.newbyteorder("<") in _BY_NUMPY_DTYPE:
            array = array.astype(array.dtype.newbyteorder("<"))
            dtype = _BY_NUMPY_DTYPE[array.dtype]
        else:
            raise TypeError(
                f"{what}: numpy dtype {array.dtype} is not supported (supported: "
                f"{', '.join(sorted(BY_NUMPY_NAME))}; bfloat16/float8 need torch tensors)"
            )
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # (np.ascontiguousarray would make scalars 1-d)
    return WireTensor(dtype, array.shape, _bytes_of(array))


def _torch_to_wire(tensor, what: str) -> WireTensor:
    torch = _torch()
    if not _torch_dtypes:
        _torch_dtypes.update(
            {
                getattr(torch, d.torch_name): d
                for d in BY_TORCH_NAME.values()
                if hasattr(torch, d.torch_name)
            }
        )
    dtype = _torch_dtypes.get(tensor.dtype)
    if dtype is None:
        raise TypeError(f"{what}: torch dtype {tensor.dtype} is not supported")
    if tensor.device.type == "meta":
        raise TypeError(f"{what}: a tensor on the meta device holds no values to send")
    if tensor.layout != torch.strided:
        raise TypeError(f"{what}: only dense (strided) tensors are supported, not {tensor.layout}")
    if not _LITTLE:  # pragma: no cover - every platform torch ships for is little-endian
        raise TypeError("sending torch tensors needs a little-endian host")
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    if dtype.numpy_name is not None:
        return WireTensor(dtype, tuple(tensor.shape), _bytes_of(tensor.numpy()))
    # bfloat16 / float8: numpy has no such dtype, so view the bytes as uint8.
    flat = tensor.reshape(-1).view(torch.uint8)
    return WireTensor(dtype, tuple(tensor.shape), _bytes_of(flat.numpy()))


# Minimal protobuf wire format writer: exactly what the messages below need.

_varint = put_varint
_key = key


_len_prefix = wire.len_prefix
_string = wire.text


_DTYPE_FIELD = {w: _key(1, 0) + _varint(w) for w in BY_WIRE}


def _tensor_parts(t: WireTensor) -> tuple[list, int]:
    """The encoded ``Tensor`` message as a list of parts, and its length."""
    head = _DTYPE_FIELD[t.dtype.wire]
    if t.shape:
        shape = t.shape
        packed = bytes(shape) if max(shape) < 0x80 else b"".join(_varint(d) for d in shape)
        head += _len_prefix(2, len(packed)) + packed
    if not t.nbytes:
        return [head], len(head)
    head += _len_prefix(3, t.nbytes)
    return [head, t.data], len(head) + t.nbytes


#: Below this many input bytes, ``run_request`` builds a protobuf message: protobuf's C
#: encoder takes a small request in fewer steps than the hand-made framing, whose point (no
#: copy of the tensors' bytes) matters only for large ones.
SMALL_REQUEST_BYTES = 16 << 10


def _wire_inputs(inputs: Sequence[Any]) -> list[WireTensor]:
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(
            "inputs must be a list or tuple of arrays/tensors, in the model's input order"
        )
    return [to_wire(v, f"input {i}") for i, v in enumerate(inputs)]


def _framed_run_request(model: str, tensors: Sequence[WireTensor]) -> bytes:
    parts: list = [_string(1, model)]
    for t in tensors:
        tensor_parts, size = _tensor_parts(t)
        parts.append(_len_prefix(2, size))
        parts.extend(tensor_parts)
    return b"".join(parts)


def encode_run_request(model: str, inputs: Sequence[Any]) -> bytes:
    """Wire bytes of ``RunRequest(model, inputs)``, viewing the tensors' bytes (no copy
    until gRPC's own)."""
    return _framed_run_request(model, _wire_inputs(inputs))


def run_request(model: str, inputs: Sequence[Any]) -> pb.RunRequest | bytes:
    """``RunRequest(model, inputs)`` as the Run stub sends it (its serializer takes both):
    a message when the inputs hold fewer than :data:`SMALL_REQUEST_BYTES`, else the
    framed bytes of :func:`encode_run_request`."""
    tensors = _wire_inputs(inputs)
    if sum(t.nbytes for t in tensors) >= SMALL_REQUEST_BYTES:
        return _framed_run_request(model, tensors)
    return pb.RunRequest(
        model=model,
        inputs=[
            pb.Tensor(dtype=t.dtype.wire, shape=t.shape, data=t.data.tobytes()) for t in tensors
        ],
    )


def encode_chunk_request(name: str, offset: int, data: memoryview) -> bytes:
    """Wire bytes of ``UpdateConstantBufferRequest(chunk=ConstantChunk(name, offset, data))``."""
    head = _string(1, name)
    if offset:
        head += _key(2, 0) + _varint(offset)
    size = len(head) + (len(_len_prefix(3, data.nbytes)) + data.nbytes if data.nbytes else 0)
    if not data.nbytes:
        return _len_prefix(2, size) + head
    return b"".join((_len_prefix(2, size), head, _len_prefix(3, data.nbytes), data))


# ---------------------------------------------------------------- uploads


@dataclass(frozen=True)
class UploadItem:
    """One constant to upload: name, dtype, shape, and how to get its bytes.

    ``load`` is called only when the constant's turn comes, so uploads from a
    file hold one tensor in memory at a time.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    load: Callable[[], WireTensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, value: Any) -> UploadItem:
        wire = to_wire(value, f"constant {name!r}")
        return cls(name, wire.dtype, wire.shape, lambda: wire)


def upload_items(tensor_map: Mapping[str, Any]) -> list[UploadItem]:
    if not isinstance(tensor_map, Mapping):
        raise TypeError("tensor_map must be a mapping of constant name (or original FQN) to tensor")
    return [UploadItem.of(str(name), value) for name, value in tensor_map.items()]


def encode_upload(
    model: str,
    items: Sequence[UploadItem],
    *,
    use_inactive: bool,
    validate_full_updates: bool,
    user_managed: bool = False,
    description: str = "",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[bytes]:
    """The ``UpdateConstantBuffer`` request stream: a header declaring every
    constant, then each constant's bytes in chunks of at most ``chunk_bytes``.

    ``progress(sent_bytes, total_bytes)`` is called after each chunk is handed
    to gRPC (that is, as the upload advances, not as it is prepared).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    header = pb.UpdateConstantBufferHeader(
        model=model,
        use_inactive=use_inactive,
        validate_full_updates=validate_full_updates,
        user_managed=user_managed,
        description=description,
        constants=[pb.TensorSpec(name=i.name, dtype=i.dtype.wire, shape=i.shape) for i in items],
    )
    total = sum(i.nbytes for i in items)
    yield pb.UpdateConstantBufferRequest(header=header).SerializeToString()
    sent = 0
    if progress:
        progress(0, total)
    for item in items:
        wire = item.load()
        if wire.nbytes != item.nbytes or wire.dtype != item.dtype or wire.shape != item.shape:
            raise ValueError(f"constant {item.name!r} changed between declaration and upload")
        for offset in range(0, wire.nbytes, chunk_bytes):
            piece = wire.data[offset : offset + chunk_bytes]
            yield encode_chunk_request(item.name, offset, piece)
            sent += piece.nbytes
            if progress:
                progress(sent, total)


class RecordingIterator:
    """Wraps a request iterator and keeps the exception it raised, if any.

    gRPC consumes request iterators on its own thread and turns an exception
    there into a bare CANCELLED status; the client re-raises the original
    (a file that could not be read, say) instead.
    """

    def __init__(self, requests: Iterator[bytes]) -> None:
        self._requests = requests
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._requests
        except BaseException as e:
            self.error = e
            raise


# ---------------------------------------------------------------- decoding


def _shape_of(shape, what: str) -> tuple[int, ...]:
    shape = tuple(shape)
    if shape and min(shape) < 0:
        raise ValueError(f"{what}: negative dimension in shape {list(shape)}")
    return shape


def _dtype_of(wire: int, what: str) -> DType:
    dtype = BY_WIRE.get(wire)
    if dtype is None:
        raise ValueError(f"{what}: unknown dtype {wire} (a newer server? upgrade the client)")
    return dtype


class UnsupportedDtypeError(TypeError):
    """A received tensor's dtype has no type on this side (bfloat16 without torch)."""


_readonly_warned = False


def decode_bytes(
    data, dtype: DType, shape: tuple[int, ...], fmt: Literal["numpy", "torch"], what: str = "tensor"
):
    """An array/tensor viewing ``data`` (bytes-like) as ``dtype`` and ``shape``."""
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{what}: {len(data)} bytes for {dtype.torch_name}{list(shape)}, expected {expected}"
        )
    if fmt == "numpy":
        if dtype.numpy_name is None:
            raise UnsupportedDtypeError(
                f"{what} is {dtype.torch_name}, which numpy cannot hold: install torch "
                "(or ask for torch outputs) to receive it"
            )
        return np.frombuffer(data, dtype=_NUMPY_DTYPE_BY_WIRE[dtype.wire]).reshape(shape)
    torch = _torch()
    torch_dtype = getattr(torch, dtype.torch_name, None)
    if torch_dtype is None:
        raise UnsupportedDtypeError(
            f"{what} is {dtype.torch_name}, which this torch {torch.__version__} lacks"
        )
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype)
    if dtype.numpy_name is not None:
        return _torch_view(data, _NUMPY_DTYPE_BY_WIRE[dtype.wire], shape)
    # bfloat16 / float8: numpy has no such dtype; the bytes viewed as uint8, then as it.
    return _torch_view(data, np.uint8, (len(data),)).view(torch_dtype).reshape(shape)


def _torch_view(data, np_dtype, shape: tuple[int, ...]):
    """A torch tensor viewing ``data`` (bytes-like, non-empty) as ``np_dtype`` and ``shape``,
    made through numpy (one step fewer than torch.frombuffer and reshape)."""
    global _readonly_warned
    if isinstance(data, bytes) and len(data) < 64:
        # CPython shares some tiny bytes objects (e.g. every 1-byte value):
        # never hand torch a writable view of those.
        data = bytearray(data)
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    torch = _torch()
    if _readonly_warned or array.flags.writeable:
        return torch.from_numpy(array)
    # Received bytes (and views of them) are ours alone; torch warns (once per process)
    # that the array is not writable, harmless for a buffer nobody else holds. Silence
    # that one warning, once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    _readonly_warned = True
    return tensor


class RunResponseView:
    """A ``RunResponse`` read by hand: ``outputs`` are :class:`wire.TensorView`."""

    __slots__ = ("outputs", "weights_version")

    def __init__(self, outputs: list[wire.TensorView], weights_version: str):
        self.outputs = outputs
        self.weights_version = weights_version


#: What the client takes in one Run response (a server's answer is bounded too).
RESPONSE_BOUNDS = wire.Bounds(max_entries=1 << 12, max_rank=64, max_dim=(1 << 63) - 1)
_RUN_RESPONSE = {1: wire.Rule("entries", {2: wire.Rule("dims")}, entries="outputs")}


def parse_run_response(buf: bytes, viewing_min_bytes: int = wire.VIEWING_MIN_BYTES):
    """``RunResponse`` bytes → ``.outputs`` and ``.weights_version``; a response of
    ``viewing_min_bytes`` or more is walked here, its output data views of ``buf`` (no
    copy), within :data:`RESPONSE_BOUNDS` (``wire.BoundError`` past them). What the walk
    does not take goes to protobuf's parser, which decides, once the bounds are checked."""
    if len(buf) >= viewing_min_bytes:
        try:
            version, outputs = wire.read_text_and_tensors(
                buf,
                text_field=2,
                tensor_field=1,
                bounds=RESPONSE_BOUNDS,
                what="RunResponse",
                entry="output",
            )
            return RunResponseView(outputs, version)
        except wire.WireError:
            wire.check_bounds(buf, _RUN_RESPONSE, RESPONSE_BOUNDS, "RunResponse")
    return pb.RunResponse.FromString(buf)


def from_wire(
    tensor: pb.Tensor | wire.TensorView, fmt: Literal["numpy", "torch"], what: str = "tensor"
):
    """A received ``Tensor`` message as an array/tensor."""
    # The common case in the fewest steps; anything it does not take (a dtype numpy lacks,
    # no bytes, a shape that does not fit them) gets the checked path and its message.
    np_dtype = _NUMPY_DTYPE_BY_WIRE.get(tensor.dtype)
    data = tensor.data
    if np_dtype is not None and data:
        shape = tuple(tensor.shape)
        if not shape or min(shape) >= 0:
            try:  # (a try costs nothing when nothing is raised; contextlib.suppress ~0.3 µs)
                if fmt == "numpy":
                    return np.frombuffer(data, dtype=np_dtype).reshape(shape)
                return _torch_view(data, np_dtype, shape)
            except (ValueError, TypeError):
                pass
    dtype = _dtype_of(tensor.dtype, what)
    return decode_bytes(tensor.data, dtype, _shape_of(tensor.shape, what), fmt, what)


class ConstantsAssembler:
    """Reassembles the ``ConstantChunk`` stream of ExtractConstantsMap.

    Chunks may come in any order and size; each carries its constant's dtype
    and shape. A constant that arrives whole in one chunk is used as received;
    otherwise its pieces are copied once into a buffer of the final size.
    """

    def __init__(self, fmt: Literal["numpy", "torch"]) -> None:
        self._fmt = fmt
        self._parts: dict[str, list] = {}  # name -> [dtype, shape, buffer, bytes_filled]

    def add(self, chunk: pb.ConstantChunk) -> None:
        name = chunk.name
        what = f"constant {name!r}"
        dtype = _dtype_of(chunk.dtype, what)
        shape = _shape_of(chunk.shape, what)
        nbytes = math.prod(shape) * dtype.itemsize
        data = chunk.data
        entry = self._parts.get(name)
        if entry is None:
            if chunk.offset == 0 and len(data) == nbytes:
                self._parts[name] = [dtype, shape, data, nbytes]
                return
            entry = self._parts[name] = [dtype, shape, bytearray(nbytes), 0]
        elif entry[0] != dtype or entry[1] != shape:
            raise ValueError(f"{what}: chunks disagree on dtype/shape")
        if chunk.offset < 0 or chunk.offset + len(data) > nbytes:
            raise ValueError(
                f"{what}: chunk [{chunk.offset}, {chunk.offset + len(data)}) "
                f"beyond its {nbytes} bytes"
            )
        buffer = entry[2]
        if not isinstance(buffer, bytearray):
            raise ValueError(f"{what}: more chunks after the whole constant arrived")
        buffer[chunk.offset : chunk.offset + len(data)] = data
        entry[3] += len(data)

    def result(self) -> dict[str, Any]:
        out = {}
        for name, (dtype, shape, buffer, filled) in self._parts.items():
            if filled != len(buffer):
                raise ValueError(f"constant {name!r}: received {filled} of {len(buffer)} bytes")
            out[name] = decode_bytes(buffer, dtype, shape, self._fmt, f"constant {name!r}")
        return out
