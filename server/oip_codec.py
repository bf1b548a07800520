"""Open Inference Protocol (``inference.*``) messages ↔ torch tensors and plain values.

What ``oip_servicer`` needs to speak the protocol: the message classes (from a
private descriptor pool, see :func:`messages`), datatypes (the table is
``tensor_codec``'s), input tensors from ``raw_input_contents`` or typed ``contents``,
parameters the server refuses, and the bounded parsing of inference requests.

Private descriptor pool. Our generated ``aotiserve.oip.inference_pb2`` and
tritonclient both register messages named ``inference.*`` in protobuf's
process-wide default pool, which refuses the second registration. So the
server never imports the generated module: it loads the same compiled
descriptor (read from that module's source, not executed) into a pool of its
own. A process embedding the server can then import tritonclient too (bench,
in-process tests); only ``aotiserve.oip`` and tritonclient still exclude each
other. Server reflection lists this service but cannot describe its messages.

Bounds. protobuf builds one object per repeated entry, so inference requests are
walked first (``wire.check_bounds``, keeping nothing): more inputs, requested
outputs, parameters or raw_input_contents entries than ``max_inputs``, a shape
longer than ``max_tensor_rank`` or a dimension above ``max_tensor_elements`` is
INVALID_ARGUMENT before protobuf sees the bytes.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from google.protobuf import descriptor_pool, message_factory

from aotiserve.client import dtypes as dt
from aotiserve.client import wire

from . import tensor_codec as codec
from .errors import InvalidArgument, Unimplemented
from .io_specs import IOSpec

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
_GENERATED_MODULE = "aotiserve.oip.inference_pb2"


# ---------------------------------------------------------------- messages (private pool)


def _serialized_descriptor() -> bytes:
    """The generated module's FileDescriptorProto, read from its source without running it.

    It is the literal the module passes to ``AddSerializedFile``, so protoc
    stays the only thing that compiles the proto. Where there is no source
    (a .pyc-only install) the module is imported after all, which puts its
    messages in the default pool too.
    """
    spec = importlib.util.find_spec(_GENERATED_MODULE)
    if spec is None:
        raise ImportError(f"{_GENERATED_MODULE} is missing; run `make proto`")
    try:
        tree = ast.parse(Path(spec.origin or "").read_text())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        log.warning(
            "no source for %s; importing it (tritonclient can no longer be imported "
            "into this process)",
            _GENERATED_MODULE,
        )
        return importlib.import_module(_GENERATED_MODULE).DESCRIPTOR.serialized_pb
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "AddSerializedFile"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return node.args[0].value
    raise ImportError(f"no serialized descriptor found in {spec.origin}")


@functools.cache
def messages() -> SimpleNamespace:
    """The ``inference.*`` message classes, from a private descriptor pool."""
    serialized = _serialized_descriptor()
    pool = descriptor_pool.DescriptorPool()
    file = pool.AddSerializedFile(serialized)
    ns = SimpleNamespace(pool=pool, service=pool.FindServiceByName(SERVICE_NAME))
    for name in file.message_types_by_name:
        setattr(
            ns,
            name,
            message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}")),
        )
    ns.config_dtype = {
        v.name: v.number for v in pool.FindEnumTypeByName("inference.DataType").values
    }
    return ns


# ---------------------------------------------------------------- datatypes


TORCH_BY_OIP = codec.TORCH_BY_OIP
OIP_BY_TORCH = codec.OIP_BY_TORCH

# Which InferTensorContents field carries each datatype, and numpy's name for
# the field's own element type (the wire width, before narrowing).
_TYPED_FIELDS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "bool"),
    "INT8": ("int_contents", "int32"),
    "INT16": ("int_contents", "int32"),
    "INT32": ("int_contents", "int32"),
    "INT64": ("int64_contents", "int64"),
    "UINT8": ("uint_contents", "uint32"),
    "UINT16": ("uint_contents", "uint32"),
    "UINT32": ("uint_contents", "uint32"),
    "UINT64": ("uint64_contents", "uint64"),
    "FP32": ("fp32_contents", "float32"),
    "FP64": ("fp64_contents", "float64"),
}
_ALL_TYPED_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)

_SEQUENCE_PARAMS = ("sequence_id", "sequence_start", "sequence_end")


def torch_dtype(datatype: str, what: str) -> torch.dtype:
    dtype = TORCH_BY_OIP.get(datatype)
    if dtype is not None:
        return dtype
    if datatype == "BYTES":
        raise Unimplemented(
            f"{what}: BYTES tensors are not supported; aotiserve models take numeric tensors"
        )
    raise InvalidArgument(
        f"{what}: unknown datatype {datatype!r} (expected one of {', '.join(sorted(TORCH_BY_OIP))})"
    )


def oip_datatype(dtype: torch.dtype, what: str) -> str:
    name = OIP_BY_TORCH.get(dtype)
    if name is None:
        raise Unimplemented(
            f"{what}: dtype {codec.dtype_name(dtype)} has no Open Inference "
            "Protocol datatype; use the native aotiserve.v1 API"
        )
    return name


# ---------------------------------------------------------------- tensors


def decode_raw(
    data: bytes, dtype: torch.dtype, shape: Sequence[int], what: str, limits: codec.Limits
) -> torch.Tensor:
    """A tensor over ``data`` without a copy (the same contract as tensor_codec.decode)."""
    numel = codec.checked_numel(shape, what, limits)
    expected = numel * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{what}: expected {expected} bytes for {codec.describe(dtype, shape)}, got {len(data)}"
        )
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    tensor = torch.frombuffer(data, dtype=dtype).view(tuple(shape))
    if dtype == torch.bool and tensor.view(torch.uint8).max() > 1:
        raise InvalidArgument(f"{what}: BOOL tensor holds bytes other than 0 and 1")
    return tensor


# Inputs handed to a runner start on this boundary (AOTInductor's kernels assume torch's
# allocator alignment); a shared-memory input at another offset is copied.
ALIGNMENT = 64


def decode_region(data: torch.Tensor, dtype: torch.dtype, shape: Sequence[int], what: str):
    """A tensor over ``data`` (``uint8``, a shared-memory region's bytes, exactly the
    tensor's size): no copy where it is aligned."""
    if data.numel() == 0:
        return torch.empty(tuple(shape), dtype=dtype, device=data.device)
    if data.data_ptr() % ALIGNMENT:
        data = data.clone()
    tensor = data.view(dtype).view(tuple(shape))
    if dtype == torch.bool and bool(data.max() > 1):
        raise InvalidArgument(f"{what}: BOOL tensor holds bytes other than 0 and 1")
    return tensor


def write_region(dest: torch.Tensor, tensor: torch.Tensor, what: str) -> int:
    """Copies ``tensor``'s bytes to the start of ``dest`` (``uint8``, a shared-memory
    region's bytes); returns how many. Too small a region: INVALID_ARGUMENT."""
    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    if flat.numel() > dest.numel():
        raise InvalidArgument(
            f"{what}: its {flat.numel()} bytes do not fit the {dest.numel()} bytes of "
            "shared memory the request gave it (shared_memory_byte_size)"
        )
    dest[: flat.numel()].copy_(flat)
    return flat.numel()


def decode_typed(
    contents: Any,
    datatype: str,
    dtype: torch.dtype,
    shape: Sequence[int],
    what: str,
    limits: codec.Limits,
) -> torch.Tensor:
    numel = codec.checked_numel(shape, what, limits)
    field = _TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidArgument(
            f"{what}: {datatype} data travels only in raw_input_contents "
            "(the protocol has no typed field for it)"
        )
    name, wire_np = field
    values = getattr(contents, name)
    others = [f for f in _ALL_TYPED_FIELDS if f != name and len(getattr(contents, f))]
    if others and len(values):
        raise InvalidArgument(
            f"{what}: {datatype} values travel in contents.{name} only, but the request "
            f"filled {', '.join(others)} too"
        )
    if len(values) != numel:
        hint = f" (the request filled {', '.join(others)})" if others else ""
        raise InvalidArgument(
            f"{what}: expected {numel} {datatype} values in contents.{name} "
            f"for shape {list(shape)}, got {len(values)}{hint}"
        )
    array = np.array(values, dtype=wire_np)
    target = np.dtype(dt.BY_OIP_NAME[datatype].numpy_name)
    if target != array.dtype:
        if array.size and np.issubdtype(target, np.integer):
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                raise InvalidArgument(
                    f"{what}: a value in contents.{name} is out of range for {datatype}"
                )
        array = array.astype(target)
    return torch.from_numpy(array).view(tuple(shape))


def check_request_parameters(parameters, model: str) -> None:
    for key in _SEQUENCE_PARAMS:
        if key in parameters:
            p = parameters[key]
            which = p.WhichOneof("parameter_choice")
            if which is not None and getattr(p, which):
                raise InvalidArgument(
                    f"model {model!r} is not a sequence model: sequence "
                    f"batching ({key}) is not supported"
                )


def spec_shape(spec: IOSpec) -> list[int]:
    """The spec's shape as OIP metadata gives it ([] where unknown; -1 = dynamic)."""
    return list(spec.shape) if spec.shape is not None else []


def spec_datatype(spec: IOSpec) -> str:
    """The spec's OIP datatype name ("" where the dtype is unknown or has none)."""
    return OIP_BY_TORCH.get(spec.dtype, "") if spec.dtype is not None else ""


# ---------------------------------------------------------------- bounded parsing

# ModelInferRequest as wire.check_bounds walks it (parameters are map entries).
_PARAMETERS = wire.Rule("entries", entries="parameters")
_INFER_REQUEST = {
    4: _PARAMETERS,
    5: wire.Rule(
        "entries", {1: wire.Rule("name"), 3: wire.Rule("dims"), 4: _PARAMETERS}, entries="inputs"
    ),
    6: wire.Rule("entries", {1: wire.Rule("name"), 2: _PARAMETERS}, entries="requested outputs"),
    7: wire.Rule("entries", entries="raw_input_contents entries"),
}


def bounded(parse: Callable[[bytes], Any], bounds: wire.Bounds) -> Callable[[bytes], Any]:
    """``parse`` (protobuf's) behind a walk of the bytes within ``bounds``."""

    def deserialize(raw: bytes):
        try:
            wire.check_bounds(raw, _INFER_REQUEST, bounds, "ModelInferRequest")
        except wire.BoundError as exc:
            raise InvalidArgument(str(exc)) from None
        return parse(raw)

    deserialize.bounded = True  # the interceptor leaves its bytes to it
    return deserialize
