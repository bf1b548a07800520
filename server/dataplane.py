"""The protocol-neutral core: every servicer (native, Open Inference Protocol) calls this.

Servicers convert wire messages to torch tensors and plain values, call one
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
    swap / rollback / free_inactive / update_from_blob
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from aotiserve import runner_ext
from aotiserve.v1 import model_runner_pb2 as pb

from . import io_specs, safetensors_source, weights_ipc, weights_pull
from . import tensor_codec as codec
from .config import ServeConfig
from .errors import (
    Cancelled,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServeError,
)
from .metrics import Metrics
from .model_registry import (
    IOSpec,
    ModelRegistry,
    ModelState,
    ServedModel,
    read_model_options,
    repository_models,
)
from .weights import StagingUpload, WeightsVersion, background_priority, new_version

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RunResult:
    outputs: list[torch.Tensor]
    weights_version: str


@dataclass(frozen=True)
class ModelInfo:
    """What a servicer may say about a model (protocol-neutral)."""

    name: str
    path: str
    devices: list[str]
    runners_per_device: int
    state: ModelState
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    metadata: dict[str, str]
    updatable_constants: list[str]
    active_version: WeightsVersion | None
    staged_version: WeightsVersion | None
    previous_version: WeightsVersion | None
    error: str = ""


def _info(model: ServedModel) -> ModelInfo:
    w = model.weights
    metadata = dict(model.metadata)
    cuda = [r.pool.device for r in model.replicas if r.pool.device.type == "cuda"]
    if cuda:  # where a client's CUDA tensors can be handed over GPU-direct
        metadata[weights_ipc.HOST_ID_KEY] = weights_ipc.host_id()
        metadata[weights_ipc.CUDA_UUIDS_KEY] = ",".join(
            str(torch.cuda.get_device_properties(d).uuid) for d in cuda)
    return ModelInfo(
        name=model.name, path=model.path, devices=model.devices,
        runners_per_device=model.options.runners, state=model.state,
        inputs=list(model.inputs), outputs=list(model.outputs), metadata=metadata,
        updatable_constants=sorted(model.constants),
        active_version=w.active if w else None, staged_version=w.staged if w else None,
        previous_version=w.previous if w else None, error=model.error)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. ENAMETOOLONG: not a file we can open either
        return False


def _input_label(i: int, spec: IOSpec | None) -> str:
    return f"input {i} ({spec.name!r})" if spec is not None else f"input {i}"


class _InputPlan:
    """What each run checks of a model's inputs, worked out once per model load:
    error labels, and per input (dtype, exact shape) for a one-comparison accept."""

    __slots__ = ("specs", "labels", "fast")

    def __init__(self, specs: Sequence[IOSpec]):
        self.specs = specs
        self.labels = [_input_label(i, s) for i, s in enumerate(specs)]
        self.fast = [(s.dtype, tuple(s.shape)
                      if s.shape is not None and all(d >= 0 for d in s.shape) else None)
                     for s in specs]


def _plan(model: ServedModel) -> _InputPlan:
    plan = getattr(model, "_input_plan", None)
    if plan is None or plan.specs is not model.inputs:
        plan = model._input_plan = _InputPlan(model.inputs)
    return plan


class Upload:
    """A weight upload in progress (see ``weights.StagingUpload``)."""

    def __init__(self, plane: "DataPlane", model: ServedModel, staging: StagingUpload,
                 author: str, claimed: bool, path: str = "upload",
                 started: float | None = None):
        self._plane = plane
        self.path = path  # how the bytes came: upload, file, gpu-direct (metrics)
        self._started = time.perf_counter() if started is None else started
        self.model = model
        self.staging = staging
        self.author = author
        self._claimed = claimed  # holds the model's inactive buffer (ServedModel.begin_upload)

    def add_chunk(self, chunk: pb.ConstantChunk) -> None:
        self.staging.add_chunk(chunk)

    def commit(self, sha256: str | None = None) -> tuple[WeightsVersion, int, list[str]]:
        """Validates completeness and writes the weights; returns (version, bytes, names).
        ``sha256``: the version's, computed by the caller (else the tree hash)."""
        model = self.model
        try:
            tensors, sha = self.staging.finish(sha256)
            version = new_version(sha, self.author, self.staging.header.description)
            model.stage(tensors, self.staging.use_inactive, version, self._plane.registry.store)
        except BaseException as exc:
            self.discard()
            self._plane._count_op(model.name, "stage", exc)
            raise
        received = self.staging.bytes_received
        if self._plane.metrics:
            self._plane.metrics.staged(model.name, self.path, received,
                                       time.perf_counter() - self._started)
        self._plane._count_op(model.name, "stage", None)
        names = sorted(self.staging.staged)
        self.discard()
        log.info("model %r: %s weights version %s (%d constants, %d bytes, %s) from %s in "
                 "%.3fs", model.name,
                 "staged" if self.staging.use_inactive else "updated active to",
                 version.id, len(names), received, self.path, self.author or "?",
                 time.perf_counter() - self._started)
        return version, received, names

    def discard(self) -> None:
        """Drops staging and releases the model's inactive buffer (idempotent)."""
        self.staging.discard()
        runner_ext.empty_cpu_block_cache()  # a cut-off upload's memory goes back at once
        if self._claimed:
            self._claimed = False
            self.model.end_upload()


