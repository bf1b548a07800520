"""One pool per device: admission control in front of the runners placed on it.

The runner is called in the gRPC worker thread that handles the request (no
extra thread hop: the extension releases the GIL, so worker threads run
models in parallel). A pool lets at most ``capacity`` runs of a replica
execute at once (its number of model instances) and at most ``max_queue``
runs wait on the whole device; beyond that, RESOURCE_EXHAUSTED. A waiting run
whose deadline passes is dropped without being computed.

On CUDA each worker thread uses its own stream (its current stream), and
large inputs and every output travel through pinned host memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from .metrics import Metrics

log = logging.getLogger(__name__)

# Host tensors at least this big reach a GPU through a pinned buffer (DevicePool._to_cuda).
PIN_MIN_BYTES = 64 * 1024

# The pool whose stream the current thread has current (see DevicePool._stream).
_thread = threading.local()


class Waiter:
    """A queued run's link to its call (guarded by the pool lock)."""

    __slots__ = ("is_active", "queued")

    def __init__(self, is_active: Callable[[], bool]):
        self.is_active = is_active
        self.queued = False


class Slot:
    """Admission state of one replica inside its pool (guarded by the pool lock)."""

    def __init__(self, pool: DevicePool, capacity: int, label: str):
        self.pool = pool
        self.capacity = capacity
        self.label = label
        self.running = 0
        self.waiting = 0
        self.closed = False
        self.free = threading.Condition(pool.lock)

    @property
    def load(self) -> int:
        return self.running + self.waiting


