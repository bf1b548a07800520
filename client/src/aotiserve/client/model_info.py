"""Plain-Python views of the server's model descriptions (``ModelInfo`` and friends)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from aotiserve.client.dtypes import wire_name
from aotiserve.v1 import model_runner_pb2 as pb


@dataclass(frozen=True)
class WeightsVersion:
    """One version of a model's weights."""

    id: str
    sha256: str = ""
    created_unix_ms: int = 0
    author: str = ""
    description: str = ""

    @classmethod
    def from_proto(cls, msg: pb.WeightsVersion) -> "WeightsVersion | None":
        if not msg.id:
            return None
        return cls(msg.id, msg.sha256, msg.created_unix_ms, msg.author, msg.description)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (torch's name, e.g. "float32") and shape (-1: dynamic) of an input or output."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_proto(cls, msg: pb.TensorSpec) -> "TensorSpec":
        return cls(msg.name, wire_name(msg.dtype), tuple(msg.shape))


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows of one model (``ListModels``)."""

    name: str
    path: str
    devices: tuple[str, ...]
    runners_per_device: int
    state: str  # "LOADING", "READY", "UNLOADING", "FAILED"
    active_version: WeightsVersion | None
    staged_version: WeightsVersion | None
    previous_version: WeightsVersion | None
    updatable_constants: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> "ModelInfo":
        return cls(
            name=msg.name,
            path=msg.path,
            devices=tuple(msg.devices),
            runners_per_device=msg.runners_per_device,
            state=pb.ModelState.Name(msg.state).removeprefix("MODEL_STATE_"),
            active_version=WeightsVersion.from_proto(msg.active_version),
            staged_version=WeightsVersion.from_proto(msg.staged_version),
            previous_version=WeightsVersion.from_proto(msg.previous_version),
            updatable_constants=tuple(msg.updatable_constants),
            inputs=tuple(TensorSpec.from_proto(s) for s in msg.inputs),
            outputs=tuple(TensorSpec.from_proto(s) for s in msg.outputs),
            metadata=dict(msg.metadata),
            error=msg.error,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
