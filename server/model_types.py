"""Plain value types of the core: what a model is, how it is placed, which weights serve.

No behaviour here and no protocol: servicers map these to their own messages
(``runner_codec`` for ``aotiserve.v1``, ``oip_codec`` for the Open Inference Protocol).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .io_specs import IOSpec


class ModelState(enum.IntEnum):
    """Where a model is in its life (numbered as ``aotiserve.v1.ModelState``)."""

    LOADING = 1
    READY = 2
    UNLOADING = 3
    FAILED = 4


@dataclass(frozen=True)
class WeightsVersion:
    """One set of weights a model has held: ``initial`` is the package's own."""

    id: str
    digest: str  # "<algorithm>:<hex>" (weights.py: xxh3 content digest; see docs/server.md)
    created_unix_ms: int
    author: str = ""
    description: str = ""


@dataclass(frozen=True)
class ConstantInfo:
    """An updatable constant: runner constant name, original FQN, dtype, shape."""

    name: str
    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class DeclaredConstant:
    """One constant an upload's header declares: its wire name, wire dtype code, shape."""

    name: str
    dtype: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class UploadHeader:
    """What an upload declares before its bytes come (``UpdateConstantBufferHeader``)."""

    model: str
    constants: tuple[DeclaredConstant, ...]
    use_inactive: bool
    validate_full_updates: bool
    description: str = ""


@dataclass(frozen=True)
class CudaIpcTensor:
    """One CUDA tensor a colocated process shares by IPC handle (torch's
    ``reduce_tensor`` fields; see ``weights_ipc``)."""

    name: str
    dtype: int  # wire code
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


@dataclass(frozen=True)
class CudaHandoff:
    """A GPU-direct weights hand-off (``LoadWeightsFromCuda``)."""

    model: str
    host_id: str
    device_uuid: str
    tensors: tuple[CudaIpcTensor, ...]
    validate_full_updates: bool
    description: str = ""


@dataclass(frozen=True)
class ConstantChunk:
    """A piece of one constant's bytes, as uploads receive and extracts send them."""

    name: str
    offset: int
    data: bytes | memoryview
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()


@dataclass
class ModelOptions:
    """Placement of one model (per-model config file or LoadModel request)."""

    devices: tuple[str, ...]
    runners: int
    package_model: str | None = None
    # Per-device packages: device ("cuda:1") or device type ("cuda") -> .pt2 path, for a
    # model placed on devices of several types (AOTI compiles a package for one type).
    device_paths: Mapping[str, str] = field(default_factory=dict)
    # Dynamic batching (server/batching.py): most rows in one run (< 2: off), and how long
    # a run waits for others to join while the model is busy.
    batch_max_size: int = 0
    batch_max_delay_us: int = 500
    # Fill the inactive buffer with a copy of the weights at load
    # (model_weights.ModelWeights.reserve_inactive).
    reserve_inactive: bool = False
    # Warm-up rounds per replica before the model turns READY (server/warmup.py; 0: off).
    warmup_runs: int = 1

    def path_for(self, device: torch.device, default: str) -> str:
        return self.device_paths.get(str(device)) or self.device_paths.get(device.type) or default


@dataclass(frozen=True)
class RunResult:
    outputs: list[torch.Tensor]
    weights_version: str


@dataclass(frozen=True)
class ModelInfo:
    """What a servicer may say about a model (protocol-neutral)."""

    name: str
    path: str
    devices: list[str]
    runners_per_device: int
    state: ModelState
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    metadata: dict[str, str]
    updatable_constants: list[str]
    active_version: WeightsVersion | None
    staged_version: WeightsVersion | None
    previous_version: WeightsVersion | None
    error: str = ""
