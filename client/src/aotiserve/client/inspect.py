"""``aotiserve inspect PATH.pt2``: what a package holds and what a user should act on.

No daemon and no torch: the zip, its metadata and its generated wrapper source
(:mod:`aotiserve.client.pt2`). Per model: the device it was compiled for, the
torch version (recorded by ``aotiserve pack``; otherwise a hint), inputs and
outputs as the daemon serves them (dtypes, shapes, dynamic bounds), constants
(dtype, shape, bytes, swappable or computed at run time), whether weights were
folded into code at compile time (DESIGN.md's runtime-constant-folding trap), and
warnings. ``--weights FILE.safetensors`` names the folded weights: the file's
tensors that are no constant of the package.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from typing import Any

from aotiserve.client import pt2
from aotiserve.client.dtypes import BY_TORCH_NAME

_PLATFORM_KEYS = ("AOTI_PLATFORM", "AOTI_MACHINE", "AOTI_CPU_ISA", "AOTI_COMPUTE_CAPABILITY")
# How torch's version shows in a package torch made alone (no metadata records it).
_GET_LAST_ERROR = "AOTInductorGetLastError"

LOWERBOUND_FIX = (
    'recompile with inductor_configs={"aot_inductor.check_lowerbound": False} '
    "or with aotiserve.server.packaging.pack"
)
FOLDING_FIX = (
    'recompile with inductor_configs={"aot_inductor.use_runtime_constant_folding": '
    "True} or with aotiserve.server.packaging.pack"
)
# The largest safetensors header read (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


class InspectError(ValueError):
    """A file inspect cannot read."""


def safetensors_names(path: str | os.PathLike) -> list[str]:
    """Tensor names of a safetensors file (its JSON header only; no tensor data read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise InspectError(f"{path}: not a safetensors file (shorter than its header)")
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                raise InspectError(f"{path}: not a safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise InspectError(f"{path}: cannot read safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise InspectError(f"{path}: not a safetensors file")
    return sorted(k for k in header if k != "__metadata__")


def _nbytes(dtype: str | None, shape: Sequence[int]) -> int | None:
    d = BY_TORCH_NAME.get(dtype or "")
    return math.prod(shape) * d.itemsize if d else None


def _torch_version(model: pt2.PackageModel) -> tuple[str | None, str]:
    recorded = model.metadata.get(pt2.TORCH_VERSION_KEY)
    if recorded:
        return recorded, "recorded by aotiserve pack"
    if model.wrapper is None:
        return None, "not recorded, and the package holds no generated source to tell"
    if _GET_LAST_ERROR in model.wrapper.features:
        return None, f"not recorded; 2.13 or later, as the wrapper defines {_GET_LAST_ERROR}"
    return None, f"not recorded; older than 2.13, as the wrapper lacks {_GET_LAST_ERROR}"


def _constants(model: pt2.PackageModel) -> list[dict[str, Any]]:
    out = []
    for c in model.wrapper.constants if model.wrapper else ():
        runtime = c.from_folded or c.kind == "FoldedConstant"
        out.append(
            {
                "name": c.name,
                "fqn": c.fqn,
                "dtype": c.dtype,
                "shape": list(c.shape),
                "bytes": _nbytes(c.dtype, c.shape),
                "kind": c.kind,
                # Computed at run time from the others (runtime constant folding): never sent.
                "computed_at_run_time": runtime,
                "swappable": not runtime,
            }
        )
    return out


def _warnings(
    model: pt2.PackageModel,
    inputs: list[pt2.TensorSpec],
    outputs: list[pt2.TensorSpec],
    folded: dict[str, Any],
) -> list[str]:
    warns = []
    if model.wrapper is None:
        warns.append(
            "the package holds no generated wrapper source: unless it carries "
            "aotiserve.server.packaging.pack metadata, the daemon serves it with positional "
            "names and no dtype/shape checks of its own (the model's guards still apply)"
        )
    for spec in inputs:
        for d, lo in spec.refused_below():
            what = "a batch of 1" if d == 0 else "a size of 1"
            warns.append(
                f"input {spec.name!r} refuses sizes below {lo} in dim {d} (torch's default "
                f"check_lowerbound, even for Dim(min=1)): {what} fails; {LOWERBOUND_FIX}"
            )
    unknown = [s.name for s in outputs if s.dtype is None or s.shape is None]
    if unknown:
        warns.append(
            f"the source does not say the dtype/shape of output(s) {', '.join(unknown)}: "
            "the daemon measures them at load by running the model on zeros"
        )
    if not folded["runtime_constant_folding"] and model.wrapper is not None:
        names = folded["names"]
        which = (
            f"these weights are folded: {', '.join(names)}"
            if names
            else "no weight of the file given is folded"
            if names is not None
            else "which ones the package does not record (pass --weights FILE.safetensors "
            "to name them)"
        )
        warns.append(
            "compiled without runtime constant folding: weights the compiler could "
            "fold are baked into the code, and a weight swap silently keeps their "
            f"compile-time values; {which}; {FOLDING_FIX}"
        )
    return warns


def _folded(
    model: pt2.PackageModel, constants: list[dict[str, Any]], weights: Sequence[str] | None
) -> dict[str, Any]:
    rcf = model.wrapper.runtime_constant_folding if model.wrapper else None
    names = None
    if weights is not None:
        known = {c["fqn"] for c in constants} | {c["name"] for c in constants}
        names = [w for w in weights if w not in known]
    return {"runtime_constant_folding": rcf, "names": names}


def inspect_model(model: pt2.PackageModel, weights: Sequence[str] | None = None) -> dict[str, Any]:
    inputs, outputs, source = pt2.served_specs(model.metadata, model.wrapper)
    version, version_note = _torch_version(model)
    constants = _constants(model)
    folded = _folded(model, constants, weights)
    w = model.wrapper
    return {
        "name": model.name,
        "device": model.device,
        "platform": {k: model.metadata[k] for k in _PLATFORM_KEYS if model.metadata.get(k)},
        "torch_version": version,
        "torch_version_note": version_note,
        "interface_from": source,
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "constants": constants,
        "swappable": [c["fqn"] for c in constants if c["swappable"]],
        "folded_at_compile_time": folded,
        # Only meaningful where some input has a dynamic dim.
        "check_lowerbound": (
            w.lowerbound_checks
            if w and any(d < 0 for s in inputs for d in (s.shape or ()))
            else None
        ),
        "weights_stored": model.weights_location,
        "call_spec": {"in_spec": w.in_spec, "out_spec": w.out_spec} if w else None,
        "metadata": {
            k: v for k, v in model.metadata.items() if not k.startswith(("AOTI_", "aotiserve."))
        },
        "wrapper_source": model.wrapper_file,
        "warnings": _warnings(model, inputs, outputs, folded),
    }


def inspect_package(
    path: str | os.PathLike, weights_file: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Everything ``aotiserve inspect`` reports, as a JSON-ready dict."""
    weights = safetensors_names(weights_file) if weights_file else None
    try:
        models = pt2.read_models(path)
    except pt2.Pt2Error as exc:
        raise InspectError(str(exc)) from exc
    return {"path": str(path), "models": [inspect_model(m, weights) for m in models]}


# ---------------------------------------------------------------- text


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _dims(spec: dict[str, Any]) -> str:
    if spec.get("shape") is None:
        return "?"
    return "[" + ", ".join(str(d) for d in spec["shape"]) + "]"


def _accepts(spec: dict[str, Any]) -> str:
    shape, lo, hi = spec.get("shape"), spec.get("min_shape"), spec.get("max_shape")
    if shape is None or lo is None or hi is None or all(d >= 0 for d in shape):
        return ""
    dims = [str(s) if s >= 0 else f"{a}..{b if b >= 0 else ''}" for s, a, b in zip(shape, lo, hi)]
    return "accepts [" + ", ".join(dims) + "]"


def _table(rows: list[list[str]], indent: str = "    ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render(report: dict[str, Any]) -> str:
    models = report["models"]
    lines = [f"{report['path']}: {len(models)} model{'s' if len(models) != 1 else ''}"]
    for m in models:
        platform = ", ".join(m["platform"].values())
        lines.append("")
        lines.append(
            f"model {m['name']!r}: compiled for {m['device'] or '?'}"
            + (f" ({platform})" if platform else "")
        )
        lines.append(f"  torch: {m['torch_version'] or '?'} ({m['torch_version_note']})")
        lines.append(f"  interface from: {m['interface_from']}")
        for kind in ("inputs", "outputs"):
            lines.append(f"  {kind}:")
            lines += _table(
                [
                    [
                        s["name"],
                        s.get("dtype") or "?",
                        _dims(s),
                        _accepts(s),
                        f"({s['graph_name']})" if s.get("graph_name") else "",
                    ]
                    for s in m[kind]
                ]
            ) or ["    (unknown)"]
        consts = m["constants"]
        total = sum(c["bytes"] or 0 for c in consts)
        lines.append(
            f"  constants: {len(consts)}, {_size(total)}, stored in the "
            f"{m['weights_stored']}; {len(m['swappable'])} swappable"
        )
        lines += _table(
            [
                [
                    c["fqn"],
                    c["dtype"] or "?",
                    "[" + ", ".join(map(str, c["shape"])) + "]",
                    _size(c["bytes"]),
                    "swappable" if c["swappable"] else "computed at run time",
                ]
                for c in consts
            ]
        )
        folded = m["folded_at_compile_time"]
        rcf = folded["runtime_constant_folding"]
        lines.append(
            "  runtime constant folding: "
            + ("?" if rcf is None else "on" if rcf else "off (weights may be folded into code)")
        )
        if folded["names"]:
            lines.append(f"  folded into code: {', '.join(folded['names'])}")
        if m["check_lowerbound"] is not None:
            lines.append(
                f"  dynamic-dim lower-bound guard: {'on' if m['check_lowerbound'] else 'off'}"
            )
        if m["metadata"]:
            lines.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in m["metadata"].items()))
        if m["warnings"]:
            lines.append("  warnings:")
            lines += [f"    - {w}" for w in m["warnings"]]
    return "\n".join(lines)
