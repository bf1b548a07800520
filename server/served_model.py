"""A loaded model: one replica per device, its description, in-flight runs, lifetime.

A :class:`ServedModel` holds one runner container (``LoadedModel``) per device,
each admitted through its device's :class:`DevicePool`. Its weights and every
operation on them are :class:`~aotiserve.server.model_weights.ModelWeights`
(``model.weights``); which models exist is
:class:`~aotiserve.server.model_registry.ModelRegistry`'s.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aotiserve import runner_ext
from aotiserve.client import pt2

from . import io_specs
from . import tensor_codec as codec
from .batching import Batcher, batchable
from .device_pool import DevicePool, Slot
from .errors import Unavailable
from .input_checks import InputPlan
from .io_specs import IOSpec
from .metrics import Metrics
from .model_types import ConstantInfo, ModelInfo, ModelOptions, ModelState, WeightsVersion
from .model_weights import ModelWeights
from .rwlock import RWLock
from .weights import FOLDED_PREFIX, INITIAL, map_digest

log = logging.getLogger(__name__)

# A run this short costs less with the GIL held than the reacquire after releasing it
# (a thread switch under concurrent calls): measured on the tiny MLP (~20 µs), 8 clients
# got ~14% more throughput holding it. Compute-bound models stay far above this.
SHORT_RUN_S = 50e-6


@dataclass
class Replica:
    loaded: Any  # runner_ext.LoadedModel
    pool: DevicePool
    slot: Slot
    # Metrics.stats.record_run(model, device, queued s, computed s), bound to this replica.
    stats: Callable[[float, float], None] | None = None
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
        self.ties: io_specs.Ties = ()  # input dims of one size (InputPlan checks them)
        self.input_plan = InputPlan(self.inputs)
        self.batcher: Batcher | None = None
        self.constants: dict[str, ConstantInfo] = {}  # by original FQN
        self.constants_by_name: dict[str, ConstantInfo] = {}
        self.folded_names: set[str] = set()
        # The package computes some constants from others at run time (runtime constant
        # folding): a staged buffer is folded before it can serve (ModelWeights.stage).
        self.folds_at_run_time = False
        self.weights: ModelWeights | None = None
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
                    model_name=self.options.package_model,
                    device=pool.device,
                    num_runners=self.options.runners,
                )
                stats = None
                if self.metrics is not None:
                    stats = functools.partial(self.metrics.stats.record_run, self.name, pool.name)
                self.replicas.append(
                    Replica(
                        loaded, pool, pool.slot(self.options.runners, f"model {self.name!r}"), stats
                    )
                )
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
                self.folds_at_run_time |= name.startswith(FOLDED_PREFIX)
                continue
            info = ConstantInfo(name, fqn, tensor.dtype, tuple(tensor.shape))
            self.constants[fqn] = info
            self.constants_by_name[name] = info
        self.weights = ModelWeights(
            self,
            WeightsVersion(
                INITIAL,
                map_digest(self.constants, live),
                int(time.time() * 1000),
                "package",
                os.path.basename(self.path),
            ),
        )
        self._setup_batching()

    def _describe_io(self, first: Replica) -> None:
        """Inputs and outputs from the package (io_specs), for every .pt2 alike."""
        runner = first.runner
        inputs, outputs, source, self.ties = io_specs.from_package(
            first.loaded.source,
            first.loaded.model_name,
            self.metadata,
            runner.get_num_inputs(),
            runner.get_num_outputs(),
        )
        if not all(io_specs.complete(o) for o in outputs):
            outputs = io_specs.probe_outputs(
                inputs, outputs, lambda xs: first.pool.execute(runner, xs)
            )
        self.inputs, self.outputs = inputs, outputs
        self.input_plan = InputPlan(inputs, self.ties)
        if source == pt2.SOURCE_NONE:
            log.warning(
                "model %r: %s holds no input/output description (no aotiserve pack "
                "metadata, no generated wrapper source): requests are checked by the "
                "model's own guards only",
                self.name,
                self.path,
            )
        else:
            # The complete specs, bounds included, where ListModels shows them (ModelInfo's
            # TensorSpec has no room for bounds).
            self.metadata[pt2.INPUTS_KEY] = pt2.specs_json([s.to_client() for s in inputs])
            self.metadata[pt2.OUTPUTS_KEY] = pt2.specs_json([s.to_client() for s in outputs])
        io_specs.log_lower_bounds(self.name, inputs)
        log.info(
            "model %r: inputs %s, outputs %s (from the %s)",
            self.name,
            ", ".join(f"{s.name} {_dtype_text(s)}{s.bounds_text()}" for s in inputs),
            ", ".join(f"{s.name} {_dtype_text(s)}{s.bounds_text()}" for s in outputs),
            source,
        )

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
                log.warning(
                    "model %r: dynamic batching is off: it accepts %d row(s) per run",
                    self.name,
                    size,
                )
                return
        self.batcher = Batcher(size, self.options.batch_max_delay_us / 1e6)
        log.info(
            "model %r: dynamic batching up to %d rows, waiting up to %d µs",
            self.name,
            size,
            self.options.batch_max_delay_us,
        )

    # Buffers' lifetime ---------------------------------------------------------

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

    def begin_unloading(self) -> None:
        """UNLOADING from now on: no new run begins."""
        with self._idle:
            self.state = ModelState.UNLOADING

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def pick_replica(self) -> Replica:
        replicas = self.replicas
        if len(replicas) == 1:
            return replicas[0]
        return min(replicas, key=lambda r: (r.slot.load, r.pool.running + r.pool.waiting))

    # Description -----------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        return [r.pool.name for r in self.replicas] or list(self.options.devices)

    def info(self) -> ModelInfo:
        """What a servicer may say about this model (a snapshot)."""
        w = self.weights
        return ModelInfo(
            name=self.name,
            path=self.path,
            devices=self.devices,
            runners_per_device=self.options.runners,
            state=self.state,
            inputs=list(self.inputs),
            outputs=list(self.outputs),
            metadata=dict(self.metadata),
            updatable_constants=sorted(self.constants),
            active_version=w.active if w else None,
            staged_version=w.staged if w else None,
            previous_version=w.previous if w else None,
            error=self.error,
        )


def _dtype_text(spec: IOSpec) -> str:
    return codec.dtype_name(spec.dtype) if spec.dtype is not None else "?"