class DevicePool:
    def __init__(self, device: str, max_queue: int, metrics: Metrics | None = None):
        self.device = torch.device(device)
        if self.device.type != "cpu" and self.device.index is None:
            self.device = torch.device(self.device.type, 0)
        self.name = str(self.device)
        self.max_queue = max_queue
        self.metrics = metrics
        self.lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self._local = threading.local()
        # Labelled children resolved once: .labels() costs microseconds per call.
        self._queue_gauge = metrics.queue_depth.labels(self.name) if metrics else None
        self._running_gauge = metrics.running.labels(self.name) if metrics else None

    def __repr__(self) -> str:
        return f"DevicePool({self.name}, running={self.running}, waiting={self.waiting})"

    def slot(self, capacity: int, label: str) -> Slot:
        return Slot(self, capacity, label)

    def close_slot(self, slot: Slot) -> None:
        with self.lock:
            slot.closed = True
            slot.free.notify_all()

    def _ended(self, slot: Slot, waiter: Waiter) -> None:
        with self.lock:  # the call ended, however it ended: wake it only if still queued
            if waiter.queued:
                slot.free.notify_all()

    @contextmanager
    def admit(self, slot: Slot, deadline: float | None = None, call: Any = None) -> Iterator[float]:
        """Holds one of the slot's runners; yields the seconds spent waiting.

        ``deadline`` is a ``time.monotonic()`` instant. ``call`` (a gRPC context:
        ``is_active``, ``add_callback``) drops a queued run as soon as its call is
        cancelled, instead of computing it for nobody.
        """
        start = time.monotonic()
        if deadline is not None and deadline <= start:
            # It waited in front of the pool (gRPC's worker queue, the model lock) until
            # nobody waits for the answer any more.
            raise DeadlineExceeded(
                f"deadline passed before the run reached {self.name}; not computed"
            )
        with self.lock:
            if slot.closed:
                raise Unavailable(f"{slot.label} is unloading")
            if slot.running >= slot.capacity or slot.waiting:
                if self.waiting >= self.max_queue:
                    raise ResourceExhausted(
                        f"queue of {self.name} is full ({self.max_queue} waiting); retry later"
                    )
                self.waiting += 1
                slot.waiting += 1
                self._gauge_queue()
                waiter = None
                if call is not None:
                    waiter = Waiter(call.is_active)
                    waiter.queued = True
                    call.add_callback(lambda: self._ended(slot, waiter))
                left = True
                try:
                    while slot.running >= slot.capacity and not slot.closed:
                        timeout = None if deadline is None else deadline - time.monotonic()
                        if timeout is not None and timeout <= 0:
                            raise DeadlineExceeded(
                                f"deadline passed after {time.monotonic() - start:.3f}s in the "
                                f"queue of {self.name}; not computed"
                            )
                        if waiter is not None and not waiter.is_active():
                            # gRPC ends a call at its deadline too: say which it was.
                            now = time.monotonic()
                            if deadline is not None and now >= deadline - 0.1:
                                raise DeadlineExceeded(
                                    f"deadline passed after {now - start:.3f}s in the queue of "
                                    f"{self.name}; not computed"
                                )
                            raise Cancelled(
                                f"cancelled after {now - start:.3f}s in the queue "
                                f"of {self.name}; not computed"
                            )
                        slot.free.wait(timeout)
                    left = False
                finally:
                    if waiter is not None:
                        waiter.queued = False
                    self.waiting -= 1
                    slot.waiting -= 1
                    self._gauge_queue()
                    # A cancelled or expired waiter may have taken the wake-up of a freed
                    # runner: pass it on.
                    if left and slot.running < slot.capacity:
                        slot.free.notify()
                if slot.closed:
                    raise Unavailable(f"{slot.label} is unloading")
            slot.running += 1
            self.running += 1
            self._gauge_running()
        try:
            yield time.monotonic() - start
        finally:
            with self.lock:
                slot.running -= 1
                self.running -= 1
                self._gauge_running()
                slot.free.notify()

    def _gauge_queue(self) -> None:
        if self._queue_gauge is not None:
            self._queue_gauge.set(self.waiting)

    def _gauge_running(self) -> None:
        if self._running_gauge is not None:
            self._running_gauge.set(self.running)

    # Device plumbing -----------------------------------------------------

    def _stream(self):
        """This worker thread's CUDA stream for this device, made the thread's current
        stream (and device) when the thread last worked for another pool: a run needs no
        stream context (torch's current stream and device are per thread)."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device)
        if getattr(_thread, "pool", None) is not self:
            torch.cuda.set_stream(stream)  # sets the thread's device to the stream's too
            _thread.pool = self
        return stream

    def _to_cuda(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host → this device on the current stream, without blocking the thread.

        Above ``PIN_MIN_BYTES`` the bytes go through a pinned buffer from torch's caching
        host allocator (a DMA straight from it; the allocator keeps the buffer until the
        copy is done); below, a pageable copy costs less than the extra host copy.
        """
        if (
            tensor.device.type == "cuda"  # e.g. a CUDA shared-memory input: no host hop
            or tensor.numel() * tensor.element_size() < PIN_MIN_BYTES
            or tensor.is_pinned()
        ):
            return tensor.to(self.device, non_blocking=True)
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        pinned.copy_(tensor)
        return pinned.to(self.device, non_blocking=True)

    @staticmethod
    def _to_host(tensor: torch.Tensor) -> torch.Tensor:
        """Device → a pinned host tensor, queued on the current stream (sync before use)."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def execute(
        self, runner: Any, inputs: Sequence[torch.Tensor], short: bool = False
    ) -> list[torch.Tensor]:
        """Runs ``runner`` on inputs (host tensors); returns host tensors.

        ``short``: the model's runs take microseconds; on CPU they keep the GIL (its
        release and contended reacquire cost more than the parallelism buys). On CUDA
        the copies in, the run and the copies out are queued on the worker's stream and
        the thread waits once, at the end.
        """
        if self.device.type == "cpu":
            return (runner.run_holding_gil if short else runner.run)(list(inputs))
        if self.device.type == "cuda":
            stream = self._stream()
            outputs = runner.run([self._to_cuda(t) for t in inputs], stream.cuda_stream)
            host = [self._to_host(o) for o in outputs]
            stream.synchronize()
            return host
        dev_inputs = [t.to(self.device) for t in inputs]
        return [o.cpu() for o in runner.run(dev_inputs)]

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copies a host tensor to this device (synchronously)."""
        if self.device.type == "cpu":
            return tensor
        if self.device.type == "cuda":
            stream = self._stream()
            out = self._to_cuda(tensor)
            stream.synchronize()
            return out
        return tensor.to(self.device)

    def run_in_stream(self, fn: Callable[[], Any]) -> Any:
        """Calls fn on this thread's stream (CUDA), synchronizing after."""
        if self.device.type != "cuda":
            return fn()
        stream = self._stream()
        result = fn()
        stream.synchronize()
        return result


@contextmanager
def queued(stats: Any, model: str) -> Iterator[Callable[[], None]]:
    """Counts a run as queued (aotiserve_model_queued_requests) until the callable it
    yields is called, once the run holds a runner, or it leaves the queue otherwise."""
    if stats is None:
        yield lambda: None
        return
    queued = [True]

    def admitted() -> None:
        if queued[0]:
            queued[0] = False
            stats.add_load(model, 0, -1)

    stats.add_load(model, 0, 1)
    try:
        yield admitted
    finally:
        admitted()
