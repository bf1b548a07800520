"""Dynamic batching: concurrent runs of one model coalesced into one run, for the models
the port's hot path leaves to Python (XPU/MPS); the port batches the runs it answers
itself, in C++ with the same policy (runner_ext/csrc/batcher.cpp).

Off by default (``--batch-max-size``, or ``batch_max_size`` in a model's
config file). Only for models whose every input and output has a dynamic
first dimension (the batch): their requests are concatenated along it, run
once, and the outputs split back, so each caller gets exactly the rows of its
own inputs.

No batching thread: the first request to arrive leads a batch, which stays
open while the leader waits for a free runner (under load requests queue
anyway: they join instead). Holding a runner, the leader waits up to
``max_delay_s`` for more rows if other runs of the model are in flight, then
closes the batch (at once if ``max_size`` rows are in); alone, it runs at
once, so a lone client pays no delay. Requests join only a batch whose inputs
have the same dtypes and the same shapes past the first dimension. If a
batched run fails, each request is run on its own, so a bad request fails
alone and the others still get their answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# execute(get_inputs, ctx) runs the model once: it calls get_inputs() once it holds a
# runner and runs what that returns. ctx is the request's own (deadline, call...): a
# batched run goes with its leader's, a request run alone with its own.
Execute = Callable[[Callable[[], list[torch.Tensor]], Any], tuple[list[torch.Tensor], str]]


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
    """A batch stays open while its leader waits for a runner: under load, requests
    queue anyway, and they join instead of queueing one by one."""

    def __init__(self, max_size: int, max_delay_s: float):
        if max_size < 2:
            raise ValueError(f"a batch needs at least 2 rows, got max_size={max_size}")
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self._cond = threading.Condition()
        self._open: _Batch | None = None
        self.batches = 0  # runs made for more than one request (for tests and logs)

    def run(
        self,
        inputs: list[torch.Tensor],
        ctx: Any,
        execute: Execute,
        others_in_flight: Callable[[], bool],
    ) -> tuple[list[torch.Tensor], str]:
        """This request's (outputs, weights version)."""
        rows = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 0
        if not inputs or rows == 0 or rows >= self.max_size:
            return execute(lambda: inputs, ctx)
        request = _Request(inputs, rows, ctx)
        key = _key(inputs)
        with self._cond:
            batch = self._open
            if (
                batch is not None
                and not batch.closed
                and batch.key == key
                and batch.rows + rows <= self.max_size
            ):
                batch.members.append(request)  # follow: the leader runs it
                batch.rows += rows
                if batch.rows >= self.max_size:
                    self._close(batch)
                while not request.done:
                    self._cond.wait()
            else:
                batch = _Batch(key, [request], rows)
                self._open = batch
        if not request.done:
            self._lead(batch, execute, others_in_flight)
        if request.error is not None:
            raise request.error
        return request.result

    def _close(self, batch: _Batch) -> None:
        batch.closed = True
        if self._open is batch:
            self._open = None
        self._cond.notify_all()

    def _seal(self, batch: _Batch, others_in_flight: Callable[[], bool]) -> list[torch.Tensor]:
        """Called by the leader holding a runner: with other runs in flight it waits up to
        the delay for the batch to fill, then closes it; returns the inputs to run."""
        with self._cond:
            if not batch.closed and others_in_flight():
                deadline = time.monotonic() + self.max_delay_s
                while not batch.closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            self._close(batch)
        members = batch.members
        if len(members) == 1:
            return members[0].inputs
        return [torch.cat([m.inputs[i] for m in members]) for i in range(len(members[0].inputs))]

    def _lead(self, batch: _Batch, execute: Execute, others_in_flight: Callable[[], bool]) -> None:
        leader = batch.members[0]
        try:
            try:
                outputs, version = execute(lambda: self._seal(batch, others_in_flight), leader.ctx)
            except Exception as exc:  # noqa: BLE001 (each request gets its own answer)
                with self._cond:
                    self._close(batch)  # refused before it ran (queue, deadline): seal it
                if len(batch.members) == 1:
                    leader.error = exc
                    return
                for m in batch.members:
                    self._run_alone(m, execute)
                return
            members = batch.members
            if len(members) == 1:
                leader.result = (outputs, version)
                return
            sizes = [m.rows for m in members]
            parts = [torch.split(o, sizes) for o in outputs]
            for j, m in enumerate(members):
                m.result = ([p[j] for p in parts], version)
            self.batches += 1
        finally:
            with self._cond:
                for m in batch.members:
                    if m.result is None and m.error is None:
                        m.error = RuntimeError("the batched run ended without a result")
                    m.done = True
                self._cond.notify_all()

    @staticmethod
    def _run_alone(request: _Request, execute: Execute) -> None:
        try:
            request.result = execute(lambda: request.inputs, request.ctx)
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
                return (
                    f"{kind} {spec.name!r} has no dynamic first dimension "
                    f"(shape {list(spec.shape)})"
                )
    return None
