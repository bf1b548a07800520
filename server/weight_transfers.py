"""Weights in and out over streams: uploads being staged, extracts being read.

An :class:`Upload` holds one ``UpdateConstantBuffer`` stream's staging
(``weights.StagingUpload``) until it is committed or discarded;
:func:`extract_chunks` reads a model's buffers out in pieces while they keep the
weights the read started with. :class:`TransferSlots` bounds how many of either
run at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import torch

from aotiserve import runner_ext

from . import tensor_codec as codec
from .errors import ResourceExhausted
from .model_types import ConstantChunk, WeightsVersion
from .served_model import ServedModel
from .weights import StagingUpload, background_priority, new_version

if TYPE_CHECKING:
    from .weights_store import WeightsStore

log = logging.getLogger(__name__)
T = TypeVar("T")

# (model, op, exception or None): counts a weights operation's outcome.
CountOp = Callable[[str, str, "BaseException | None"], None]
# (model, path, bytes, seconds): one staging finished (Metrics.staged).
OnStaged = Callable[[str, str, int, float], None]


class Upload:
    """A weight upload in progress (see ``weights.StagingUpload``)."""

    def __init__(
        self,
        model: ServedModel,
        staging: StagingUpload,
        author: str,
        claimed: bool,
        store: WeightsStore | None,
        count_op: CountOp,
        on_staged: OnStaged | None = None,
        path: str = "upload",
        started: float | None = None,
    ):
        self.path = path  # how the bytes came: upload, file, gpu-direct (metrics)
        self._started = time.perf_counter() if started is None else started
        self.model = model
        self.staging = staging
        self.author = author
        self._claimed = claimed  # holds the model's inactive buffer (ModelWeights.begin_upload)
        self._store = store
        self._count_op = count_op
        self._on_staged = on_staged

    def add_chunk(self, name: str, offset: int, data: bytes | memoryview) -> None:
        self.staging.add_chunk(name, offset, data)

    def commit(self, digest: str | None = None) -> tuple[WeightsVersion, int, list[str]]:
        """Validates completeness and writes the weights; returns (version, bytes, names).
        ``digest``: the version's, computed by the caller (else the tree hash)."""
        model = self.model
        try:
            tensors, digest = self.staging.finish(digest)
            version = new_version(digest, self.author, self.staging.header.description)
            model.weights.stage(tensors, self.staging.use_inactive, version, self._store)
        except BaseException as exc:
            self.discard()
            self._count_op(model.name, "stage", exc)
            raise
        received = self.staging.bytes_received
        if self._on_staged is not None:
            self._on_staged(model.name, self.path, received, time.perf_counter() - self._started)
        self._count_op(model.name, "stage", None)
        names = sorted(self.staging.staged)
        self.discard()
        log.info(
            "model %r: %s weights version %s (%d constants, %d bytes, %s) from %s in %.3fs",
            model.name,
            "staged" if self.staging.use_inactive else "updated active to",
            version.id,
            len(names),
            received,
            self.path,
            self.author or "?",
            time.perf_counter() - self._started,
        )
        return version, received, names

    def discard(self) -> None:
        """Drops staging and releases the model's inactive buffer (idempotent)."""
        self.staging.discard()
        runner_ext.empty_cpu_block_cache()  # a cut-off upload's memory goes back at once
        if self._claimed:
            self._claimed = False
            self.model.weights.end_upload()


def extract_chunks(
    model: ServedModel, tensors: dict[str, torch.Tensor], chunk: int, is_active: Callable[[], bool]
) -> Iterator[ConstantChunk]:
    """``tensors`` (views of the model's buffers, by name) in pieces of ``chunk`` bytes.

    The tensors alias the runner's buffers (no copy). Each read holds the buffers
    alive (an unload waits for it, and fails later reads) and checks they still hold
    the weights the stream started with (a swap or upload aborts the stream). Stops
    when ``is_active()`` turns false (the client went away).
    """
    snapshot = model.weights.snapshot()
    for name in sorted(tensors):
        tensor = tensors[name]
        shape = tuple(tensor.shape)
        with model.using_buffers():
            model.weights.check(snapshot)
            host = tensor if tensor.device.type == "cpu" else tensor.cpu()
            data = codec.byte_view(host.contiguous()).numpy()
        size = data.nbytes
        offset = 0
        while True:
            if not is_active():
                return
            end = min(size, offset + chunk)
            with model.using_buffers():
                model.weights.check(snapshot)
                payload = data[offset:end].tobytes()
            yield ConstantChunk(name, offset, payload, tensor.dtype, shape)
            offset = end
            if offset >= size:
                break


class TransferSlots:
    """At most ``limit`` weight uploads and downloads at once, received on threads of
    background priority (gRPC's handler thread waits): an upload takes the cores only
    where Runs leave them."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self.open = 0
        self._pool = cf.ThreadPoolExecutor(
            max_workers=limit, thread_name_prefix="aotiserve-stage", initializer=background_priority
        )

    @contextmanager
    def hold(self, what: str) -> Iterator[None]:
        """Holds one place; none free: RESOURCE_EXHAUSTED (the stream would hold a worker
        thread Runs need)."""
        with self._lock:
            if self.open >= self.limit:
                raise ResourceExhausted(
                    f"{what}: {self.limit} weight uploads/downloads are in progress, the most "
                    "this server runs at once (max_weight_streams); retry later"
                )
            self.open += 1
        try:
            yield
        finally:
            with self._lock:
                self.open -= 1

    def in_background(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a background-priority stream thread; its result or its exception."""
        return self._pool.submit(contextvars.copy_context().run, fn).result()
