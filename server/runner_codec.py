"""``aotiserve.v1`` messages ↔ the core's plain types (``model_types``, torch tensors).

The one place the ``aotiserve.v1`` servicer (``runner_servicer``) turns protobuf
into what the data plane takes and back; the dtype table itself is
``tensor_codec``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aotiserve.v1 import model_runner_pb2 as pb

from . import tensor_codec as codec
from .input_checks import InputPlan
from .io_specs import IOSpec
from .model_types import (
    ConstantChunk,
    CudaHandoff,
    CudaIpcTensor,
    DeclaredConstant,
    ModelInfo,
    ModelState,
    UploadHeader,
    WeightsVersion,
)

STATE: dict[ModelState, int] = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.UNLOADING: pb.MODEL_STATE_UNLOADING,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}


def encode(tensor: torch.Tensor) -> pb.Tensor:
    return pb.Tensor(
        dtype=codec.wire_dtype(tensor.dtype),
        shape=list(tensor.shape),
        data=codec.tensor_bytes(tensor),
    )


def decode_inputs(
    tensors: Sequence[pb.Tensor], plan: InputPlan, limits: codec.Limits
) -> list[torch.Tensor]:
    """Wire tensors → torch, naming the input in every error."""
    return [codec.decode(t, plan.label(i), limits) for i, t in enumerate(tensors)]


def version(v: WeightsVersion) -> pb.WeightsVersion:
    return pb.WeightsVersion(
        id=v.id,
        digest=v.digest,
        created_unix_ms=v.created_unix_ms,
        author=v.author,
        description=v.description,
    )


def _version(v: WeightsVersion | None) -> pb.WeightsVersion | None:
    return version(v) if v is not None else None


def _spec(s: IOSpec) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=s.name,
        dtype=codec.WIRE_BY_TORCH_DTYPE.get(s.dtype, pb.DATA_TYPE_UNSPECIFIED) if s.dtype else 0,
        shape=list(s.shape) if s.shape is not None else [],
    )


def model_info(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        path=info.path,
        devices=info.devices,
        runners_per_device=info.runners_per_device,
        state=STATE[info.state],
        active_version=_version(info.active_version),
        staged_version=_version(info.staged_version),
        previous_version=_version(info.previous_version),
        updatable_constants=info.updatable_constants,
        inputs=[_spec(s) for s in info.inputs],
        outputs=[_spec(s) for s in info.outputs],
        metadata=info.metadata,
        error=info.error,
    )


def upload_header(header: pb.UpdateConstantBufferHeader) -> UploadHeader:
    """The header as the data plane takes it (dtypes stay wire codes: staging checks
    each declared constant in order, name first, then its dtype)."""
    return UploadHeader(
        model=header.model,
        constants=tuple(
            DeclaredConstant(c.name, c.dtype, tuple(c.shape)) for c in header.constants
        ),
        use_inactive=header.use_inactive,
        validate_full_updates=header.validate_full_updates,
        description=header.description,
    )


def cuda_handoff(request: pb.LoadWeightsFromCudaRequest) -> CudaHandoff:
    return CudaHandoff(
        model=request.model,
        host_id=request.host_id,
        device_uuid=request.device_uuid,
        tensors=tuple(
            CudaIpcTensor(
                name=t.name,
                dtype=t.dtype,
                shape=tuple(t.shape),
                stride=tuple(t.stride),
                storage_offset=t.storage_offset,
                storage_handle=t.storage_handle,
                storage_size_bytes=t.storage_size_bytes,
                storage_offset_bytes=t.storage_offset_bytes,
                ref_counter_handle=t.ref_counter_handle,
                ref_counter_offset=t.ref_counter_offset,
                event_handle=t.event_handle,
                event_sync_required=t.event_sync_required,
            )
            for t in request.tensors
        ),
        validate_full_updates=request.validate_full_updates,
        description=request.description,
    )


def constant_chunk(chunk: ConstantChunk) -> pb.ConstantChunk:
    return pb.ConstantChunk(
        name=chunk.name,
        offset=chunk.offset,
        data=chunk.data,
        dtype=codec.wire_dtype(chunk.dtype),
        shape=list(chunk.shape),
    )
