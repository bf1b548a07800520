"""Plain-Python views of the server's model descriptions (``ModelInfo`` and friends)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from aotiserve.client.dtypes import wire_name
from aotiserve.v1 import model_runner_pb2 as pb


@dataclass(frozen=True)
class WeightsVersion:
    """One version of a model's weights. ``digest`` is ``"<algorithm>:<hex>"``:
    ``xxh3:`` the content digest (equal for equal bytes, whichever path staged them),
    ``gpu-fingerprint:`` a GPU-direct hand-off's device-side fingerprint, ``blake3:`` or
    ``sha256:`` a version recorded by an older daemon."""

    id: str
    digest: str = ""
    created_unix_ms: int = 0
    author: str = ""
    description: str = ""

    @property
    def sha256(self) -> str:
        """Deprecated: the hex digest only where it is a SHA-256 (older daemons), else ""."""
        algorithm, _, hexpart = self.digest.partition(":")
        return hexpart if algorithm == "sha256" else ""

    @classmethod
    def from_proto(cls, msg: pb.WeightsVersion) -> WeightsVersion | None:
        if not msg.id:
            return None
        # A daemon from before digests named their algorithm sends only the deprecated sha256.
        digest = msg.digest or (f"sha256:{msg.sha256}" if msg.sha256 else "")
        return cls(msg.id, digest, msg.created_unix_ms, msg.author, msg.description)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (torch's name, e.g. "float32") and shape (-1: dynamic) of an input or output,
    and the sizes each dim accepts where the server knows them (``max_shape`` -1: unbounded)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    min_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None

    @classmethod
    def from_proto(cls, msg: pb.TensorSpec) -> TensorSpec:
        return cls(msg.name, wire_name(msg.dtype), tuple(msg.shape))


def _with_bounds(specs: list[TensorSpec], published: str | None) -> tuple[TensorSpec, ...]:
    """The specs with the dim bounds the server publishes in ModelInfo.metadata (a JSON list:
    ModelInfo's TensorSpec message has no field for them), matched by name and rank."""
    try:
        entries = {e["name"]: e for e in json.loads(published)} if published else {}
    except (ValueError, TypeError, KeyError):
        return tuple(specs)
    out = []
    for spec in specs:
        e = entries.get(spec.name) or {}
        lo, hi = e.get("min_shape"), e.get("max_shape")
        if isinstance(lo, list) and isinstance(hi, list) and len(lo) == len(hi) == len(spec.shape):
            spec = replace(
                spec, min_shape=tuple(int(x) for x in lo), max_shape=tuple(int(x) for x in hi)
            )
        out.append(spec)
    return tuple(out)


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
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
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
            inputs=_with_bounds(
                [TensorSpec.from_proto(s) for s in msg.inputs], msg.metadata.get("aotiserve.inputs")
            ),
            outputs=_with_bounds(
                [TensorSpec.from_proto(s) for s in msg.outputs],
                msg.metadata.get("aotiserve.outputs"),
            ),
            metadata=dict(msg.metadata),
            error=msg.error,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
