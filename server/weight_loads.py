"""Every way weights come in: an upload stream, a safetensors file or folder below an
allowed root (``weights_pull``), CUDA tensors a colocated process shares (``weights_ipc``),
or a weights blob.

The first three claim the model's inactive buffer and end in the same
``weight_transfers.Upload`` commit (validated, hashed, versioned, persisted); a blob is
loaded into the active buffer by the runner itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from . import safetensors_source, weights_ipc, weights_pull
from .config import ServeConfig
from .errors import Cancelled, InvalidArgument
from .metrics import Metrics
from .model_registry import ModelRegistry
from .model_types import CudaHandoff, UploadHeader, WeightsVersion
from .paths import is_file, resolve_below
from .served_model import ServedModel
from .tensor_codec import Limits
from .weight_transfers import CountOp, Upload
from .weights import StagingUpload, file_digest, new_version


class WeightLoads:
    """Stagings and loads behind the data plane (``DataPlane.begin_upload``, ``load_weights``,
    ``load_weights_from_cuda``, ``update_from_blob``)."""

    def __init__(
        self,
        config: ServeConfig,
        registry: ModelRegistry,
        limits: Limits,
        metrics: Metrics | None,
        count_op: CountOp,
    ):
        self._config = config
        self._registry = registry
        self._limits = limits
        self._metrics = metrics
        self._count_op = count_op

    def begin_upload(self, header: UploadHeader, author: str) -> Upload:
        """An ``UpdateConstantBuffer`` stream's staging: the header checked against the
        model, then (``use_inactive``) the inactive buffer claimed and written in place."""
        model = self._registry.get(header.model)
        try:
            gauge = self._metrics.staging_bytes.labels(model.name) if self._metrics else None
            staging = StagingUpload(
                model,
                header,
                self._config.max_upload_bytes,
                self._limits,
                gauge.inc if gauge else None,
            )
            # Header valid: claim the inactive buffer and write into it in place.
            claimed = header.use_inactive
            targets = model.weights.begin_upload(list(staging.declared)) if claimed else None
            try:
                staging.allocate(targets)
            except BaseException:
                if claimed:
                    model.weights.end_upload()
                raise
        except BaseException as exc:
            self._count_op(model.name, "stage", exc)
            raise
        return Upload(
            model,
            staging,
            author,
            claimed,
            self._registry.store,
            self._count_op,
            self._metrics.staged if self._metrics else None,
        )

    def load_blob(self, model: ServedModel, path: str, author: str) -> WeightsVersion:
        """A weights blob below a blob root into the active buffer of every replica."""
        resolved = resolve_below(
            path, "weights path", self._config.allowed_roots, "blob root", "--allowed-root"
        )
        if not is_file(resolved):
            raise InvalidArgument(f"weights path {path!r} is not a file")
        version = new_version(file_digest(resolved), author, f"blob {resolved.name}")
        try:
            return model.weights.update_from_blob(str(resolved), version, self._registry.store)
        except (RuntimeError, ValueError) as exc:  # the extension checks size and layout
            raise InvalidArgument(f"weights blob {path!r} was refused: {exc}") from exc

    def load_file(
        self,
        name: str,
        path: str,
        validate_full: bool,
        description: str,
        author: str,
        is_active: Callable[[], bool] = lambda: True,
    ) -> tuple[WeightsVersion, int, list[str]]:
        """Stages a safetensors file (or sharded folder) below an allowed root into the
        inactive buffer (``weights_pull``); returns (version, bytes, constants written)."""
        model = self._registry.get(name)
        started = time.perf_counter()
        try:
            resolved = resolve_below(
                path, "weights path", self._config.allowed_roots, "weights root", "--allowed-root"
            )
            check = safetensors_source.check_below([Path(r) for r in self._config.allowed_roots])
            with safetensors_source.open_source(
                resolved, check, self._limits, self._limits.max_constants
            ) as source:
                header, entries = weights_pull.upload_header(
                    name, source, validate_full, description
                )
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

    def load_from_cuda(
        self, request: CudaHandoff, author: str, is_active: Callable[[], bool] = lambda: True
    ) -> tuple[WeightsVersion, int, list[str]]:
        """Stages CUDA tensors a colocated process shares by IPC handle (``weights_ipc``)."""
        model = self._registry.get(request.model)
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
            upload = self._claim(
                model, weights_ipc.upload_header(request), author, "gpu-direct", started
            )
            try:
                digest = weights_ipc.fill(upload.staging, request, index, is_active, opened)
                if not is_active():
                    raise Cancelled("the call was cancelled; nothing was staged")
            except BaseException:
                upload.discard()
                raise
        except BaseException as exc:
            weights_ipc.release_unopened(request, opened)
            self._count_op(model.name, "stage", exc)
            raise
        return upload.commit(digest)

    def _claim(
        self, model: ServedModel, header: UploadHeader, author: str, path: str, started: float
    ) -> Upload:
        """A validated staging of ``header``'s constants written in place into the
        model's inactive buffer (claimed until the Upload commits or is discarded)."""
        gauge = self._metrics.staging_bytes.labels(model.name) if self._metrics else None
        staging = StagingUpload(
            model, header, self._config.max_upload_bytes, self._limits, gauge.inc if gauge else None
        )
        targets = model.weights.begin_upload(list(staging.declared))
        try:
            staging.allocate(targets)
        except BaseException:
            model.weights.end_upload()
            raise
        return Upload(
            model,
            staging,
            author,
            True,
            self._registry.store,
            self._count_op,
            self._metrics.staged if self._metrics else None,
            path,
            started,
        )
