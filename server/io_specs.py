"""A served model's inputs and outputs, from its package, for every ``.pt2``.

Where they come from (see docs/server.md, "Which inputs a model takes"):
1. ``aotiserve pack`` metadata in the package (names, dtypes, shapes), with the
   dynamic dims' bounds read from the generated wrapper source;
2. else the generated wrapper source that every ``aoti_compile_and_package``
   package holds (``aotiserve.client.pt2``): dtypes, shapes, bounds, and the
   outputs' dtypes and shapes where the code allocates them plainly;
3. outputs the source leaves open are measured: the model runs on zero inputs
   shaped from the input specs (twice, at two sizes, when a dim is dynamic, to tell
   dynamic output dims from static ones);
4. a package without wrapper source (or a bare ``.so``): positional names and no
   dtypes or shapes; the runner's own guards are then the only check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from aotiserve.client import pt2

from . import tensor_codec as codec

log = logging.getLogger(__name__)

# The recompile advice for a dynamic dim that refuses sizes below 2.
LOWERBOUND_HINT = (
    "torch's default dynamic-dim guard (aot_inductor.check_lowerbound) refuses sizes below 2, "
    'even for Dim(min=1); recompile with inductor_configs={"aot_inductor.check_lowerbound": '
    "False}, or with aotiserve.server.packaging.pack (which does), to accept them"
)


@dataclass(frozen=True)
class IOSpec:
    """A model input or output. ``dtype``/``shape`` are None where unknown; -1 = dynamic dim.

    ``min_shape``/``max_shape``: the sizes each dim accepts (the package's guards);
    ``max_shape`` -1 = no upper bound; None where unknown.
    """

    name: str
    dtype: torch.dtype | None
    shape: tuple[int, ...] | None
    min_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None

    def bounds_text(self) -> str:
        """e.g. "[2..1024, 64]": what each dim accepts ("*": dynamic, bounds unknown)."""
        if self.shape is None:
            return "any shape"
        dims = []
        for d, s in enumerate(self.shape):
            if s >= 0:
                dims.append(str(s))
                continue
            if self.min_shape is None and self.max_shape is None:
                dims.append("*")
                continue
            lo = self.min_shape[d] if self.min_shape else 0
            hi = self.max_shape[d] if self.max_shape else -1
            dims.append(f"{lo}..{hi if hi >= 0 else ''}")
        return f"[{', '.join(dims)}]"

    def refused_below(self) -> list[tuple[int, int]]:
        """(dim, smallest size) for each dynamic dim whose guard refuses sizes below 2."""
        if self.shape is None or self.min_shape is None:
            return []
        return [
            (d, lo)
            for d, (s, lo) in enumerate(zip(self.shape, self.min_shape))
            if s < 0 and lo >= 2
        ]

    def to_client(self) -> pt2.TensorSpec:
        return pt2.TensorSpec(
            self.name,
            codec.dtype_name(self.dtype) if self.dtype else None,
            self.shape,
            self.min_shape,
            self.max_shape,
        )


def _torch_dtype(name: str | None) -> torch.dtype | None:
    value = getattr(torch, name or "", None)
    return value if isinstance(value, torch.dtype) else None


def from_client(spec: pt2.TensorSpec) -> IOSpec:
    return IOSpec(spec.name, _torch_dtype(spec.dtype), spec.shape, spec.min_shape, spec.max_shape)


def positional(num_inputs: int, num_outputs: int) -> tuple[list[IOSpec], list[IOSpec]]:
    return (
        [IOSpec(f"input__{i}", None, None) for i in range(num_inputs)],
        [IOSpec(f"output__{i}", None, None) for i in range(num_outputs)],
    )


def complete(spec: IOSpec) -> bool:
    return spec.dtype is not None and spec.shape is not None


Ties = tuple[tuple[tuple[int, int], ...], ...]  # groups of (input, dim) of one size


def from_package(
    path: str, model_name: str, metadata: dict[str, str], num_inputs: int, num_outputs: int
) -> tuple[list[IOSpec], list[IOSpec], str, Ties]:
    """(inputs, outputs, source, ties) of one model of a package (steps 1, 2 and 4 above);
    ties: the input dims the model gives one size (from its wrapper source; none known
    without it)."""
    wrapper = None
    if path.endswith(".pt2"):
        try:
            wrapper = pt2.read_model(path, model_name).wrapper
        except pt2.Pt2Error as exc:
            log.warning("model package %s: cannot read its wrapper source: %s", path, exc)
    ins, outs, source = pt2.served_specs(metadata, wrapper)
    if len(ins) != num_inputs or len(outs) != num_outputs:
        if source != pt2.SOURCE_NONE:
            log.warning(
                "model %r of %s: its %s describes %d inputs and %d outputs, the model "
                "has %d and %d; serving it without specs",
                model_name,
                path,
                source,
                len(ins),
                len(outs),
                num_inputs,
                num_outputs,
            )
        return (*positional(num_inputs, num_outputs), pt2.SOURCE_NONE, ())
    ties = wrapper.ties if wrapper is not None else ()
    return [from_client(s) for s in ins], [from_client(s) for s in outs], source, ties


def check_ties(ties: Ties, shapes: Sequence[Sequence[int]], label) -> str | None:
    """Why ``shapes`` break one of the model's ties (None: they don't); ``label(i)`` names
    input i. The port checks the same (runner_ext/csrc/port.cpp)."""
    for group in ties:
        sizes = [(i, d, shapes[i][d]) for i, d in group if i < len(shapes) and d < len(shapes[i])]
        if len({n for _i, _d, n in sizes}) > 1:
            parts = ", ".join(f"{label(i)} dimension {d} is {n}" for i, d, n in sizes)
            return f"the model gives these dimensions one size, but {parts}"
    return None


def representative_inputs(
    specs: Sequence[IOSpec], dynamic_size: int | None = None
) -> list[torch.Tensor] | None:
    """Zero host tensors every guard accepts (None where a spec is incomplete).

    A dynamic dim takes ``dynamic_size`` clamped into its bounds, by default its
    smallest accepted size (at least 1). Zeros are valid indices and values for
    every dtype.
    """
    tensors = []
    for spec in specs:
        if not complete(spec):
            return None
        dims = []
        for d, s in enumerate(spec.shape):
            if s >= 0:
                dims.append(s)
                continue
            lo = max(spec.min_shape[d] if spec.min_shape else 0, 1)
            hi = spec.max_shape[d] if spec.max_shape and spec.max_shape[d] >= 0 else None
            size = max(lo, dynamic_size if dynamic_size is not None else lo)
            dims.append(min(size, hi) if hi is not None else size)
        tensors.append(torch.zeros(dims, dtype=spec.dtype))
    return tensors


# Warm-up sizes of a dynamic dim on a GPU: the smallest accepted, and a small batch, since
# CUDA libraries take other paths (and allocate other state) for one row than for several
# (cuBLASLt for a GEMM of several rows). On the CPU the smallest alone.
WARM_UP_SIZES = (None, 8)


def warm_up_inputs(specs: Sequence[IOSpec], on_gpu: bool = True) -> list[list[torch.Tensor]]:
    """Inputs for warm-up runs: :func:`representative_inputs` at each of
    :data:`WARM_UP_SIZES` (at the smallest size alone unless ``on_gpu``; one set for a model
    without dynamic dims); [] where a spec is incomplete."""
    sets: dict[tuple, list[torch.Tensor]] = {}  # by the inputs' shapes: each set once
    for size in WARM_UP_SIZES if on_gpu else WARM_UP_SIZES[:1]:
        tensors = representative_inputs(specs, size)
        if tensors is None:
            return []
        sets.setdefault(tuple(t.shape for t in tensors), tensors)
    return list(sets.values())


def _has_dynamic(specs: Sequence[IOSpec]) -> bool:
    return any(d < 0 for s in specs for d in (s.shape or ()))


def probe_outputs(
    inputs: Sequence[IOSpec],
    outputs: Sequence[IOSpec],
    run: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
) -> list[IOSpec]:
    """Outputs completed by running the model (step 3 above); unchanged where it fails."""
    first = representative_inputs(inputs)
    if first is None or all(complete(o) for o in outputs):
        return list(outputs)
    try:
        runs = [list(run(first))]
        if _has_dynamic(inputs):
            second = representative_inputs(
                inputs,
                max(
                    t.shape[d]
                    for t, s in zip(first, inputs)
                    for d, n in enumerate(s.shape)
                    if n < 0
                )
                + 1,
            )
            if second is not None:
                runs.append(list(run(second)))
    except Exception as exc:  # noqa: BLE001 (a model that refuses zeros is still served)
        log.warning(
            "measuring the outputs on zero inputs failed (%s); their specs stay unknown",
            str(exc).split("\n")[0],
        )
        return list(outputs)
    done = []
    for i, spec in enumerate(outputs):
        if complete(spec) or any(len(r) <= i for r in runs):
            done.append(spec)
            continue
        shapes = [tuple(r[i].shape) for r in runs]
        if len({len(s) for s in shapes}) != 1:
            done.append(spec)
            continue
        # A dim that changed between the runs is dynamic; so is one that came out empty
        # (on zeros a data-dependent size such as nonzero()'s is 0, never a real constant).
        shape = tuple(
            d if d > 0 and all(s[k] == d for s in shapes) else -1 for k, d in enumerate(shapes[0])
        )
        done.append(
            IOSpec(spec.name, runs[0][i].dtype, shape, tuple(max(d, 0) for d in shape), shape)
        )
    return done


def check_bounds(label: str, spec: IOSpec, shape: Sequence[int]) -> str | None:
    """Why ``shape`` (of ``spec``'s rank) is outside what the model's guards accept, or None."""
    for d, got in enumerate(shape):
        if spec.shape[d] >= 0:
            continue
        lo = spec.min_shape[d] if spec.min_shape else 0
        hi = spec.max_shape[d] if spec.max_shape else -1
        if got < lo:
            why = (
                LOWERBOUND_HINT
                if lo == 2
                else f"the model was exported with a minimum of {lo} for this dim"
            )
            return (
                f"{label}: dimension {d} is {got}, below the smallest size the model accepts "
                f"({lo}; shape {spec.bounds_text()}); {why}"
            )
        if 0 <= hi < got:
            return (
                f"{label}: dimension {d} is {got}, above the largest size the model accepts "
                f"({hi}; shape {spec.bounds_text()}); split the request or recompile the "
                "model with a larger maximum for this Dim"
            )
    return None


def log_lower_bounds(model: str, inputs: Sequence[IOSpec]) -> None:
    """One line per input whose dynamic dims refuse sizes below 2 (said at load)."""
    for spec in inputs:
        refused = spec.refused_below()
        if refused:
            dims = ", ".join(f"dim {d} >= {lo}" for d, lo in refused)
            log.warning(
                "model %r: input %r accepts only %s (shape %s); %s",
                model,
                spec.name,
                dims,
                spec.bounds_text(),
                LOWERBOUND_HINT,
            )
