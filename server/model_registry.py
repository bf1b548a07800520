"""The models the daemon serves: one replica per device, weights versions, lifecycle.

A :class:`ServedModel` holds one runner container (``LoadedModel``) per
device, each admitted through its device's :class:`DevicePool`. Runs take the
model's reader/writer lock shared; weight flips (swap, rollback, direct
active updates, blob loads) take it exclusive, so every replica changes
between two requests and each response reports the version that computed it.

Weight state follows the runner's two buffers::

    active    serving now
    staged    written to the inactive buffer, not swapped in yet
    previous  in the inactive buffer after a swap: what rollback restores

Known runner hazards guarded here (torch 2.13's model container):
- swapping with an empty inactive buffer leaves the model unable to run, so
  swap needs a staged version;
- freeing an inactive buffer that has ever been the active one (its folded
  constants were computed) makes the next staging into it segfault (seen with
  sequences stage-swap-run-stage-swap-free-stage), so free releases the
  runner's memory only for a buffer that never served (a discarded stage);
  otherwise it forgets the version and keeps the memory for the next stage;
- reading a freed inactive buffer reads freed memory, so extract(inactive)
  needs a staged or previous version;
- extracting the inactive buffer before it ever got memory crashes a CUDA
  runner, so nothing extracts it while ``inactive_empty``.
"""

from __future__ import annotations

import enum
import functools
import logging
from contextlib import contextmanager
import os
import threading
import time
import tomllib
import gc
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from aotiserve import runner_ext
from aotiserve.client import pt2
from aotiserve.v1 import model_runner_pb2 as pb

from . import tensor_codec as codec
from .batching import Batcher, batchable
from .device_pool import DevicePool, Slot
from .errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from .metrics import Metrics
from . import io_specs, warmup
from .io_specs import IOSpec
from .rwlock import RWLock
from .buffer_contents import BufferContents
from .weights import FOLDED_PREFIX, INITIAL, WeightsVersion, map_sha256
from .weights_store import WeightsStore

log = logging.getLogger(__name__)


class ModelState(enum.IntEnum):
    LOADING = pb.MODEL_STATE_LOADING
    READY = pb.MODEL_STATE_READY
    UNLOADING = pb.MODEL_STATE_UNLOADING
    FAILED = pb.MODEL_STATE_FAILED


@dataclass(frozen=True)
class ConstantInfo:
    """An updatable constant: runner constant name, original FQN, dtype, shape."""

    name: str
    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return codec.numel_of(self.shape) * self.dtype.itemsize


@dataclass
class Replica:
    loaded: Any  # runner_ext.LoadedModel
    pool: DevicePool
    slot: Slot
    # (queue_seconds, compute_seconds, device_requests) children for this model and device.
    stats: Callable[[float, float], None] | None = None  # (queued s, computed s)
    # Recent compute time per run (moving average, seconds): runs shorter than a GIL
    # handoff keep the GIL (see DevicePool.execute).
    compute_avg: float = 2 * 50e-6

    @property
    def runner(self) -> Any:
        return self.loaded.runner

    @property
    def short_runs(self) -> bool:
        return self.compute_avg < SHORT_RUN_S

    def note_compute(self, seconds: float) -> None:
        self.compute_avg += (seconds - self.compute_avg) * 0.05


# A run this short costs less with the GIL held than the reacquire after releasing it
# (a thread switch under concurrent calls): measured on the tiny MLP (~20 µs), 8 clients
# got ~14% more throughput holding it. Compute-bound models stay far above this.
SHORT_RUN_S = 50e-6


@dataclass
class WeightsState:
    active: WeightsVersion
    staged: WeightsVersion | None = None
    previous: WeightsVersion | None = None
    swaps: int = 0  # parity tells which of the container's buffers is inactive
    # The inactive buffer holds no memory of its own: none yet (a model loads with one
    # buffer), or the runner freed it. Its extracted views would point at nothing valid
    # (a CUDA runner crashes reading them), so nothing extracts it then.
    inactive_empty: bool = True
    # An upload is writing into the inactive buffer (one at a time per model).
    uploading: bool = False
    # What each buffer holds per constant (partial stagings copy only what differs).
    contents: BufferContents = field(default_factory=lambda: BufferContents(()))

    @property
    def inactive_has_served(self) -> bool:
        """Whether the inactive buffer was ever active (the primary always was)."""
        return self.swaps > 0


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
    # Fill the inactive buffer with a copy of the weights at load (ServedModel.reserve_inactive).
    reserve_inactive: bool = False
    # Warm-up rounds per replica before the model turns READY (server/warmup.py; 0: off).
    warmup_runs: int = 1

    def path_for(self, device: torch.device, default: str) -> str:
        return self.device_paths.get(str(device)) or self.device_paths.get(device.type) or default


