"""The protocol-neutral core: every servicer (aotiserve.v1, Open Inference Protocol) calls this.

Servicers convert wire messages to torch tensors and plain values (``model_types``), call one
method here, and convert the result back. Everything the server decides —
which model, which replica, validation, admission, weight lifecycle, paths —
happens here or below, and failures are raised as ``errors.ServeError``.

Main entry points::

    run(model, inputs, deadline=None) -> RunResult(outputs, weights_version)
    describe(model) -> ModelInfo            list_models() -> [ModelInfo]
    load_model(name, path, devices=(), runners=0, package_model=None) -> ModelInfo
    unload_model(name)                      ready() / live() / model_ready(name)
    call_spec / constant_fqns / constant_dtypes / extract_constants
    begin_upload(header, author) -> Upload (add_chunk, commit, discard)
    extract_chunks(name, use_inactive, chunk_bytes, is_active) -> ConstantChunk...
    swap / rollback / free_inactive / update_from_blob
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from aotiserve import runner_ext

from . import process_env, weights_ipc
from . import tensor_codec as codec
from .config import ServeConfig
from .device_pool import queued
from .errors import InvalidArgument, NotFound, ServeError
from .input_checks import InputPlan, run_error, validate_inputs
from .metrics import Metrics
from .model_registry import ModelRegistry
from .model_repository import read_model_options, repository_models
from .model_types import (
    ConstantChunk,
    CudaHandoff,
    ModelInfo,
    ModelState,
    RunResult,
    UploadHeader,
    WeightsVersion,
)
from .paths import is_file, resolve_below
from .served_model import ServedModel
from .shared_memory import SharedMemoryRegions
from .weight_loads import WeightLoads
from .weight_transfers import TransferSlots, Upload, extract_chunks

log = logging.getLogger(__name__)


def _info(model: ServedModel) -> ModelInfo:
    """The model's description, with where a client's CUDA tensors can be handed over."""
    info = model.info()
    handoff = weights_ipc.handoff_metadata([r.pool.device for r in model.replicas])
    return replace(info, metadata={**info.metadata, **handoff}) if handoff else info


class DataPlane:
    def __init__(
        self, config: ServeConfig, registry: ModelRegistry, metrics: Metrics | None = None
    ):
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.limits = codec.Limits(
            config.max_tensor_elements,
            config.max_tensor_rank,
            config.max_inputs,
            config.max_upload_constants,
        )
        self.draining = False
        self.expected_models: set[str] = set()
        self._transfers = TransferSlots(config.max_weight_streams)
        self._loads = WeightLoads(config, registry, self.limits, metrics, self._count_op)
        # OIP shared-memory regions (inputs and outputs of ModelInfer in client memory).
        self.shared_memory = SharedMemoryRegions(
            config.shared_memory,
            config.max_shared_memory_regions,
            config.max_shared_memory_bytes,
            open_cuda=getattr(runner_ext, "open_cuda_ipc", None),
            pin_host=getattr(runner_ext, "pin_host_memory", None),
        )
        # Models loaded from now on (repository, LoadModel, the demo) warm up this much.
        registry.warmup_runs = config.warmup_runs

    # Health ------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Every configured model is loaded and we are not draining."""
        if self.draining:
            return False
        models = {m.name: m for m in self.registry.models()}
        return all(
            n in models and models[n].state == ModelState.READY for n in self.expected_models
        )

    def model_ready(self, name: str) -> bool:
        try:
            return self.registry.get(name).state == ModelState.READY
        except ServeError:
            return False

    # Inference ---------------------------------------------------------------

    def model(self, name: str) -> ServedModel:
        return self.registry.get(name)

    def input_plan(self, model: ServedModel) -> InputPlan:
        """The model's inputs as requests are checked against them (labels for errors)."""
        return model.input_plan

    def active_version(self, model: ServedModel) -> str:
        """The id of the weights serving ``model`` now."""
        return model.weights.active.id

    def run(
        self,
        name: str | ServedModel,
        inputs: Sequence[torch.Tensor],
        deadline: float | None = None,
        call: Any = None,
    ) -> RunResult:
        """Runs the model on host tensors; ``deadline`` is a time.monotonic() instant.

        ``call`` (the gRPC context) lets a queued run leave the queue when it is cancelled.
        With dynamic batching on for the model, the run may share one with others.
        """
        model = name if isinstance(name, ServedModel) else self.registry.get(name)
        validate_inputs(model.name, model.input_plan, inputs)
        model.begin()
        stats = self.metrics.stats if self.metrics else None
        if stats is not None:  # aotiserve_model_in_flight_requests
            stats.add_load(model.name, 1, 0)
        try:
            batcher = model.batcher
            if batcher is None:
                outputs, version = self._execute(model, lambda: inputs, (deadline, call))
            else:
                outputs, version = batcher.run(
                    list(inputs),
                    (deadline, call),
                    lambda get, ctx: self._execute(model, get, ctx),
                    model.others_in_flight,
                )
        finally:
            model.end()
            if stats is not None:
                stats.add_load(model.name, -1, 0)
        return RunResult(list(outputs), version)

    def _execute(
        self,
        model: ServedModel,
        get_inputs: Callable[[], Sequence[torch.Tensor]],
        ctx: tuple[float | None, Any],
    ) -> tuple[list[torch.Tensor], str]:
        """One run on one replica: admission, the runner, per-device metrics.
        ``get_inputs()`` is called once a runner is held (a batch closes then)."""
        deadline, call = ctx
        replica = model.pick_replica()
        pool = replica.pool
        stats = self.metrics.stats if self.metrics else None
        with (
            queued(stats, model.name) as admitted,
            pool.admit(replica.slot, deadline, call) as waited,
        ):
            admitted()
            inputs = get_inputs()
            with model.rw.shared():
                started = time.monotonic()
                version = model.weights.active.id
                try:
                    outputs = pool.execute(replica.runner, inputs, replica.short_runs)
                except (ValueError, RuntimeError) as exc:
                    raise run_error(model.name, exc, inputs, model.inputs) from exc
                computed = time.monotonic() - started
                replica.note_compute(computed)
        if replica.stats is not None:  # Metrics.stats.record_run(model, device, ...)
            replica.stats(waited, computed)
        if stats is not None and model.batcher is not None and inputs and inputs[0].dim():
            stats.record_batch(model.name, int(inputs[0].shape[0]), computed)
        return outputs, version

    def served_versions(self) -> dict[str, str]:
        """The active weights version of every READY model (OIP ModelStatistics)."""
        return {
            m.name: m.weights.active.id if m.weights else ""
            for m in self.registry.models()
            if m.state == ModelState.READY
        }

    # Description -------------------------------------------------------------

    def describe(self, name: str) -> ModelInfo:
        return _info(self.registry.get(name))

    def list_models(self) -> list[ModelInfo]:
        return [_info(m) for m in sorted(self.registry.models(), key=lambda m: m.name)]

    def _ask_runner(self, name: str, ask):
        """``ask(runner)`` on the model's first runner, which an unload cannot close meanwhile
        (unguarded, a racing unload emptied the replicas: INTERNAL, or a freed runner)."""
        model = self.registry.get(name)
        with model.using_buffers():
            return ask(model.replicas[0].runner)

    def call_spec(self, name: str) -> tuple[str, str]:
        spec = self._ask_runner(name, lambda r: r.get_call_spec())
        return spec[0], spec[1]

    def constant_fqns(self, name: str) -> dict[str, str]:
        return dict(self._ask_runner(name, lambda r: r.get_constant_names_to_original_fqns()))

    def constant_dtypes(self, name: str) -> dict[str, int]:
        return dict(self._ask_runner(name, lambda r: r.get_constant_names_to_dtypes()))

    # Model management ----------------------------------------------------------

    def load_model(
        self,
        name: str,
        path: str,
        devices: Sequence[str] = (),
        runners: int = 0,
        package_model: str | None = None,
    ) -> ModelInfo:
        if runners > self.config.max_runners_per_model:
            raise InvalidArgument(
                f"runners_per_device {runners} exceeds this server's limit of "
                f"{self.config.max_runners_per_model}"
            )
        resolved = resolve_below(
            path,
            "model path",
            self.config.package_roots,
            "model root",
            "--model-root or --model-repository",
        )
        if not is_file(resolved):
            raise InvalidArgument(f"model path {path!r} is not a file")
        opts = self.registry.options(devices, runners, package_model)
        return _info(self.registry.load(name, resolved, opts))

    def load_from_repository(self, name: str) -> ModelInfo:
        """Loads model ``name`` from the model repository folder, with its per-model
        config and per-device packages, as at start-up (Open Inference Protocol
        RepositoryModelLoad). The path is the server's own, so no root check."""
        folder = self.config.model_repository
        if not folder:
            raise NotFound(
                f"model {name!r}: this server has no model repository "
                "(start it with --model-repository)"
            )
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise InvalidArgument(f"invalid model name {name!r}")
        found = repository_models(Path(folder)).get(name)
        if found is None:
            raise NotFound(f"model {name!r} is not in the model repository {str(folder)!r}")
        path, variants = found
        options = read_model_options(path, self.registry.options(), name, variants)
        self.registry.options(options.devices, options.runners)  # validates the devices
        return _info(self.registry.load(name, path, options))

    def unload_model(self, name: str) -> None:
        self.registry.unload(name)
        self.expected_models.discard(name)

    # Weights -------------------------------------------------------------------

    @contextmanager
    def weight_stream(self, what: str) -> Iterator[None]:
        """Holds one of the ``max_weight_streams`` places of uploads and downloads; none
        free: RESOURCE_EXHAUSTED (the stream would hold a worker thread Runs need)."""
        with self._transfers.hold(what):
            yield

    def in_background(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on a background-priority stream thread; its result or its exception."""
        return self._transfers.in_background(fn)

    @property
    def weight_streams_open(self) -> int:
        return self._transfers.open

    def _count_op(self, model: str, op: str, exc: BaseException | None) -> None:
        process_env.HEAP.request()  # buffers were freed: their pages go back (main loop)
        if self.metrics:
            outcome = (
                "ok"
                if exc is None
                else (exc.code.name.lower() if isinstance(exc, ServeError) else "internal")
            )
            self.metrics.constant_buffer_ops.labels(model, op, outcome).inc()

    def _weights_op(self, name: str, op: str, fn):
        model = self.registry.get(name)
        try:
            result = fn(model)
        except BaseException as exc:
            self._count_op(name, op, exc)
            raise
        self._count_op(name, op, None)
        return result

    def extract_constants(
        self, name: str, use_inactive: bool
    ) -> tuple[dict[str, torch.Tensor], WeightsVersion]:
        return self._weights_op(name, "extract", lambda m: m.weights.extract(use_inactive))

    def extract_chunks(
        self, name: str, use_inactive: bool, chunk_bytes: int, is_active: Callable[[], bool]
    ) -> Iterator[ConstantChunk]:
        """The model's constants (active or inactive buffer) in pieces of ``chunk_bytes``;
        aborted if its weights change meanwhile (see ``weight_transfers.extract_chunks``)."""
        model = self.registry.get(name)
        tensors, _version = self.extract_constants(name, use_inactive)
        return extract_chunks(model, tensors, chunk_bytes, is_active)

    def begin_upload(self, header: UploadHeader, author: str) -> Upload:
        """An upload of ``header``'s constants, validated, its buffer claimed (see
        ``weight_loads.WeightLoads.begin_upload``)."""
        return self._loads.begin_upload(header, author)

    def load_weights(
        self,
        name: str,
        path: str,
        validate_full: bool,
        description: str,
        author: str,
        is_active: Callable[[], bool] = lambda: True,
    ) -> tuple[WeightsVersion, int, list[str]]:
        """Stages a safetensors file (or sharded folder) below an allowed root into the
        inactive buffer; returns (version, bytes, constants written)."""
        return self._loads.load_file(name, path, validate_full, description, author, is_active)

    def load_weights_from_cuda(
        self, request: CudaHandoff, author: str, is_active: Callable[[], bool] = lambda: True
    ) -> tuple[WeightsVersion, int, list[str]]:
        """Stages CUDA tensors a colocated process shares by IPC handle."""
        return self._loads.load_from_cuda(request, author, is_active)

    def swap(self, name: str) -> WeightsVersion:
        return self._weights_op(
            name, "swap", self._timed_flip("swap", lambda m: m.weights.swap(self.registry.store))
        )

    def rollback(self, name: str) -> WeightsVersion:
        return self._weights_op(
            name,
            "rollback",
            self._timed_flip("rollback", lambda m: m.weights.rollback(self.registry.store)),
        )

    def _timed_flip(
        self, op: str, flip: Callable[[ServedModel], WeightsVersion]
    ) -> Callable[[ServedModel], WeightsVersion]:
        def timed(model: ServedModel) -> WeightsVersion:
            started = time.perf_counter()
            version = flip(model)
            if self.metrics:
                self.metrics.swap_seconds.labels(model.name, op).observe(
                    time.perf_counter() - started
                )
            return version

        return timed

    def free_inactive(self, name: str) -> None:
        return self._weights_op(
            name, "free", lambda m: m.weights.free_inactive(self.registry.store)
        )

    def update_from_blob(self, name: str, path: str, author: str) -> WeightsVersion:
        return self._weights_op(name, "blob", lambda m: self._loads.load_blob(m, path, author))
