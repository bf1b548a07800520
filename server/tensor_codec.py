"""The server's one dtype table (torch ↔ aotiserve.v1 wire code ↔ Open Inference Protocol
name) and tensors from and to bytes, copying as little as we can.

Decoding wraps the received bytes (``numpy.frombuffer``, or ``torch.frombuffer``
for dtypes numpy lacks; no copy; the tensor is read-only by contract: runners
never write their inputs). Encoding
takes the tensor's bytes once (``numpy().tobytes()`` of a uint8 view works for
every dtype, bfloat16 and float8 included). Protocol messages are the servicers'
(``runner_codec``, ``oip_codec``): here a wire tensor is anything with ``dtype`` (wire
code), ``shape`` and ``data``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aotiserve.client import dtypes as dt
from aotiserve.client import wire

from .errors import InvalidArgument, ResourceExhausted

TORCH_DTYPE_BY_WIRE: dict[int, torch.dtype] = {
    d.wire: getattr(torch, d.torch_name) for d in dt.DTYPES if hasattr(torch, d.torch_name)
}
WIRE_BY_TORCH_DTYPE: dict[torch.dtype, int] = {v: k for k, v in TORCH_DTYPE_BY_WIRE.items()}
# Open Inference Protocol datatype names ("FP32"), for the dtypes both sides have.
TORCH_BY_OIP: dict[str, torch.dtype] = {
    d.oip_name: getattr(torch, d.torch_name)
    for d in dt.DTYPES
    if d.oip_name and isinstance(getattr(torch, d.torch_name, None), torch.dtype)
}
OIP_BY_TORCH: dict[torch.dtype, str] = {v: k for k, v in TORCH_BY_OIP.items()}


def _numpy_dtypes() -> dict[torch.dtype, np.dtype]:
    out = {}
    for d in TORCH_DTYPE_BY_WIRE.values():
        with contextlib.suppress(TypeError, RuntimeError):  # bfloat16, float8...: torch only
            out[d] = torch.empty(0, dtype=d).numpy().dtype
    return out


# Dtypes numpy has. On the Run path, numpy views stand in for torch ones: each torch op
# called from Python releases and retakes the GIL, which under concurrent calls is a
# thread switch (measured: ~1 µs uncontended, and fewer switches per call under load).
NUMPY_DTYPE: dict[torch.dtype, np.dtype] = _numpy_dtypes()


@dataclass(frozen=True)
class Limits:
    """Bounds on one request and each tensor it holds."""

    max_elements: int = 1 << 31
    max_rank: int = 16
    max_inputs: int = 64
    max_constants: int = 1 << 16

    @property
    def wire(self) -> wire.Bounds:
        """The same bounds as the wire walks check them (before anything is kept)."""
        return wire.Bounds(
            max_entries=self.max_inputs,
            max_rank=self.max_rank,
            max_dim=self.max_elements,
            max_constants=self.max_constants,
            settings=WIRE_SETTINGS,
        )


# The setting behind each wire bound (errors name it).
WIRE_SETTINGS = {
    "max_entries": "max_inputs",
    "max_rank": "max_tensor_rank",
    "max_dim": "max_tensor_elements",
    "max_constants": "max_upload_constants",
}


def torch_dtype(wire: int, what: str) -> torch.dtype:
    try:
        return TORCH_DTYPE_BY_WIRE[wire]
    except KeyError:
        raise InvalidArgument(
            f"{what}: unknown or unsupported dtype {dt.wire_name(wire)}"
        ) from None


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return WIRE_BY_TORCH_DTYPE[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} has no wire representation") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checked_numel(shape: Sequence[int], what: str, limits: Limits) -> int:
    """prod(shape), refusing negative dims, too many dims and absurd sizes: a single
    dimension past ``max_elements``, or a zero-element shape whose other dimensions
    multiply past it (INVALID_ARGUMENT: no tensor has that shape); a shape of more
    elements than ``max_elements`` (RESOURCE_EXHAUSTED: too large for this server)."""
    if len(shape) > limits.max_rank:
        raise InvalidArgument(f"{what}: rank {len(shape)} exceeds the limit of {limits.max_rank}")
    empty = 0 in shape
    numel = 1  # of the non-zero dimensions
    for i, d in enumerate(shape):
        if d < 0:
            raise InvalidArgument(f"{what}: negative dimension {d} in shape {list(shape)}")
        if d > limits.max_elements:
            raise InvalidArgument(
                f"{what}: dimension {i} of shape {list(shape)} is above the "
                f"limit of {limits.max_elements} (max_tensor_elements)"
            )
        numel *= d or 1
        if numel > limits.max_elements:
            if empty:
                raise InvalidArgument(
                    f"{what}: shape {list(shape)} has no elements, but its other dimensions "
                    f"multiply to more than {limits.max_elements} (max_tensor_elements)"
                )
            raise ResourceExhausted(
                f"{what}: shape {list(shape)} has more than {limits.max_elements} elements"
            )
    return 0 if empty else numel


def describe(dtype: torch.dtype, shape: Sequence[int]) -> str:
    return f"{dtype_name(dtype)}[{', '.join(str(d) for d in shape)}]"


def decode(t: Any, what: str, limits: Limits = Limits()) -> torch.Tensor:
    """A CPU tensor over ``t.data`` (no copy) of wire tensor ``t`` (``dtype``, ``shape``,
    ``data``: an ``aotiserve.v1.Tensor`` or a ``run_wire`` view). ``what`` names it in errors."""
    dtype = torch_dtype(t.dtype, what)
    shape = tuple(t.shape)
    numel = checked_numel(shape, what, limits)
    data = t.data
    expected = numel * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{what}: expected {expected} bytes for {describe(dtype, shape)}, got {len(data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    np_dtype = NUMPY_DTYPE.get(dtype)
    if np_dtype is not None:
        tensor = torch.from_numpy(np.frombuffer(data, dtype=np_dtype).reshape(shape))
    else:
        tensor = torch.frombuffer(data, dtype=dtype).view(shape)
    if dtype == torch.bool and tensor.view(torch.uint8).max() > 1:
        raise InvalidArgument(f"{what}: bool tensor holds bytes other than 0 and 1")
    return tensor


def byte_buffer(tensor: torch.Tensor):
    """The tensor's C-contiguous bytes as a buffer (no copy of a contiguous CPU tensor)."""
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    if tensor.dtype in NUMPY_DTYPE and not tensor.requires_grad:
        # numpy, not torch ops: no GIL release per call (see NUMPY_DTYPE).
        arr = tensor.numpy()
        if arr.size == 0:
            return b""
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        return arr.reshape(-1).view(np.uint8)
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.numel() == 0:
        return b""
    # reshape(-1) gives stride 1 even where "contiguous" size-1 dims carry odd strides.
    return tensor.reshape(-1).view(torch.uint8).numpy()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's C-contiguous little-endian bytes (one copy)."""
    return bytes(byte_buffer(tensor))


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's storage (for chunked writes and reads)."""
    return tensor.reshape(-1).view(torch.uint8)


def numel_of(shape: Sequence[int]) -> int:
    return math.prod(shape)