class ServedModel:
    def __init__(self, name: str, path: str, options: ModelOptions, metrics: Metrics | None):
        self.name = name
        self.path = path
        self.options = options
        self.metrics = metrics
        self.state = ModelState.LOADING
        self.error = ""
        self.replicas: list[Replica] = []
        self.metadata: dict[str, str] = {}
        self.inputs: list[IOSpec] = []
        self.outputs: list[IOSpec] = []
        self.batcher: Batcher | None = None
        self.constants: dict[str, ConstantInfo] = {}  # by original FQN
        self.constants_by_name: dict[str, ConstantInfo] = {}
        self.folded_names: set[str] = set()
        self.weights: WeightsState | None = None
        self.rw = RWLock()
        # The port's C++ hot path serving this model (port.Port), if it took it.
        self.port: Any = None
        self.weights_op = threading.Lock()  # one weight operation at a time
        self._inflight = 0
        self._idle = threading.Condition()
        # In-place uploads write (and hash) the runner's inactive buffer chunk by chunk,
        # outside weights_op; close() waits for those in progress and refuses later ones,
        # so nothing touches a freed buffer (an unload during an upload corrupted the heap).
        self._buffer_users = 0
        self._buffers_closed = False
        self._buffers = threading.Condition()

    # Loading ---------------------------------------------------------------

    def load(self, pools: Mapping[str, DevicePool]) -> None:
        try:
            for device in self.options.devices:
                pool = pools[device]
                loaded = runner_ext.load_model(
                    self.options.path_for(pool.device, self.path),
                    model_name=self.options.package_model, device=pool.device,
                    num_runners=self.options.runners)
                stats = None
                if self.metrics is not None:
                    m = self.metrics
                    stats = functools.partial(m.stats.record_run, self.name, pool.name)
                self.replicas.append(Replica(
                    loaded, pool, pool.slot(self.options.runners, f"model {self.name!r}"), stats))
            self._describe()
        except BaseException:
            self.close()
            raise

    def _describe(self) -> None:
        first = self.replicas[0]
        runner = first.runner
        self.metadata = dict(first.loaded.metadata)
        self._describe_io(first)
        fqns = runner.get_constant_names_to_original_fqns()
        live = runner.extract_constants_map(False)
        for name, fqn in fqns.items():
            tensor = live.get(fqn)
            if name.startswith(FOLDED_PREFIX) or tensor is None:
                self.folded_names.add(name)
                continue
            info = ConstantInfo(name, fqn, tensor.dtype, tuple(tensor.shape))
            self.constants[fqn] = info
            self.constants_by_name[name] = info
        self.weights = WeightsState(
            WeightsVersion(INITIAL, map_sha256(self, live), int(time.time() * 1000), "package",
                           os.path.basename(self.path)),
            contents=BufferContents(self.constants))
        self._setup_batching()

    def _describe_io(self, first: Replica) -> None:
        """Inputs and outputs from the package (io_specs), for every .pt2 alike."""
        runner = first.runner
        inputs, outputs, source = io_specs.from_package(
            first.loaded.source, first.loaded.model_name, self.metadata,
            runner.get_num_inputs(), runner.get_num_outputs())
        if not all(io_specs.complete(o) for o in outputs):
            outputs = io_specs.probe_outputs(
                inputs, outputs, lambda xs: first.pool.execute(runner, xs))
        self.inputs, self.outputs = inputs, outputs
        if source == pt2.SOURCE_NONE:
            log.warning("model %r: %s holds no input/output description (no aotiserve pack "
                        "metadata, no generated wrapper source): requests are checked by the "
                        "model's own guards only", self.name, self.path)
        else:
            # The complete specs, bounds included, where ListModels shows them (ModelInfo's
            # TensorSpec has no room for bounds).
            self.metadata[pt2.INPUTS_KEY] = pt2.specs_json([s.to_client() for s in inputs])
            self.metadata[pt2.OUTPUTS_KEY] = pt2.specs_json([s.to_client() for s in outputs])
        io_specs.log_lower_bounds(self.name, inputs)
        log.info("model %r: inputs %s, outputs %s (from the %s)", self.name,
                 ", ".join(f"{s.name} {_dtype_text(s)}{s.bounds_text()}" for s in inputs),
                 ", ".join(f"{s.name} {_dtype_text(s)}{s.bounds_text()}" for s in outputs), source)

    def _setup_batching(self) -> None:
        size = self.options.batch_max_size
        if size < 2:
            return
        why_not = batchable(self.inputs, self.outputs)
        if why_not is not None:
            log.warning("model %r: dynamic batching is off: %s", self.name, why_not)
            return
        # A batch never grows past the rows the model's guards accept in one run.
        limits = [s.max_shape[0] for s in self.inputs if s.max_shape and s.max_shape[0] >= 0]
        if limits and min(limits) < size:
            size = min(limits)
            if size < 2:
                log.warning("model %r: dynamic batching is off: it accepts %d row(s) per run",
                            self.name, size)
                return
        self.batcher = Batcher(size, self.options.batch_max_delay_us / 1e6)
        log.info("model %r: dynamic batching up to %d rows, waiting up to %d µs", self.name,
                 size, self.options.batch_max_delay_us)

    @contextmanager
    def using_buffers(self) -> Iterator[None]:
        """Holds the runners' buffers alive (no close) while an upload touches them."""
        with self._buffers:
            if self._buffers_closed:
                raise Unavailable(f"model {self.name!r} is {self.state.name.lower()}")
            self._buffer_users += 1
        try:
            yield
        finally:
            with self._buffers:
                self._buffer_users -= 1
                self._buffers.notify_all()

    def weights_snapshot(self) -> tuple:
        """Which weights the buffers hold now (compare with :meth:`check_weights`)."""
        w = self.weights
        return (w.active, w.staged, w.previous) if w is not None else ()

    def check_weights(self, snapshot: tuple) -> None:
        """Refuses to go on reading buffers whose weights changed since ``snapshot``."""
        if self.weights_snapshot() != snapshot:
            raise Aborted(f"model {self.name!r}: its weights changed during the read; retry")

    def close(self) -> None:
        if self.port is not None:  # its C++ runs end before the runners close
            self.port.remove(self.name)
            self.port = None
        with self._buffers:
            self._buffers_closed = True
            self._buffers.wait_for(lambda: self._buffer_users == 0)
        for replica in self.replicas:
            replica.pool.close_slot(replica.slot)
            replica.loaded.close()
        self.replicas = []

    # Requests ------------------------------------------------------------

    def begin(self) -> None:
        with self._idle:
            if self.state != ModelState.READY:
                raise Unavailable(f"model {self.name!r} is {self.state.name.lower()}")
            self._inflight += 1

    def others_in_flight(self) -> bool:
        """Whether runs other than the caller's are in progress (read without the lock)."""
        return self._inflight > 1

    def end(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def pick_replica(self) -> Replica:
        replicas = self.replicas
        if len(replicas) == 1:
            return replicas[0]
        return min(replicas, key=lambda r: (r.slot.load, r.pool.running + r.pool.waiting))

    # Weights ---------------------------------------------------------------

    def stage(self, tensors: Mapping[str, Sequence[torch.Tensor]], use_inactive: bool,
              version: WeightsVersion, store: WeightsStore | None) -> None:
        """Writes per-replica tensors ({fqn: [tensor per replica]}) into a buffer.

        ``use_inactive``: the inactive buffer, completed with the active weights
        for constants not sent; otherwise the active buffer, in place, with no
        run in flight.
        """
        with self._weights_op():
            state = self.weights
            if use_inactive:
                stale = state.contents.stale(set(self.constants) - set(tensors))
                for i, replica in enumerate(self.replicas):
                    full = self._inactive_map(replica, {fqn: ts[i] for fqn, ts in tensors.items()},
                                              stale)
                    # Handed over, not copied: the tensors are the inactive buffer's own
                    # memory (written in place) or ones made for this upload alone. A
                    # copy here doubled the time of a staging and, for a buffer torch had
                    # filled from the package, allocated a second one for good.
                    replica.pool.run_in_stream(
                        lambda r=replica, m=full: r.runner.update_constant_buffer(
                            m, True, False, user_managed=True))
                state.inactive_empty = False
                state.contents.synced(stale)
                state.contents.written_inactive(tensors)
                if store is not None:
                    store.save_version(self.name, version, self._extract(0, True))
                state.staged, state.previous = version, None
            else:
                if store is not None:
                    active = self._extract(0, False)
                    merged = {fqn: (tensors[fqn][0] if fqn in tensors else active[fqn])
                              for fqn in self.constants}
                    store.save_version(self.name, version, merged)
                with self._serving_weights_change():
                    for i, replica in enumerate(self.replicas):
                        # Into the serving buffer's own memory (no run in flight), then
                        # handed over as is: no second buffer is allocated.
                        live = replica.runner.extract_constants_map(False)
                        m = {}
                        for fqn, ts in tensors.items():
                            dst = self._copy_into(replica, fqn, live.get(fqn), ts[i])
                            m[self.constants[fqn].name] = ts[i] if dst is None else dst
                        replica.pool.run_in_stream(
                            lambda r=replica, m=m: r.runner.update_constant_buffer(
                                m, False, False, user_managed=True))
                    state.active = version
                    state.contents.written_active(tensors)
                if store is not None:
                    store.commit(self.name, version)
                    self._prune(store)
                self._gauge_version()

    def _inactive_map(self, replica: Replica, new: Mapping[str, torch.Tensor],
                      stale: set[str]) -> dict[str, torch.Tensor]:
        """The inactive buffer's next content, by constant name: ``new`` ({fqn: tensor},
        tensors nothing else uses), and for every other constant the active weights (a
        partial update starts from what serves): kept where the inactive buffer already
        holds them, copied into its own memory where it does not (``stale``, see
        buffer_contents). No tensor of the result shares memory with the active buffer."""
        missing = [fqn for fqn in self.constants if fqn not in new]
        current = self._inactive_views(replica) if missing else {}
        active = replica.runner.extract_constants_map(False) if missing else {}
        full = {}
        for fqn, info in self.constants.items():
            t = new.get(fqn)
            if t is None and fqn not in stale and self._views_fit(current, [fqn]):
                t = current[fqn]  # holds the active content already: nothing to copy
            elif t is None:
                t = self._copy_into(replica, fqn, current.get(fqn), active[fqn])
                if t is None:
                    t = active[fqn].clone()
            full[info.name] = t
        return full

    def _copy_into(self, replica: Replica, fqn: str, dst: torch.Tensor | None,
                   src: torch.Tensor) -> torch.Tensor | None:
        """Copies ``src`` into ``dst`` (a buffer's own memory for constant ``fqn``) and
        returns ``dst``; None where there is no such memory to write into."""
        if dst is None or not self._views_fit({fqn: dst}, [fqn]):
            return None
        replica.pool.run_in_stream(lambda: dst.copy_(src))
        return dst

    def begin_upload(self, fqns: Sequence[str]) -> list[dict[str, torch.Tensor]] | None:
        """Claims the inactive buffer for an upload; returns per-replica views to write into.

        Writing in place keeps a staging at (active + new) memory: no extra copy of the
        new weights. The buffer is first filled with the active weights when it holds
        none (so a partial update starts from what serves). The staged and previous
        versions it held are dropped: rollback is no longer possible once an upload
        starts. Returns None where in-place writing is impossible (then the upload
        allocates its own tensors). Always pair with :meth:`end_upload`.
        """
        with self._weights_op():
            state = self.weights
            if state.uploading:
                raise FailedPrecondition(
                    f"model {self.name!r}: another weights upload is in progress")
            state.uploading = True
            try:
                state.staged = state.previous = None
                views = []
                every = set(fqns) >= set(self.constants)
                filled = False
                for replica in self.replicas:
                    current = self._inactive_views(replica)
                    if not self._views_fit(current) and every:
                        # Nothing to write into, and every constant comes: the upload
                        # makes its own tensors (no fill with weights it overwrites),
                        # which become the buffer once staged.
                        state.contents.forget_inactive()
                        return None
                    if not self._views_fit(current):
                        current = self._fill_inactive(replica)
                        filled = True
                    views.append({fqn: current[fqn] for fqn in fqns})
                if filled:
                    state.contents.synced(self.constants)
                # Overwritten from here on (a failed upload leaves them half written).
                state.contents.forget_inactive(fqns)
                state.inactive_empty = False
                if not all(self._views_fit(v, fqns) for v in views):
                    return None
                return views
            except BaseException:
                state.uploading = False
                raise

    def _inactive_views(self, replica: Replica) -> dict[str, torch.Tensor]:
        """The replica's inactive buffer by FQN; empty while it has no memory (never read then)."""
        if self.weights.inactive_empty:
            return {}
        return replica.runner.extract_constants_map(True)

    def _fill_inactive(self, replica: Replica) -> dict[str, torch.Tensor]:
        """Copies the active weights into the replica's inactive buffer (the runner allocates
        it where it has none); returns the buffer's views by FQN."""
        active = replica.runner.extract_constants_map(False)
        full = {info.name: active[fqn] for fqn, info in self.constants.items()}
        replica.pool.run_in_stream(
            lambda: replica.runner.update_constant_buffer(full, True, False))
        return replica.runner.extract_constants_map(True)

    def reserve_inactive(self) -> None:
        """Gives every replica an inactive buffer now, holding a copy of the active weights
        (no version: nothing to swap to, rollback still refused). The first upload then
        writes in place into memory the daemon already holds, as every later one does,
        instead of faulting in fresh pages as it goes (on the test VM fresh memory costs
        ~2.2 s per GiB: the first 1 GiB upload ran at 0.44 GB/s, later ones at ~1 GB/s), and
        a model whose two buffers do not fit fails now rather than at its first upload."""
        with self._weights_op():
            state = self.weights
            filled = False
            for replica in self.replicas:
                if not self._views_fit(self._inactive_views(replica)):
                    self._fill_inactive(replica)
                    filled = True
            if filled:
                state.contents.synced(self.constants)
            state.inactive_empty = False
        log.info("model %r: inactive buffer reserved (%.1f MiB per replica)", self.name,
                 sum(i.nbytes for i in self.constants.values()) / 2**20)

    def _views_fit(self, views: Mapping[str, torch.Tensor], fqns: Sequence[str] | None = None) -> bool:
        for fqn in (fqns if fqns is not None else self.constants):
            info = self.constants[fqn]
            t = views.get(fqn)
            if t is None or t.dtype != info.dtype or tuple(t.shape) != info.shape or \
                    not t.is_contiguous():
                return False
        return True

    def end_upload(self) -> None:
        with self.weights_op:
            if self.weights is not None:
                self.weights.uploading = False

    @contextmanager
    def _serving_weights_change(self) -> Iterator[None]:
        """No run in flight, on any port, while the serving weights change."""
        with self.rw.exclusive():
            if self.port is None:
                yield
            else:
                with self.port.weights_change(self):
                    yield

    @contextmanager
    def _weights_op(self) -> Iterator[None]:
        """One weight operation at a time, and none once the model is unloading."""
        with self.weights_op:
            if self.state not in (ModelState.READY, ModelState.LOADING) or not self.replicas:
                raise Unavailable(f"model {self.name!r} is {self.state.name.lower()}")
            yield

    def _extract(self, replica_index: int, use_inactive: bool) -> dict[str, torch.Tensor]:
        m = self.replicas[replica_index].runner.extract_constants_map(use_inactive)
        return {fqn: t for fqn, t in m.items() if fqn in self.constants}

    def extract(self, use_inactive: bool) -> tuple[dict[str, torch.Tensor], WeightsVersion]:
        with self._weights_op():
            state = self.weights
            if use_inactive:
                version = state.staged or state.previous
                if version is None:
                    raise FailedPrecondition(
                        f"model {self.name!r}: the inactive buffer holds no weights "
                        "(nothing staged, or it was freed)")
            else:
                version = state.active
            return self._extract(0, use_inactive), version

    def swap(self, store: WeightsStore | None) -> WeightsVersion:
        with self._weights_op():
            state = self.weights
            if state.staged is None:
                hint = (" (previous weights are held: use RollbackConstantBuffer to restore them)"
                        if state.previous else "")
                raise FailedPrecondition(
                    f"model {self.name!r}: nothing is staged in the inactive buffer; "
                    f"stage weights with UpdateConstantBuffer(use_inactive=true) first{hint}")
            def commit() -> None:
                state.previous, state.active, state.staged = state.active, state.staged, None

            self._flip(commit, state.staged.id)
            if store is not None:
                store.commit(self.name, state.active)
            self._gauge_version()
            return state.active

    def rollback(self, store: WeightsStore | None) -> WeightsVersion:
        with self._weights_op():
            state = self.weights
            if state.previous is None:
                raise FailedPrecondition(
                    f"model {self.name!r}: no previous weights to roll back to "
                    "(nothing was swapped in, or the inactive buffer was freed or restaged)")
            def back() -> None:
                state.previous, state.active = state.active, state.previous

            self._flip(back, state.previous.id)
            if store is not None:
                store.commit(self.name, state.active)
            self._gauge_version()
            return state.active

    def _flip(self, versions: Callable[[], None], active_after: str) -> None:
        """Swaps every replica's buffers and, in the same instant, ``versions()`` moves
        the version bookkeeping (so a Run's trailer names the weights that served it:
        ``active_after``). On the port's hot path the flip and its version are one step
        in C++, so its runs wait for the flip alone."""
        with self.rw.exclusive():
            if self.port is not None:
                self.port.flip(self, active_after)
            else:
                for replica in self.replicas:
                    replica.runner.swap_constant_buffer()
            self.weights.swaps += 1
            self.weights.contents.flip()
            versions()

    def free_inactive(self, store: WeightsStore | None) -> None:
        with self._weights_op():
            state = self.weights
            if state.staged is None and state.previous is None:
                return
            if not state.inactive_has_served:
                for replica in self.replicas:
                    replica.runner.free_inactive_constant_buffer()
                state.inactive_empty = True
                state.contents.forget_inactive()
            else:
                log.debug("model %r: the inactive buffer has served; keeping its memory "
                          "(freeing it makes the container crash on the next staging)", self.name)
            state.staged = state.previous = None
            runner_ext.empty_cpu_block_cache()  # freed means given back, not kept for reuse
            if store is not None:
                self._prune(store)

    def update_from_blob(self, path: str, version: WeightsVersion,
                         store: WeightsStore | None = None) -> WeightsVersion:
        """Loads a weights blob into the active buffer of every replica (no run in flight)."""
        with self._weights_op():
            with self._serving_weights_change():
                for replica in self.replicas:
                    replica.runner.update_constant_buffer_from_blob(path)
                self.weights.active = version
                self.weights.contents.written_active(self.constants)
            if store is not None:
                store.save_version(self.name, version, self._extract(0, False))
                store.commit(self.name, version)
                self._prune(store)
            self._gauge_version()
            return version

    def restore(self, version: WeightsVersion, tensors: Mapping[str, torch.Tensor]) -> None:
        """Serves a persisted version (at load, before the model is READY)."""
        per_replica = {}
        for fqn, info in self.constants.items():
            if fqn not in tensors:
                raise Internal(f"stored version {version.id} of {self.name!r} lacks {fqn!r}")
            t = tensors[fqn]
            if t.dtype != info.dtype or tuple(t.shape) != info.shape:
                raise Internal(f"stored version {version.id} of {self.name!r}: {fqn!r} does "
                               "not match the package")
            per_replica[fqn] = [r.pool.to_device(t) for r in self.replicas]
        self.stage(per_replica, True, version, None)
        self.swap(None)
        self.weights.previous = None

    def _prune(self, store: WeightsStore) -> None:
        s = self.weights
        store.prune(self.name, {v.id for v in (s.active, s.staged, s.previous) if v})

    def _gauge_version(self) -> None:
        if self.metrics and self.weights:
            self.metrics.set_active_version(self.name, self.weights.active.id,
                                            self.weights.active.sha256,
                                            self.weights.active.created_unix_ms)

    # Description -----------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        return [r.pool.name for r in self.replicas] or list(self.options.devices)


def _dtype_text(spec: IOSpec) -> str:
    return codec.dtype_name(spec.dtype) if spec.dtype is not None else "?"


DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def repository_models(folder: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """name -> (package, {device type: variant package}) for a model repository.

    ``<name>.pt2`` is the model; ``<name>.<device type>.pt2`` (e.g. ``mlp.cuda.pt2``) is
    its package for that device type, used when the model is placed there.
    """
    found: dict[str, tuple[Path | None, dict[str, str]]] = {}
    for pt2 in sorted(folder.glob("*.pt2")):
        base, _, kind = pt2.stem.rpartition(".")
        if base and kind in DEVICE_TYPES:
            found.setdefault(base, (None, {}))[1][kind] = str(pt2)
        else:
            found.setdefault(pt2.stem, (None, {}))
            found[pt2.stem] = (pt2, found[pt2.stem][1])
    out = {}
    for name, (main, variants) in found.items():
        if main is None:  # only variants: the first one names the model's package
            main = Path(next(iter(variants.values())))
        out[name] = (main, variants)
    return out


def read_model_options(pt2: Path, defaults: ModelOptions, name: str | None = None,
                        variants: Mapping[str, str] | None = None) -> ModelOptions:
    """The placement of repository model ``name`` (default: the package's stem): its
    ``<name>.toml``/``.json`` over ``defaults``, plus its per-device-type packages."""
    name = name or pt2.stem
    if variants is None:
        variants = repository_models(pt2.parent).get(name, (pt2, {}))[1]
    for suffix, parse in ((".toml", tomllib.loads), (".json", json.loads)):
        cfg = pt2.parent / f"{name}{suffix}"
        if cfg.exists():
            data = parse(cfg.read_text())
            devices = data.get("devices", defaults.devices)
            if isinstance(devices, str):
                devices = [d.strip() for d in devices.split(",") if d.strip()]
            paths = dict(variants)
            for key, value in (data.get("packages") or {}).items():
                paths[key] = str(pt2.parent / value)
            return ModelOptions(
                devices=tuple(devices),
                runners=int(data.get("runners", data.get("runners_per_model", defaults.runners))),
                package_model=data.get("package_model") or None,
                device_paths=paths,
                batch_max_size=int(data.get("batch_max_size", defaults.batch_max_size)),
                batch_max_delay_us=int(data.get("batch_max_delay_us",
                                                defaults.batch_max_delay_us)),
                reserve_inactive=bool(data.get("reserve_inactive_buffer", defaults.reserve_inactive)),
                warmup_runs=int(data.get("warmup_runs", defaults.warmup_runs)))
    return replace(defaults, device_paths=dict(variants))


class ModelRegistry:
    """Name → ServedModel, plus the device pools they are placed on."""

    def __init__(self, pools: Mapping[str, DevicePool], default_devices: Sequence[str],
                 default_runners: int, metrics: Metrics | None = None,
                 store: WeightsStore | None = None, batching: tuple[int, int] = (0, 500),
                 reserve_inactive: bool = False, warmup_runs: int = 1):
        self.pools = dict(pools)
        self.default_devices = tuple(default_devices)
        self.default_runners = default_runners
        self.metrics = metrics
        self.store = store
        self.batching = batching
        self.reserve_inactive = reserve_inactive
        self.warmup_runs = warmup_runs
        # The port (port.Port): READY models
        # it can serve are handed to it.
        self.port: Any = None
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not loaded")
        if model.state != ModelState.READY:
            if model.state == ModelState.FAILED:
                raise Unavailable(f"model {name!r} failed to load: {model.error}")
            raise Unavailable(f"model {name!r} is {model.state.name.lower()}")
        return model

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def options(self, devices: Sequence[str] = (), runners: int = 0,
                package_model: str | None = None) -> ModelOptions:
        devices = tuple(devices) or self.default_devices
        unknown = [d for d in devices if d not in self.pools]
        if unknown:
            raise InvalidArgument(
                f"device(s) {', '.join(unknown)} are not served here "
                f"(configured: {', '.join(self.pools)})")
        if runners < 0:
            raise InvalidArgument(f"runners_per_device must be positive, got {runners}")
        return ModelOptions(devices, runners or self.default_runners, package_model or None,
                            batch_max_size=self.batching[0], batch_max_delay_us=self.batching[1],
                            reserve_inactive=self.reserve_inactive,
                            warmup_runs=self.warmup_runs)

    def load(self, name: str, path: str | os.PathLike, options: ModelOptions) -> ServedModel:
        if not name or "/" in name:
            raise InvalidArgument(f"invalid model name {name!r}")
        model = ServedModel(name, str(path), options, self.metrics)
        with self._lock:
            existing = self._models.get(name)
            if existing is not None and existing.state != ModelState.FAILED:
                raise AlreadyExists(f"model {name!r} is already loaded (unload it first)")
            self._models[name] = model
        started = time.monotonic()
        try:
            model.load(self.pools)
            if self.store is not None:
                committed = self.store.committed(name)
                if committed is not None and committed[1] is not None:
                    model.restore(committed[0], committed[1])
                    log.info("model %r: serving committed weights version %s",
                             name, committed[0].id)
            if options.reserve_inactive:
                model.reserve_inactive()
            # READY only once every replica ran: the first requests pay no lazy start-up.
            warmup.warm_up(name, model.replicas, model.inputs, options.warmup_runs,
                           options.runners)
        except runner_ext.PackageError as exc:
            self._failed(model, str(exc))
            raise InvalidArgument(str(exc)) from exc
        except Exception as exc:
            self._failed(model, f"{type(exc).__name__}: {exc}")
            raise
        if self.port is not None:
            try:
                self.port.add(model, warm=options.warmup_runs > 0)
            except Exception:  # noqa: BLE001 (Python's Run path serves it regardless)
                log.exception("model %r: the port's hot path could not take it", name)
        model.state = ModelState.READY
        model._gauge_version()
        # Everything allocated so far (torch, grpc, the model's objects) lives as long as the
        # daemon: out of the cyclic collector's sight, a full collection takes well under a
        # millisecond instead of ~80 ms with every request stalled behind it (measured on
        # this machine: 177k objects tracked after start-up).
        gc.freeze()
        if self.metrics:
            self.metrics.model_loads.labels(name, "ok").inc()
        log.info("model %r loaded from %s on %s (%d runners each) in %.2fs", name, path,
                 ",".join(model.devices), options.runners, time.monotonic() - started)
        return model

    def _failed(self, model: ServedModel, error: str) -> None:
        with model.weights_op:
            model.close()  # a failure after the runners loaded (e.g. restoring weights)
        model.state = ModelState.FAILED
        model.error = error
        if self.metrics:
            self.metrics.model_loads.labels(model.name, "error").inc()
        log.error("model %r failed to load from %s: %s", model.name, model.path, error)

    def unload(self, name: str, timeout: float | None = None) -> None:
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise NotFound(f"model {name!r} is not loaded")
            if model.state == ModelState.UNLOADING:
                raise Unavailable(f"model {name!r} is already unloading")
            if model.state == ModelState.LOADING:
                # Closing it under the loading thread would leave that thread holding
                # runners nobody frees, and a second instance writing the same stored weights.
                raise Unavailable(f"model {name!r} is still loading; unload it once it is ready")
            with model._idle:
                model.state = ModelState.UNLOADING
        model.wait_idle(timeout)
        with model.weights_op:
            model.close()
        runner_ext.empty_cpu_block_cache()
        with self._lock:
            if self._models.get(name) is model:
                del self._models[name]
        if self.metrics:
            self.metrics.forget_model(name)
        log.info("model %r unloaded", name)

    def load_repository(self, folder: str | os.PathLike) -> list[str]:
        """Loads every <name>.pt2 (with optional <name>.toml/.json) of ``folder``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidArgument(f"model repository {str(folder)!r} is not a folder")
        defaults = self.options()
        names = []
        for name, (pt2, variants) in repository_models(folder).items():
            opts = read_model_options(pt2, defaults, name, variants)
            self.options(opts.devices, opts.runners)  # validates devices
            self.load(name, pt2, opts)
            names.append(name)
        return names

    def close(self) -> None:
        for name, model in list(self._models.items()):
            if model.state == ModelState.UNLOADING:
                continue  # an UnloadModel in progress finishes it
            try:
                self.unload(name, timeout=0)
            except Exception:  # noqa: BLE001 (closing everything regardless)
                log.exception("unloading %r failed", name)


_read_model_options = read_model_options  # older name, kept for callers
