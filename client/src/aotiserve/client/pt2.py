"""Reads an AOTInductor ``.pt2`` package's models and their interfaces, without torch.

A ``.pt2`` is a zip whose ``<root>/data/aotinductor/<model>/`` folders each hold one
model: its shared library, ``*_metadata.json`` (``AOTI_DEVICE_KEY``… and user
``aot_inductor.metadata``) and the generated wrapper source. The served interface
of a model (:func:`served_specs`) comes from ``aotiserve pack``'s metadata where the
package has it, else from the wrapper source (:mod:`wrapper_source`); both the
daemon and ``aotiserve inspect`` use it, so they agree.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from aotiserve.client import wrapper_source
from aotiserve.client.wrapper_source import WrapperInfo, WrapperTensor

MODELS_DIR = ("data", "aotinductor")
# Keys `aotiserve pack` writes into the package's AOTI metadata (JSON lists of specs).
INPUTS_KEY = "aotiserve.inputs"
OUTPUTS_KEY = "aotiserve.outputs"
TORCH_VERSION_KEY = "aotiserve.torch_version"
# A generated wrapper is tens of KiB; refuse to read an absurd one into memory.
MAX_SOURCE_BYTES = 64 << 20

SOURCE_PACK = "aotiserve pack metadata"
SOURCE_WRAPPER = "generated wrapper source"
SOURCE_NONE = "none"


class Pt2Error(ValueError):
    """The file is not a readable AOTInductor package."""


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as served: name, dtype (torch's name), shape (-1: dynamic) and
    the sizes each dim accepts (``min_shape``; ``max_shape`` -1: unbounded). None where
    the package does not say."""

    name: str
    dtype: str | None
    shape: tuple[int, ...] | None
    min_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None
    graph_name: str = ""  # the model container's own name (e.g. "arg5_1"), if known

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("shape", "min_shape", "max_shape"):
            if d[key] is not None:
                d[key] = list(d[key])
        if not d["graph_name"]:
            del d["graph_name"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        def dims(key: str) -> tuple[int, ...] | None:
            v = d.get(key)
            return tuple(int(x) for x in v) if v is not None else None

        return cls(
            str(d["name"]),
            d.get("dtype") or None,
            dims("shape"),
            dims("min_shape"),
            dims("max_shape"),
            str(d.get("graph_name", "")),
        )

    def refused_below(self) -> list[tuple[int, int]]:
        """(dim, smallest size) for each dynamic dim whose guard refuses sizes below 2."""
        if self.shape is None or self.min_shape is None:
            return []
        return [
            (d, lo)
            for d, (s, lo) in enumerate(zip(self.shape, self.min_shape))
            if s < 0 and lo >= 2
        ]


@dataclass(frozen=True)
class PackageModel:
    """One model of a package."""

    name: str
    metadata: dict[str, str]
    wrapper: WrapperInfo | None  # None: the package holds no wrapper source
    wrapper_file: str | None
    files: tuple[tuple[str, int], ...]  # (file name, bytes)

    @property
    def device(self) -> str | None:
        return self.metadata.get("AOTI_DEVICE_KEY") or None

    @property
    def weights_location(self) -> str:
        names = [n for n, _ in self.files]
        if any(n.endswith("_weights.blob") for n in names):
            return "blob"  # package_constants_on_disk_format="binary_blob"
        if "weights_config.json" in names:
            return "archive"  # torch's own loader reads them from data/weights/
        return "library"  # inside the .so (torch's default)


def _members(zf: zipfile.ZipFile) -> dict[str, list[zipfile.ZipInfo]]:
    models: dict[str, list[zipfile.ZipInfo]] = {}
    for info in zf.infolist():
        parts = PurePosixPath(info.filename).parts
        # <archive-root>/data/aotinductor/<model>/<file>
        if len(parts) >= 5 and parts[1:3] == MODELS_DIR and not info.is_dir():
            models.setdefault(parts[3], []).append(info)
    return models


def _metadata(zf: zipfile.ZipFile, members: Sequence[zipfile.ZipInfo]) -> dict[str, str]:
    for info in members:
        name = PurePosixPath(info.filename).name
        if name.endswith("wrapper_metadata.json") or (
            name.endswith("_metadata.json") and "kernel" not in name
        ):
            if info.file_size > MAX_SOURCE_BYTES:
                continue
            try:
                data = json.loads(zf.read(info))
            except ValueError:
                continue
            if isinstance(data, dict):
                return {str(k): str(v) for k, v in data.items()}
    return {}


def _wrapper_member(members: Sequence[zipfile.ZipInfo]) -> zipfile.ZipInfo | None:
    cpp = [i for i in members if i.filename.endswith(".cpp")]
    wrappers = [i for i in cpp if i.filename.endswith(".wrapper.cpp")]
    if wrappers:
        return wrappers[0]
    # Older packages: one <hash>.cpp holding wrapper and kernels.
    others = [i for i in cpp if not i.filename.endswith(".kernel.cpp")]
    return others[0] if len(others) == 1 else None


def read_models(path: str | os.PathLike, only: str | None = None) -> list[PackageModel]:
    """Every model of the package (or the one named ``only``), sorted by name."""
    path = Path(path)
    try:
        # As the daemon requires (runner_ext/package.py): the zip starts at the first byte
        # (zipfile would find an archive behind any prefix).
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise Pt2Error(
                    f"{str(path)!r} is not a readable .pt2 package: it does not start with a "
                    "zip header (PK\\x03\\x04); the daemon refuses it too"
                )
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise Pt2Error(f"{str(path)!r} is not a readable .pt2 package: {exc}") from exc
    out = []
    with zf:
        for name, members in sorted(_members(zf).items()):
            if only is not None and name != only:
                continue
            wrapper = None
            member = _wrapper_member(members)
            if member is not None and member.file_size <= MAX_SOURCE_BYTES:
                wrapper = wrapper_source.parse(zf.read(member).decode("utf-8", "replace"))
            out.append(
                PackageModel(
                    name=name,
                    metadata=_metadata(zf, members),
                    wrapper=wrapper,
                    wrapper_file=PurePosixPath(member.filename).name if member else None,
                    files=tuple((PurePosixPath(i.filename).name, i.file_size) for i in members),
                )
            )
    if not out:
        what = (
            f"no model named {only!r}"
            if only is not None
            else ("no AOTInductor model (no data/aotinductor/<model>/)")
        )
        raise Pt2Error(f"{str(path)!r} holds {what}")
    return out


def read_model(path: str | os.PathLike, model_name: str) -> PackageModel:
    return read_models(path, only=model_name)[0]


# ---------------------------------------------------------------- served specs


def _from_wrapper(t: WrapperTensor, name: str) -> TensorSpec:
    return TensorSpec(name, t.dtype, t.shape, t.min_shape, t.max_shape, t.graph_name)


def _with_bounds(spec: TensorSpec, t: WrapperTensor | None) -> TensorSpec:
    """A pack spec completed with the wrapper's guards (same rank only), else with the
    bounds its own shape implies (static dims exact, dynamic ones 0..unbounded)."""
    if spec.shape is None:
        return spec
    if t is not None and t.shape is not None and len(t.shape) == len(spec.shape):
        return replace(
            spec,
            min_shape=t.min_shape,
            max_shape=t.max_shape,
            graph_name=spec.graph_name or t.graph_name,
        )
    return replace(
        spec, min_shape=tuple(max(d, 0) for d in spec.shape), max_shape=tuple(spec.shape)
    )


def _pack_specs(metadata: dict[str, str]) -> tuple[list[dict], list[dict]] | None:
    if INPUTS_KEY not in metadata or OUTPUTS_KEY not in metadata:
        return None
    try:
        inputs, outputs = json.loads(metadata[INPUTS_KEY]), json.loads(metadata[OUTPUTS_KEY])
    except ValueError:
        return None
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        return None
    return inputs, outputs


def served_specs(
    metadata: dict[str, str], wrapper: WrapperInfo | None
) -> tuple[list[TensorSpec], list[TensorSpec], str]:
    """(inputs, outputs, where they came from) as the daemon serves them.

    Names are ``aotiserve pack``'s where it recorded them, else ``input__<i>`` /
    ``output__<i>`` (Triton's convention: the container's own names, e.g. ``arg5_1``,
    mean nothing to a caller; they stay in ``graph_name``).
    """
    packed = _pack_specs(metadata)
    w_in = list(wrapper.inputs) if wrapper else []
    w_out = list(wrapper.outputs) if wrapper else []
    if packed is not None:
        ins = [TensorSpec.from_dict(d) for d in packed[0]]
        outs = [TensorSpec.from_dict(d) for d in packed[1]]
        ins = [_with_bounds(s, w_in[i] if i < len(w_in) else None) for i, s in enumerate(ins)]
        outs = [
            replace(s, graph_name=s.graph_name or (w_out[i].graph_name if i < len(w_out) else ""))
            for i, s in enumerate(outs)
        ]
        return ins, outs, SOURCE_PACK
    if wrapper is None:
        return [], [], SOURCE_NONE
    return (
        [_from_wrapper(t, f"input__{i}") for i, t in enumerate(w_in)],
        [_from_wrapper(t, f"output__{i}") for i, t in enumerate(w_out)],
        SOURCE_WRAPPER,
    )


def specs_json(specs: Sequence[TensorSpec]) -> str:
    """The specs as the JSON list ``aotiserve pack`` records (plus bounds and graph names)."""
    return json.dumps([s.to_dict() for s in specs])
