"""The native data port: Run served by gRPC C++ (runner_ext's NativeRunServer) beside
the Python server, for the models it can take.

The Python daemon stays the one place of truth: it hands a model to the port once
the model is READY (one replica, on the CPU or one GPU; no dynamic batching; dtypes
the port speaks), takes it back before closing its runners, and wraps every change
of the serving weights in the port's lock for that model, so a native Run never
mixes weights and its trailer names the version that served. Same messages, codes and error
texts as the main port's Run; request counts join the Prometheus metrics.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import grpc
import torch
from prometheus_client.core import CounterMetricFamily

from aotiserve import runner_ext

from . import tensor_codec as codec
from .config import ServeConfig

if TYPE_CHECKING:
    from .model_registry import ServedModel

log = logging.getLogger(__name__)

# The dtypes the port reads and writes (wire numbers 1-10).
_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.uint8, torch.bool}


class NativePort:
    def __init__(self, config: ServeConfig, token: str | None):
        if not runner_ext.native_run_available():
            raise RuntimeError(
                "native_run_port is set but this build of aotiserve.runner_ext has no native "
                "data port (gRPC C++ was not found at build time: install libgrpc++-dev and "
                "pkg-config, then reinstall)")
        self._server = runner_ext.NativeRunServer(
            f"{config.host}:{config.native_run_port}", config.max_message_bytes, token or "",
            config.max_queue, config.max_tensor_elements, config.max_tensor_rank,
            config.grpc_workers)
        self.port = self._server.port
        self._models: set[str] = set()
        log.info("native data port (Run) on %s:%d", config.host, self.port)

    @staticmethod
    def why_not(model: "ServedModel") -> str | None:
        """Why the port cannot serve ``model`` (None: it can)."""
        if len(model.replicas) != 1:
            return "placed on several devices"
        if model.replicas[0].pool.device.type not in ("cpu", "cuda"):
            return f"placed on {model.replicas[0].pool.device}"
        if model.batcher is not None:
            return "dynamic batching is on"
        for spec in (*model.inputs, *model.outputs):
            if spec.dtype not in _DTYPES:
                return f"{spec.name!r} has dtype {spec.dtype}"
        if any(s.shape is None for s in model.inputs):
            return "an input's shape is unknown"
        return None

    def add(self, model: "ServedModel") -> None:
        why = self.why_not(model)
        if why is not None:
            log.info("model %r: served on the main port only (%s)", model.name, why)
            return
        replica = model.replicas[0]
        inputs = [(s.name, s.dtype, codec.dtype_name(s.dtype), list(s.shape)) for s in model.inputs]
        run_fn = replica.runner._native_run_fn(str(replica.pool.device))
        self._server.add_model(model.name, run_fn, replica.runner._native_swap_fn(),
                               replica.slot.capacity, inputs, model.weights.active.id)
        self._models.add(model.name)
        model.native = self

    def remove(self, name: str) -> None:
        """Takes the model back; waits for its native runs in flight."""
        if name in self._models:
            self._models.discard(name)
            self._server.remove_model(name)

    def flip(self, model: "ServedModel", version: str) -> None:
        """Swaps the model's buffers (its one replica) and sets the version native runs
        report, in one step under the port's lock, without the GIL: native runs wait for
        the flip alone, never for Python."""
        self._server.flip(model.name, version)

    @contextmanager
    def weights_change(self, model: "ServedModel") -> Iterator[None]:
        """Native runs of ``model`` wait meanwhile; afterwards they report its active version."""
        self._server.lock_weights(model.name)
        try:
            yield
        finally:
            self._server.unlock_weights(model.name, model.weights.active.id)

    def set_draining(self) -> None:
        self._server.set_draining(True)

    def stop(self, grace_s: float) -> None:
        self._server.stop(grace_s)

    def collect(self):
        """Prometheus: the port's Run requests by status code, and the bytes it copied."""
        family = CounterMetricFamily("aotiserve_native_requests", "Runs answered on the native "
                                     "data port, by status code", labels=["code"])
        for code, count in sorted(self._server.counts().items()):
            family.add_metric([_CODE_NAMES.get(code, str(code))], count)
        yield family
        yield CounterMetricFamily(
            "aotiserve_native_copied_bytes", "Payload bytes the native data port copied: "
            "requests joined from several gRPC slices, outputs under 64 KiB copied into the "
            "reply (larger ones are sent from the output tensor itself)",
            value=self._server.copied_bytes())


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
