"""Assembles the daemon: pools, registry, data plane, servicers, the port, metrics.

``create_server(config) -> (server, port)`` binds the port (0 picks one) and
returns an :class:`AppServer`; ``server.start()`` starts serving, loads the
configured models (health turns SERVING once all are loaded) and
``server.stop(grace)`` drains. :func:`serve` runs one until SIGTERM/SIGINT.

One port (server/port.py, gRPC C++) serves every service: the hot path and health in
C++, every other RPC through the bridge (server/bridge.py) to the servicers here.
Another protocol plugs in with one line in :data:`SERVICER_PROVIDERS`: a
``(add_fn(plane, config, server), service_full_name)`` pair, where ``server`` takes
handlers as a ``grpc.Server`` does.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aotiserve import runner_ext

from . import health as served_health
from . import oip_servicer, process_env, runner_servicer
from .bridge import Bridge, collect_handlers, streaming_methods
from .config import ServeConfig
from .dataplane import DataPlane
from .device_pool import DevicePool
from .interceptors import ServingInterceptor
from .metrics import Metrics
from .model_registry import ModelRegistry
from .model_repository import repository_models
from .port import Port
from .weights_store import WeightsStore

log = logging.getLogger(__name__)

ServicerProvider = tuple[Callable[[DataPlane, ServeConfig, Any], None], str]

SERVICER_PROVIDERS: list[ServicerProvider] = [
    (runner_servicer.add_to_server, runner_servicer.SERVICE_NAME),
    (oip_servicer.add_to_server, oip_servicer.SERVICE_NAME),
]


_process_settings_applied = False


def apply_process_settings() -> None:
    """Settings that hold for the whole process, applied once (every server of the
    process shares them)."""
    global _process_settings_applied
    if _process_settings_applied:
        return
    _process_settings_applied = True
    # Decoded inputs are numpy/torch views over the received (immutable) bytes; torch
    # warns about that once per process. Runners never write their inputs.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _freeze_gc() -> None:
    """Everything allocated so far (torch, grpc, the model's objects) lives as long as the
    daemon: out of the cyclic collector's sight, a full collection takes well under a
    millisecond instead of ~80 ms with every request stalled behind it (measured on a
    2-core VM: 177k objects tracked after start-up). Called after each model load."""
    gc.freeze()


def _read_token(path: str | None, what: str = "admin") -> str | None:
    if not path:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{what} token file {path!r} is empty")
    return token


class AppServer:
    """The running daemon. ``port_server`` is the gRPC C++ port underneath."""

    def __init__(self, config: ServeConfig, providers: Sequence[ServicerProvider]):
        apply_process_settings()
        self.config = config
        self.metrics = Metrics()
        self.metrics.watch_cpu_block_cache(runner_ext.cpu_block_cache_stats)
        self.metrics.watch_core_spread(runner_ext.core_spread_stats)
        self.metrics.watch_gpus(config.devices)
        self.pools = {d: DevicePool(d, config.max_queue, self.metrics) for d in config.devices}
        store = WeightsStore(config.weights_dir) if config.weights_dir else None
        self.registry = ModelRegistry(
            self.pools,
            config.devices,
            config.runners_per_model,
            self.metrics,
            store,
            batching=(config.batch_max_size, config.batch_max_delay_us),
            reserve_inactive=config.reserve_inactive_buffer,
            warmup_runs=config.warmup_runs,
        )
        self.registry.on_loaded = _freeze_gc
        self.plane = DataPlane(config, self.registry, self.metrics)
        inference_token = _read_token(config.inference_token_file, "inference")
        admin_token = _read_token(config.admin_token_file)
        # Health/List is answered in Python; Check and Watch by the port (health.cpp).
        self.health = served_health.HealthServicer(
            experimental_non_blocking=True,
            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1),
        )
        self.interceptor = ServingInterceptor(
            self.metrics,
            admin_token,
            is_model=self.registry.__contains__,
            inference_token=inference_token,
            admin_loopback_only=config.admin_loopback_only,
            insecure_admin=config.insecure_admin,
        )
        self.service_names = [name for _add, name in providers]
        adders = [
            lambda server, add=add: add(self.plane, self.config, server) for add, _name in providers
        ]
        adders.append(
            lambda server: health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        )
        adders.append(
            lambda server: reflection.enable_server_reflection(
                (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        )
        handlers = collect_handlers(adders)
        self.port_server = Port(
            config, self.metrics.stats, admin_token, inference_token, streaming_methods(handlers)
        )
        self.registry.port = self.port_server
        self.plane.shared_memory.watch(self.port_server)
        self.metrics.registry.register(self.port_server)
        self.bridge = Bridge(
            self.port_server.server, handlers, self.interceptor, config.grpc_workers
        )
        # The admin port, when there is one, takes the mutating RPCs (the main port then
        # refuses them); it is the same port with a second listener.
        separate_admin = config.admin_port is not None
        self.port = self.port_server.listen(
            f"{config.host}:{config.port}", admin_rpcs=not separate_admin
        )
        self.admin_port: int | None = None
        if separate_admin:
            self.admin_port = self.port_server.listen(
                f"{config.admin_host}:{config.admin_port}", admin_rpcs=True
            )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics_port: int | None = None
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self._stopped = threading.Event()

    def _set_health(self, status) -> None:
        for name in ("", *self.service_names):
            self.health.set(name, status)
            self.port_server.set_health(name, status == health_pb2.HealthCheckResponse.SERVING)

    # Lifecycle ---------------------------------------------------------------

    def start(
        self, load: str = "background", load_gate: Callable[[], None] | None = None
    ) -> AppServer:
        """Starts serving; loads models ``"background"`` (health flips when done) or ``"now"``.

        ``load_gate`` (tests) is called before loading starts.
        """
        if self.config.metrics_enabled:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
        self.bridge.start()
        log.info(
            "aotiserve listening on %s:%d (%s)",
            self.config.host,
            self.port,
            ", ".join(self.service_names),
        )
        if self.admin_port is not None:
            log.info("admin RPCs on %s:%d only", self.config.admin_host, self.admin_port)
        if load == "now":
            self._load(load_gate)
        else:
            threading.Thread(
                target=self._load, args=(load_gate,), name="aotiserve-load", daemon=True
            ).start()
        return self

    def _load(self, gate: Callable[[], None] | None) -> None:
        try:
            if gate is not None:
                gate()
            expected = self.plane.expected_models
            if self.config.model_repository:
                expected.update(repository_models(Path(self.config.model_repository)))
                self.registry.load_repository(self.config.model_repository)
            if self.config.serve_demo:
                from .demo import DEMO_MODEL, ensure_demo_package

                expected.add(DEMO_MODEL)
                path = ensure_demo_package(self.config.demo_cache_dir)
                self.registry.load(DEMO_MODEL, path, self.registry.options())
            if self.plane.ready():
                self._set_health(health_pb2.HealthCheckResponse.SERVING)
                log.info(
                    "serving: %s",
                    ", ".join(m.name for m in self.registry.models()) or "no models yet",
                )
                self._write_ready_file()
        except BaseException as exc:  # noqa: BLE001 (reported via health and the log)
            self.load_error = exc
            log.exception("loading the configured models failed; health stays NOT_SERVING")
        finally:
            self.loaded.set()

    def _write_ready_file(self) -> None:
        if not self.config.ready_file:
            return
        path = Path(self.config.ready_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "port": self.port,
                    "metrics_port": self.metrics_port,
                    "admin_port": self.admin_port,
                    "pid": os.getpid(),
                }
            )
        )
        os.replace(tmp, path)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Drains: NOT_SERVING, refuse new calls, give in-flight ones ``grace`` seconds.

        New calls get UNAVAILABLE from the interceptor while the accepted ones
        finish; only then does the gRPC server stop (so no accepted call is
        cancelled by the transport shutting down).
        """
        grace = self.config.grace_period_s if grace is None else grace
        self.plane.draining = True
        self.port_server.set_draining()  # new calls: UNAVAILABLE; health: NOT_SERVING
        self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace

        def finish():
            if not self.port_server.wait_idle(grace):
                log.warning(
                    "grace period of %.1fs over with calls in flight; cancelling them", grace
                )
            # Keep answering UNAVAILABLE a moment, so clients and load balancers move away
            # before the port closes.
            self._stopped.wait(
                min(self.config.drain_delay_s, max(0.0, deadline - time.monotonic()))
            )
            self.port_server.stop(deadline - time.monotonic())
            self.bridge.join(max(0.0, deadline - time.monotonic()) + 1.0)
            self.registry.close()
            self.plane.shared_memory.close()
            self.metrics.stop()
            self._stopped.set()
            log.info("stopped")

        threading.Thread(target=finish, name="aotiserve-stop", daemon=True).start()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def create_server(
    config: ServeConfig, providers: Sequence[ServicerProvider] | None = None
) -> tuple[AppServer, int]:
    """Builds the daemon and binds its port (not started yet). Returns (server, port)."""
    server = AppServer(config, SERVICER_PROVIDERS if providers is None else providers)
    return server, server.port


# A kept CPU block unused this long goes back to the system (a burst of large requests
# leaves no memory behind once it is over).
CPU_BLOCK_IDLE_S = 10.0


def serve(config: ServeConfig) -> int:
    """Runs the daemon until SIGTERM/SIGINT; drains within the grace period; returns 0."""
    if config.cpu_block_cache_bytes:  # process-wide, so the daemon's and not create_server's
        runner_ext.install_cpu_block_cache(config.cpu_block_cache_bytes)
    runner_ext.set_core_spread(config.spread_runs)
    server, port = create_server(config)
    stop_requested = threading.Event()

    def on_signal(signum, _frame):
        log.info(
            "received %s: draining (grace %.1fs)",
            signal.Signals(signum).name,
            config.grace_period_s,
        )
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    while not stop_requested.wait(0.5):
        runner_ext.trim_cpu_block_cache(CPU_BLOCK_IDLE_S)
        process_env.HEAP.run_pending()
    started = time.monotonic()
    server.stop(config.grace_period_s).wait(config.grace_period_s + 30)
    log.info("drained in %.2fs", time.monotonic() - started)
    return 0
