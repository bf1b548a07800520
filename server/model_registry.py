"""Which models the daemon serves: name → :class:`ServedModel`, loading and unloading.

The registry validates placements against the device pools, loads a model (its
runners, its committed weights, warm-up) before it turns READY, hands READY models
to the port's hot path, and unloads a model once its runs in flight are done.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aotiserve import runner_ext

from . import warmup
from .device_pool import DevicePool
from .errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from .metrics import Metrics
from .model_repository import read_model_options, repository_models
from .model_types import ModelOptions, ModelState
from .served_model import ServedModel
from .weights_store import WeightsStore

log = logging.getLogger(__name__)


class ModelRegistry:
    """Name → ServedModel, plus the device pools they are placed on."""

    def __init__(
        self,
        pools: Mapping[str, DevicePool],
        default_devices: Sequence[str],
        default_runners: int,
        metrics: Metrics | None = None,
        store: WeightsStore | None = None,
        batching: tuple[int, int] = (0, 500),
        reserve_inactive: bool = False,
        warmup_runs: int = 1,
    ):
        self.pools = dict(pools)
        self.default_devices = tuple(default_devices)
        self.default_runners = default_runners
        self.metrics = metrics
        self.store = store
        self.batching = batching
        self.reserve_inactive = reserve_inactive
        self.warmup_runs = warmup_runs
        # The port (port.Port): READY models it can serve are handed to it.
        self.port: Any = None
        # Called after each model turns READY (app: process-wide settings such as gc.freeze).
        self.on_loaded: Callable[[], None] | None = None
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

    def options(
        self, devices: Sequence[str] = (), runners: int = 0, package_model: str | None = None
    ) -> ModelOptions:
        devices = tuple(devices) or self.default_devices
        twice = sorted({d for d in devices if devices.count(d) > 1})
        if twice:
            raise InvalidArgument(
                f"device(s) {', '.join(twice)} named more than once (a model has one replica "
                "per device; runners_per_device sets how many runs each takes at once)"
            )
        unknown = [d for d in devices if d not in self.pools]
        if unknown:
            raise InvalidArgument(
                f"device(s) {', '.join(unknown)} are not served here "
                f"(configured: {', '.join(self.pools)})"
            )
        if runners < 0:
            raise InvalidArgument(f"runners_per_device must be positive, got {runners}")
        return ModelOptions(
            devices,
            runners or self.default_runners,
            package_model or None,
            batch_max_size=self.batching[0],
            batch_max_delay_us=self.batching[1],
            reserve_inactive=self.reserve_inactive,
            warmup_runs=self.warmup_runs,
        )

    def load(self, name: str, path: str | os.PathLike, options: ModelOptions) -> ServedModel:
        if not name or "/" in name:
            raise InvalidArgument(f"invalid model name {name!r}")
        model = ServedModel(name, str(path), options, self.metrics)
        with self._lock:
            existing = self._models.get(name)
            if existing is not None and existing.state in (
                ModelState.LOADING,
                ModelState.UNLOADING,
            ):
                raise Unavailable(
                    f"model {name!r} is {existing.state.name.lower()}; retry once it is done"
                )
            if existing is not None and existing.state != ModelState.FAILED:
                raise AlreadyExists(f"model {name!r} is already loaded (unload it first)")
            self._models[name] = model
        started = time.monotonic()
        try:
            model.load(self.pools)
            if self.store is not None:
                committed = self.store.committed(name)
                if committed is not None and committed[1] is not None:
                    model.weights.restore(committed[0], committed[1])
                    log.info(
                        "model %r: serving committed weights version %s", name, committed[0].id
                    )
            if options.reserve_inactive:
                model.weights.reserve_inactive()
            # READY only once every replica ran: the first requests pay no lazy start-up.
            warmup.warm_up(name, model.replicas, model.inputs, options.warmup_runs, options.runners)
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
        model.weights.gauge_version()
        if self.on_loaded is not None:
            self.on_loaded()
        if self.metrics:
            self.metrics.model_loads.labels(name, "ok").inc()
        log.info(
            "model %r loaded from %s on %s (%d runners each) in %.2fs",
            name,
            path,
            ",".join(model.devices),
            options.runners,
            time.monotonic() - started,
        )
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
            model.begin_unloading()
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