class DataPlane:
    def __init__(self, config: ServeConfig, registry: ModelRegistry,
                 metrics: Metrics | None = None):
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.limits = codec.Limits(config.max_tensor_elements, config.max_tensor_rank,
                                   config.max_inputs, config.max_upload_constants)
        self.draining = False
        self.expected_models: set[str] = set()
        self._weight_streams_lock = threading.Lock()
        self._weight_streams_open = 0
        # Weight streams are received on these threads, at background priority (gRPC's
        # handler thread waits): an upload takes the cores only where Runs leave them.
        self._stream_pool = cf.ThreadPoolExecutor(max_workers=config.max_weight_streams,
                                                  thread_name_prefix="aotiserve-stage",
                                                  initializer=background_priority)
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
        return all(n in models and models[n].state == ModelState.READY
                   for n in self.expected_models)

    def model_ready(self, name: str) -> bool:
        try:
            return self.registry.get(name).state == ModelState.READY
        except ServeError:
            return False

    # Inference ---------------------------------------------------------------

    def model(self, name: str) -> ServedModel:
        return self.registry.get(name)

    def validate_inputs(self, model: ServedModel, inputs: Sequence[torch.Tensor]) -> None:
        plan = _plan(model)
        specs = plan.specs
        if len(inputs) != len(specs):
            names = ", ".join(s.name for s in specs)
            raise InvalidArgument(
                f"model {model.name!r} takes {len(specs)} inputs ({names}), got {len(inputs)}")
        for i, (t, spec, (dtype, shape)) in enumerate(zip(inputs, specs, plan.fast)):
            if shape is not None and t.dtype == dtype and t.shape == shape:
                continue  # the common case: exactly what the model declares
            if spec.dtype is not None and t.dtype != spec.dtype:
                raise InvalidArgument(f"{_input_label(i, spec)}: dtype must be "
                                      f"{codec.dtype_name(spec.dtype)}, got {codec.dtype_name(t.dtype)}")
            if spec.shape is None:
                continue
            if t.dim() != len(spec.shape):
                raise InvalidArgument(f"{_input_label(i, spec)}: expected {len(spec.shape)} "
                                      f"dimensions {list(spec.shape)}, got shape {list(t.shape)}")
            for d, (got, want) in enumerate(zip(t.shape, spec.shape)):
                if want >= 0 and got != want:
                    raise InvalidArgument(f"{_input_label(i, spec)}: dimension {d} must be {want} "
                                          f"(shape {list(spec.shape)}), got shape {list(t.shape)}")
            # The package's dynamic-dim guards, checked here so the caller learns what the
            # model accepts and how to change that (the runner's own message says neither).
            if spec.min_shape is not None or spec.max_shape is not None:
                why = io_specs.check_bounds(_input_label(i, spec), spec, t.shape)
                if why is not None:
                    raise InvalidArgument(why)

    def decode_inputs(self, model: ServedModel, tensors: Sequence[pb.Tensor]) -> list[torch.Tensor]:
        """Wire tensors → torch, naming the input in every error."""
        labels = _plan(model).labels
        n = len(labels)
        return [codec.decode(t, labels[i] if i < n else _input_label(i, None), self.limits)
                for i, t in enumerate(tensors)]

    def run(self, name: str | ServedModel, inputs: Sequence[torch.Tensor],
            deadline: float | None = None, call: Any = None) -> RunResult:
        """Runs the model on host tensors; ``deadline`` is a time.monotonic() instant.

        ``call`` (the gRPC context) lets a queued run leave the queue when it is cancelled.
        With dynamic batching on for the model, the run may share one with others.
        """
        model = name if isinstance(name, ServedModel) else self.registry.get(name)
        self.validate_inputs(model, inputs)
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
                    list(inputs), (deadline, call),
                    lambda get, ctx: self._execute(model, get, ctx), model.others_in_flight)
        finally:
            model.end()
            if stats is not None:
                stats.add_load(model.name, -1, 0)
        return RunResult(list(outputs), version)

    def _execute(self, model: ServedModel, get_inputs: Callable[[], Sequence[torch.Tensor]],
                 ctx: tuple[float | None, Any]) -> tuple[list[torch.Tensor], str]:
        """One run on one replica: admission, the runner, per-device metrics.
        ``get_inputs()`` is called once a runner is held (a batch closes then)."""
        deadline, call = ctx
        replica = model.pick_replica()
        pool = replica.pool
        stats = self.metrics.stats if self.metrics else None
        with self._queued(stats, model.name) as admitted, \
                pool.admit(replica.slot, deadline, call) as waited:
            admitted()
            inputs = get_inputs()
            with model.rw.shared():
                started = time.monotonic()
                version = model.weights.active.id
                try:
                    outputs = pool.execute(replica.runner, inputs, replica.short_runs)
                except (ValueError, RuntimeError) as exc:
                    raise self._run_error(model, exc) from exc
                computed = time.monotonic() - started
                replica.note_compute(computed)
        if replica.stats is not None:  # Metrics.stats.record_run(model, device, ...)
            replica.stats(waited, computed)
        if stats is not None and model.batcher is not None and inputs and inputs[0].dim():
            stats.record_batch(model.name, int(inputs[0].shape[0]), computed)
        return outputs, version

    @staticmethod
    @contextmanager
    def _queued(stats: Any, model: str) -> Iterator[Callable[[], None]]:
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

    @staticmethod
    def _run_error(model: ServedModel, exc: Exception) -> ServeError:
        msg = str(exc).split("\nException raised from")[0].strip()
        # Shape guards name the input; bounds checks fire on input values (an embedding
        # id past the table): both are the caller's to fix.
        if (isinstance(exc, ValueError) or "input" in msg.lower()
                or "out of bounds" in msg.lower()):
            return InvalidArgument(f"model {model.name!r} rejected the inputs: {msg}")
        log.error("model %r: run failed", model.name, exc_info=exc)
        return Internal(f"model {model.name!r} failed to run; see the server log")

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

    def resolve_path(self, path: str, what: str, roots: Sequence[str], kind: str,
                     flag: str) -> Path:
        """``path`` with symlinks and .. resolved; it must lie below one of ``roots``
        (``kind`` and ``flag`` name them in the error)."""
        if not path:
            raise InvalidArgument(f"{what}: empty path")
        if "\0" in path:
            raise InvalidArgument(f"{what}: the path holds a NUL character")
        resolved = Path(os.path.realpath(path))
        for root in roots:
            root_real = Path(os.path.realpath(root))
            if resolved == root_real or root_real in resolved.parents:
                return resolved
        raise PermissionDenied(
            f"{what}: {path!r} is not below a {kind} of this server (configure {flag})")

    def load_model(self, name: str, path: str, devices: Sequence[str] = (), runners: int = 0,
                   package_model: str | None = None) -> ModelInfo:
        if runners > self.config.max_runners_per_model:
            raise InvalidArgument(f"runners_per_device {runners} exceeds this server's limit of "
                                  f"{self.config.max_runners_per_model}")
        resolved = self.resolve_path(path, "model path", self.config.package_roots,
                                     "model root", "--model-root or --model-repository")
        if not _is_file(resolved):
            raise InvalidArgument(f"model path {path!r} is not a file")
        opts = self.registry.options(devices, runners, package_model)
        return _info(self.registry.load(name, resolved, opts))

    def load_from_repository(self, name: str) -> ModelInfo:
        """Loads model ``name`` from the model repository folder, with its per-model
        config and per-device packages, as at start-up (Open Inference Protocol
        RepositoryModelLoad). The path is the server's own, so no root check."""
        folder = self.config.model_repository
        if not folder:
            raise NotFound(f"model {name!r}: this server has no model repository "
                           "(start it with --model-repository)")
        if not name or name in (".", "..") or "/" in name or "\\" in name:
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
        limit = self.config.max_weight_streams
        with self._weight_streams_lock:
            if self._weight_streams_open >= limit:
                raise ResourceExhausted(
                    f"{what}: {limit} weight uploads/downloads are in progress, the most this "
                    "server runs at once (max_weight_streams); retry later")
            self._weight_streams_open += 1
        try:
            yield
        finally:
            with self._weight_streams_lock:
                self._weight_streams_open -= 1

    def in_background(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a background-priority stream thread; its result or its exception."""
        return self._stream_pool.submit(contextvars.copy_context().run, fn).result()

    @property
    def weight_streams_open(self) -> int:
        return self._weight_streams_open

    def _count_op(self, model: str, op: str, exc: BaseException | None) -> None:
        if self.metrics:
            outcome = "ok" if exc is None else (
                exc.code.name.lower() if isinstance(exc, ServeError) else "internal")
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

    def extract_constants(self, name: str, use_inactive: bool
                          ) -> tuple[dict[str, torch.Tensor], WeightsVersion]:
        return self._weights_op(name, "extract", lambda m: m.extract(use_inactive))

    def begin_upload(self, header: pb.UpdateConstantBufferHeader, author: str) -> Upload:
        model = self.registry.get(header.model)
        try:
            gauge = self.metrics.staging_bytes.labels(model.name) if self.metrics else None
            staging = StagingUpload(model, header, self.config.max_upload_bytes, self.limits,
                                    gauge.inc if gauge else None)
            # Header valid: claim the inactive buffer and write into it in place.
            claimed = header.use_inactive
            targets = model.begin_upload(list(staging.declared)) if claimed else None
            try:
                staging.allocate(targets)
            except BaseException:
                if claimed:
                    model.end_upload()
                raise
        except BaseException as exc:
            self._count_op(model.name, "stage", exc)
            raise
        return Upload(self, model, staging, author, claimed)

    def load_weights(self, name: str, path: str, validate_full: bool, description: str,
                     author: str, is_active: Callable[[], bool] = lambda: True
                     ) -> tuple[WeightsVersion, int, list[str]]:
        """Stages a safetensors file (or sharded folder) below an allowed root into the
        inactive buffer (``weights_pull``); returns (version, bytes, constants written)."""
        model = self.registry.get(name)
        started = time.perf_counter()
        try:
            resolved = self.resolve_path(path, "weights path", self.config.allowed_roots,
                                         "weights root", "--allowed-root")
            check = safetensors_source.check_below([Path(r) for r in self.config.allowed_roots])
            with safetensors_source.open_source(resolved, check, self.limits,
                                                self.limits.max_constants) as source:
                header, entries = weights_pull.upload_header(name, source, validate_full,
                                                             description)
                upload = self._claim(model, header, author, "file", started)
                try:
                    source.advise_sequential()
                    weights_pull.fill(upload.staging, entries, is_active)
                except BaseException:
                    upload.discard()
                    raise
        except BaseException as exc:
            self._count_op(model.name, "stage", exc)
            raise
        if not is_active():
            upload.discard()
            exc = Cancelled("the call was cancelled; nothing was staged")
            self._count_op(model.name, "stage", exc)
            raise exc
        return upload.commit()

    def load_weights_from_cuda(self, request: pb.LoadWeightsFromCudaRequest, author: str,
                               is_active: Callable[[], bool] = lambda: True
                               ) -> tuple[WeightsVersion, int, list[str]]:
        """Stages CUDA tensors a colocated process shares by IPC handle (``weights_ipc``)."""
        model = self.registry.get(request.model)
        started = time.perf_counter()
        try:
            # Refused here (another host, no CUDA, a GPU not ours): nothing opened, and the
            # sender's counters are not ours to touch (the client checks host and GPU from
            # ListModels first, so it shares nothing such a daemon would refuse).
            index = weights_ipc.check_placement(model, request)
        except BaseException as exc:
            self._count_op(model.name, "stage", exc)
            raise
        opened: set[str] = set()
        try:
            weights_ipc.check_extents(request)
            upload = self._claim(model, weights_ipc.upload_header(request), author,
                                 "gpu-direct", started)
            try:
                sha = weights_ipc.fill(upload.staging, request, index, is_active, opened)
                if not is_active():
                    raise Cancelled("the call was cancelled; nothing was staged")
            except BaseException:
                upload.discard()
                raise
        except BaseException as exc:
            weights_ipc.release_unopened(request, opened)
            self._count_op(model.name, "stage", exc)
            raise
        return upload.commit(sha)

    def _claim(self, model: ServedModel, header: pb.UpdateConstantBufferHeader, author: str,
               path: str, started: float) -> Upload:
        """A validated staging of ``header``'s constants written in place into the
        model's inactive buffer (claimed until the Upload commits or is discarded)."""
        gauge = self.metrics.staging_bytes.labels(model.name) if self.metrics else None
        staging = StagingUpload(model, header, self.config.max_upload_bytes, self.limits,
                                gauge.inc if gauge else None)
        targets = model.begin_upload(list(staging.declared))
        try:
            staging.allocate(targets)
        except BaseException:
            model.end_upload()
            raise
        return Upload(self, model, staging, author, True, path, started)

    def swap(self, name: str) -> WeightsVersion:
        return self._weights_op(name, "swap", self._timed_flip("swap", lambda m: m.swap(
            self.registry.store)))

    def rollback(self, name: str) -> WeightsVersion:
        return self._weights_op(name, "rollback", self._timed_flip("rollback", lambda m: m.rollback(
            self.registry.store)))

    def _timed_flip(self, op: str, flip: Callable[[ServedModel], WeightsVersion]
                    ) -> Callable[[ServedModel], WeightsVersion]:
        def timed(model: ServedModel) -> WeightsVersion:
            started = time.perf_counter()
            version = flip(model)
            if self.metrics:
                self.metrics.swap_seconds.labels(model.name, op).observe(
                    time.perf_counter() - started)
            return version
        return timed

    def free_inactive(self, name: str) -> None:
        return self._weights_op(name, "free", lambda m: m.free_inactive(self.registry.store))

    def update_from_blob(self, name: str, path: str, author: str) -> WeightsVersion:
        def op(model: ServedModel) -> WeightsVersion:
            resolved = self.resolve_path(path, "weights path", self.config.allowed_roots,
                                         "blob root", "--allowed-root")
            if not _is_file(resolved):
                raise InvalidArgument(f"weights path {path!r} is not a file")
            h = hashlib.sha256()
            with open(resolved, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            version = new_version(h.hexdigest(), author, f"blob {resolved.name}")
            try:
                return model.update_from_blob(str(resolved), version, self.registry.store)
            except (RuntimeError, ValueError) as exc:  # the extension checks size and layout
                raise InvalidArgument(f"weights blob {path!r} was refused: {exc}") from exc
        return self._weights_op(name, "blob", op)
