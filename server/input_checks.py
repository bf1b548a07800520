"""What a model accepts as inputs, checked before a run, and what a failed run means.

Each error names the offending input (``input 1 ('mask')``) and says what the
model takes, so the caller can fix the request without reading the package.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch

from . import io_specs
from . import tensor_codec as codec
from .errors import Internal, InvalidArgument, ServeError
from .io_specs import IOSpec
from .log_limit import OncePerInterval

log = logging.getLogger(__name__)
# A model failing inside its run is logged once a minute per model after the first
# (a caller can make it fail at will).
_failures = OncePerInterval()


def input_label(i: int, spec: IOSpec | None) -> str:
    return f"input {i} ({spec.name!r})" if spec is not None else f"input {i}"


class InputPlan:
    """What each run checks of a model's inputs, worked out once per model load:
    error labels, and per input (dtype, exact shape) for a one-comparison accept."""

    __slots__ = ("specs", "labels", "fast", "ties")

    def __init__(self, specs: Sequence[IOSpec], ties: io_specs.Ties = ()):
        self.specs = specs
        self.ties = ties
        self.labels = [input_label(i, s) for i, s in enumerate(specs)]
        self.fast = [
            (
                s.dtype,
                tuple(s.shape) if s.shape is not None and all(d >= 0 for d in s.shape) else None,
            )
            for s in specs
        ]

    def label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else input_label(i, None)


def validate_inputs(model: str, plan: InputPlan, inputs: Sequence[torch.Tensor]) -> None:
    """Refuses inputs the model does not take (count, dtype, shape, dynamic-dim bounds)."""
    specs = plan.specs
    if len(inputs) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InvalidArgument(
            f"model {model!r} takes {len(specs)} inputs ({names}), got {len(inputs)}"
        )
    for i, (t, spec, (dtype, shape)) in enumerate(zip(inputs, specs, plan.fast)):
        if shape is not None and t.dtype == dtype and t.shape == shape:
            continue  # the common case: exactly what the model declares
        if spec.dtype is not None and t.dtype != spec.dtype:
            raise InvalidArgument(
                f"{input_label(i, spec)}: dtype must be "
                f"{codec.dtype_name(spec.dtype)}, got {codec.dtype_name(t.dtype)}"
            )
        if spec.shape is None:
            continue
        if t.dim() != len(spec.shape):
            raise InvalidArgument(
                f"{input_label(i, spec)}: expected {len(spec.shape)} "
                f"dimensions {list(spec.shape)}, got shape {list(t.shape)}"
            )
        for d, (got, want) in enumerate(zip(t.shape, spec.shape)):
            if want >= 0 and got != want:
                raise InvalidArgument(
                    f"{input_label(i, spec)}: dimension {d} must be {want} "
                    f"(shape {list(spec.shape)}), got shape {list(t.shape)}"
                )
        # The package's dynamic-dim guards, checked here so the caller learns what the
        # model accepts and how to change that (the runner's own message says neither).
        if spec.min_shape is not None or spec.max_shape is not None:
            why = io_specs.check_bounds(input_label(i, spec), spec, t.shape)
            if why is not None:
                raise InvalidArgument(why)
    if plan.ties:
        why = io_specs.check_ties(plan.ties, [t.shape for t in inputs], plan.label)
        if why is not None:
            raise InvalidArgument(f"model {model!r}: {why}")


_TIED = re.compile(r"expected size (\d+)==(\d+), stride \d+==\d+ at dim=(\d+)")


def tied_dims(msg: str, inputs: Sequence[torch.Tensor], specs: Sequence[IOSpec]) -> str | None:
    """AOTInductor's guard on a dimension that several inputs share says only "expected
    size 2==3, stride 1==1 at dim=0" (naming no input): which inputs disagree there, or
    None when ``msg`` is not that guard (the port says the same: runner_ext/csrc/port.cpp)."""
    m = _TIED.search(msg)
    if m is None or m[1] == m[2]:
        return None
    got, want, dim = int(m[1]), int(m[2]), int(m[3])
    odd, even = [], []
    for i, t in enumerate(inputs):
        if t.dim() <= dim:
            continue
        n = int(t.shape[dim])
        label = f"{input_label(i, specs[i] if i < len(specs) else None)} has {n}"
        (even if n == want and n != got else odd).append(label)
    if not odd:
        return None
    tail = f"; {', '.join(even)}" if even else ""
    return (
        f"dimension {dim} must be the same size in inputs the model ties together: "
        f"{', '.join(odd)}{tail} (the model expected {want})"
    )


def run_error(
    model: str,
    exc: Exception,
    inputs: Sequence[torch.Tensor] = (),
    specs: Sequence[IOSpec] = (),
) -> ServeError:
    """The error a runner's exception stands for: the caller's inputs, or our fault."""
    msg = str(exc).split("\nException raised from")[0].strip()
    tied = tied_dims(msg, inputs, specs)
    if tied is not None:
        return InvalidArgument(f"model {model!r} rejected the inputs: {tied}")
    # Shape guards name the input; bounds checks fire on input values (an embedding
    # id past the table): both are the caller's to fix.
    if isinstance(exc, ValueError) or "input" in msg.lower() or "out of bounds" in msg.lower():
        return InvalidArgument(f"model {model!r} rejected the inputs: {msg}")
    _failures.note(
        model, lambda more: log.error("model %r: run failed%s", model, more, exc_info=exc)
    )
    return Internal(f"model {model!r} failed to run; see the server log")
