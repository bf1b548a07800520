"""Dynamic batching: concurrent runs of one model coalesced into one run.

Off by default (``--batch-max-size``, or ``batch_max_size`` in a model's
config file). Only for models whose every input and output has a dynamic
first dimension (the batch): their requests are concatenated along it, run
once, and the outputs split back, so each caller gets exactly the rows of its
own inputs.

No batching thread: the first request to arrive leads a batch. While other
runs of the model are in flight it waits, up to ``max_delay_s``, for more to
join (a batch closes early once ``max_size`` rows are in); alone, it runs at
once, so a lone client pays no delay. Requests join only a batch whose inputs
have the same dtypes and the same shapes past the first dimension. If a
batched run fails, each request is run on its own, so a bad request fails
alone and the others still get their answers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

# execute(inputs, ctx) runs the model once; ctx is the request's own (deadline, call...):
# a batched run uses its leader's, a request run alone its own.
Execute = Callable[[list[torch.Tensor], Any], tuple[list[torch.Tensor], str]]


@dataclass
class _Request:
    inputs: list[torch.Tensor]
    rows: int
    ctx: Any
    result: tuple[list[torch.Tensor], str] | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class _Batch:
    key: tuple
    members: list[_Request] = field(default_factory=list)
    rows: int = 0
    closed: bool = False


def _key(inputs: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.dtype, tuple(t.shape[1:])) for t in inputs)


class Batcher:
    def __init__(self, max_size: int, max_delay_s: float):
        if max_size < 2:
            raise ValueError(f"a batch needs at least 2 rows, got max_size={max_size}")
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self._cond = threading.Condition()
        self._open: _Batch | None = None
        self.batches = 0  # runs made for more than one request (for tests and logs)

    def run(self, inputs: list[torch.Tensor], ctx: Any, execute: Execute,
            others_in_flight: Callable[[], bool]) -> tuple[list[torch.Tensor], str]:
        """This request's (outputs, weights version); ``execute`` runs the model once."""
        rows = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 0
        if not inputs or rows == 0 or rows >= self.max_size:
            return execute(inputs, ctx)
        request = _Request(inputs, rows, ctx)
        key = _key(inputs)
        with self._cond:
            batch = self._open
            if (batch is not None and not batch.closed and batch.key == key
                    and batch.rows + rows <= self.max_size):
                batch.members.append(request)
                batch.rows += rows
                if batch.rows >= self.max_size:
                    self._close(batch)
                while not request.done:
                    self._cond.wait()
                if request.error is not None:
                    raise request.error
                return request.result
            batch = _Batch(key, [request], rows)
            if others_in_flight():
                self._open = batch  # others may join while we wait
                deadline = time.monotonic() + self.max_delay_s
                while not batch.closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._close(batch)
        self._lead(batch, execute)
        if request.error is not None:
            raise request.error
        return request.result

    def _close(self, batch: _Batch) -> None:
        batch.closed = True
        if self._open is batch:
            self._open = None
        self._cond.notify_all()

    def _lead(self, batch: _Batch, execute: Execute) -> None:
        members = batch.members
        try:
            if len(members) == 1:
                self._run_alone(members[0], execute)
                return
            try:
                joined = [torch.cat([m.inputs[i] for m in members])
                          for i in range(len(members[0].inputs))]
                outputs, version = execute(joined, members[0].ctx)
                sizes = [m.rows for m in members]
                parts = [torch.split(o, sizes) for o in outputs]
                for j, m in enumerate(members):
                    m.result = ([p[j] for p in parts], version)
                self.batches += 1
            except Exception:  # noqa: BLE001 (each request then gets its own answer or error)
                for m in members:
                    self._run_alone(m, execute)
        finally:
            with self._cond:
                for m in members:
                    if m.result is None and m.error is None:
                        m.error = RuntimeError("the batched run ended without a result")
                    m.done = True
                self._cond.notify_all()

    @staticmethod
    def _run_alone(request: _Request, execute: Execute) -> None:
        try:
            request.result = execute(request.inputs, request.ctx)
        except BaseException as exc:  # noqa: BLE001 (handed to the request's own caller)
            request.error = exc


def batchable(inputs: Sequence, outputs: Sequence) -> str | None:
    """None if a model with these IO specs can be batched, else why not."""
    for kind, specs in (("input", inputs), ("output", outputs)):
        if not specs:
            return f"it declares no {kind}s"
        for spec in specs:
            if spec.shape is None:
                return f"{kind} {spec.name!r} has no recorded shape"
            if not spec.shape or spec.shape[0] != -1:
                return f"{kind} {spec.name!r} has no dynamic first dimension (shape {list(spec.shape)})"
    return None
