"""The daemon's one port: gRPC C++ (``runner_ext.PortServer``) serving every service.

The C++ side answers ``Run`` and OIP ``ModelInfer`` for the models handed to it
(parse with bounds, least-loaded replica, admission per device, the run, the reply),
and health; everything else goes through the bridge (server/bridge.py) to the Python
servicers. This module is the Python daemon's handle on it: it binds the listeners,
hands READY models to the hot path and takes them back before their runners close,
wraps every change of a model's serving weights in the port's lock for that model (so
a run never mixes weights and its trailer names the version that served it), and
forwards the port's log lines to ``logging``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily

from aotiserve import runner_ext
from aotiserve.client import dtypes

from . import tensor_codec as codec
from . import warmup
from .config import ServeConfig
from .io_specs import LOWERBOUND_HINT
from .log_limit import OncePerInterval

if TYPE_CHECKING:
    import torch

    from .served_model import ServedModel

log = logging.getLogger(__name__)

# The port's lines that are the model runtime's or gRPC's own output
# (runner_ext/csrc/runtime_output.cpp): warnings, not the daemon's errors.
RUNTIME_PREFIXES = ("model runtime: ", "grpc: ")


def _dtype_table() -> list[tuple[int, int, str, str]]:
    return [(d.wire, d.scalar_type, d.torch_name, d.oip_name or "") for d in dtypes.DTYPES]


def _pem(path: str | None) -> str:
    return Path(path).read_text() if path else ""


class Port:
    """The port of one daemon. ``listen`` binds; serving starts at once."""

    def __init__(
        self,
        config: ServeConfig,
        stats: runner_ext.PortStats,
        admin_token: str | None,
        inference_token: str | None,
        streaming: Sequence[str],
    ):
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        runner_ext.port_set_dtypes(_dtype_table())
        self._line_limit = OncePerInterval()
        self._server = runner_ext.PortServer(
            {
                "max_message_bytes": config.max_message_bytes,
                # The hot path has no mutating RPC: the admin token is one more token its
                # calls accept where an inference token is required.
                "admin_token": admin_token or "",
                "inference_token": inference_token or "",
                "max_inputs": config.max_inputs,
                "max_rank": config.max_tensor_rank,
                "max_elements": config.max_tensor_elements,
                "max_queue": config.max_queue,
                "workers": config.grpc_workers,
                "max_threads": config.max_concurrent_rpcs,
                "max_pending": config.max_concurrent_rpcs,
                "max_calls": config.max_concurrent_rpcs,
                "max_streams": config.max_streams,
                "stream_idle_s": config.stream_idle_timeout_s,
                "max_concurrent_streams": config.max_concurrent_streams,
                "max_connection_idle_ms": int(config.connection_idle_timeout_s * 1000),
                "tls_cert": _pem(config.tls_cert),
                "tls_key": _pem(config.tls_key),
                "tls_ca": _pem(config.tls_ca),
                "lowerbound_hint": LOWERBOUND_HINT,
                "streaming": list(streaming),
            },
            stats,
        )
        self._gpu_slot_threads = config.gpu_slot_threads
        self._gpu_slot_spin_us = config.gpu_slot_spin_us
        self._models: set[str] = set()
        self._log_thread = threading.Thread(
            target=self._forward_log, name="aotiserve-port-log", daemon=True
        )
        self._log_thread.start()

    @property
    def server(self) -> runner_ext.PortServer:
        return self._server

    def listen(self, address: str, admin_rpcs: bool) -> int:
        port = self._server.listen(address, admin_rpcs)
        if port == 0:
            raise OSError(f"could not bind {address}")
        return port

    # Models ------------------------------------------------------------------

    @staticmethod
    def why_not(model: ServedModel) -> str | None:
        """Why the hot path leaves ``model``'s runs to Python (None: it takes them)."""
        for replica in model.replicas:
            if replica.pool.device.type not in ("cpu", "cuda"):
                return f"placed on {replica.pool.device}"
        return None

    def add(self, model: ServedModel, warm: bool = False) -> None:
        """Serves ``model``'s runs here; ``warm``: runs through the hot path first, one per
        replica, and on a GPU one per run slot of each replica (a slot's stream, the memory
        cached for it and the pinned buffers start lazily, like the model did)."""
        why = self.why_not(model)
        if why is not None:
            log.info("model %r: runs answered in Python (%s)", model.name, why)
            return
        inputs = []
        for s in model.inputs:
            wire = codec.WIRE_BY_TORCH_DTYPE.get(s.dtype) if s.dtype else None
            shape = list(s.shape) if s.shape is not None else None
            lower = list(s.min_shape) if s.min_shape is not None and shape is not None else []
            upper = list(s.max_shape) if s.max_shape is not None and shape is not None else []
            inputs.append(
                (s.name, wire, shape, lower, upper, s.bounds_text() if shape is not None else "")
            )
        replicas = [
            (
                r.runner._hot_run_fn(
                    str(r.pool.device), self._gpu_slot_threads, self._gpu_slot_spin_us
                ),
                r.runner._hot_swap_fn(),
                r.slot.capacity,
                r.pool.name,
            )
            for r in model.replicas
        ]
        batcher = model.batcher  # its settings; the port batches the runs it answers
        self._server.add_model(
            model.name,
            inputs,
            [s.name for s in model.outputs],
            replicas,
            model.weights.active.id,
            batcher.max_size if batcher is not None else 0,
            batcher.max_delay_s if batcher is not None else 0.0,
            [list(group) for group in model.ties],
        )
        if warm:
            self._warm(model)
        self._models.add(model.name)
        model.port = self

    def _warm(self, model: ServedModel) -> None:
        sets = warmup.input_sets(model.inputs, model.replicas)
        if not sets:
            return
        failed: list[BaseException] = []

        def warm() -> None:
            try:
                for tensors in sets:
                    self._server.warm(model.name, tensors)
            except Exception as exc:  # noqa: BLE001 (warm-up already judged the model)
                failed.append(exc)

        # On a thread that ends here: what it creates per thread (cuDNN/cuBLAS handles) goes
        # back to torch's pools for the port's threads (server/warmup.py).
        thread = threading.Thread(target=warm, name="aotiserve-warmup")
        thread.start()
        thread.join()
        if failed:
            log.warning(
                "model %r: hot-path warm-up failed: %s", model.name, str(failed[0]).split("\n")[0]
            )

    def remove(self, name: str) -> None:
        """Takes the model back; waits for its runs in flight."""
        if name in self._models:
            self._models.discard(name)
            self._server.remove_model(name)

    def flip(self, model: ServedModel, version: str) -> None:
        """Swaps every replica's buffers and sets the version runs report, in one step
        under the port's lock, without the GIL: runs wait for the flip alone."""
        self._server.flip(model.name, version)

    @contextmanager
    def weights_change(self, model: ServedModel) -> Iterator[None]:
        """The model's C++ runs wait meanwhile; afterwards they report its active version."""
        self._server.lock_weights(model.name)
        try:
            yield
        finally:
            self._server.unlock_weights(model.name, model.weights.active.id)

    @contextmanager
    def holding_a_runner(self, model: str) -> Iterator[None]:
        """Occupies one of the model's runners meanwhile, as a run would (operators'
        tooling and tests hold a model busy with it)."""
        if not self._server.hold_runner(model):
            raise RuntimeError(f"model {model!r}: no runner free on the port's hot path")
        try:
            yield
        finally:
            self._server.release_runner(model)

    # Lifecycle ---------------------------------------------------------------

    def region_added(self, kind: str, name: str, data: torch.Tensor) -> None:
        """An OIP shared-memory region the hot path may read inputs from and write outputs
        to (``shared_memory.SharedMemoryRegions`` calls it)."""
        self._server.set_region(kind, name, data)

    def region_removed(self, kind: str, name: str) -> None:
        self._server.drop_region(kind, name)

    def set_health(self, service: str, serving: bool) -> None:
        self._server.set_health(service, serving)

    def set_draining(self) -> None:
        self._server.set_draining()

    def wait_idle(self, timeout: float) -> bool:
        return self._server.wait_idle(max(0.0, timeout))

    def stop(self, grace_s: float) -> None:
        self._server.stop(max(0.0, grace_s))

    def flush_log(self) -> None:
        """Logs what the port has queued now (the log thread does so as lines come)."""
        for line in self._server.pending_log():
            self._log_line(line)

    def _log_line(self, line: str) -> None:
        """One of the port's lines: its failures (``ModelInfer failed: ...``, ``model 'm':
        run failed: ...``), the model runtime's own output (``model runtime: ...``, what
        AOTInductor prints for each failed run) and gRPC's (``grpc: ...``, e.g. a refused TLS
        handshake), each kind at most once a minute after the first (callers can trigger
        them at will)."""
        key = ": ".join(line.split(": ", 2)[:2])[:200]
        runtime = line.startswith(RUNTIME_PREFIXES)
        level = logging.WARNING if runtime else logging.ERROR
        self._line_limit.note(key, lambda more: log.log(level, "%s%s", line, more))

    def watchers(self) -> int:
        """Service names with a health Watch open now."""
        return self._server.watchers()

    def pool_state(self, device: str) -> tuple[int, int]:
        """(running, waiting) of the hot path's runs on ``device``."""
        return self._server.pool_state(device)

    def _forward_log(self) -> None:
        while (line := self._server.next_log()) is not None:
            self._log_line(line)

    def collect(self):
        """Prometheus: the payload bytes the port copied."""
        yield CounterMetricFamily(
            "aotiserve_port_copied_bytes",
            "Payload bytes the port copied: requests joined from "
            "several gRPC slices, inputs not aligned as torch aligns tensors, outputs under "
            "64 KiB copied into the reply (larger ones are sent from the output tensor itself)",
            value=self._server.copied_bytes(),
        )
