"""Every Prometheus object of the daemon, with fixed label lists.

Each :class:`Metrics` owns its own registry, so several servers in one
process (tests) do not collide; :meth:`Metrics.serve` exposes it over HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from aotiserve import runner_ext

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Weight stagings: a small model's in milliseconds to many GiB in tens of seconds.
_WEIGHTS_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
# Rows per batched run: powers of two (batch_max_size is at most what a model takes).
_BATCH_BUCKETS = tuple(float(1 << i) for i in range(17))


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # Requests and runs are counted in C++ (runner_ext PortStats), by the port for the
        # calls it answers and by the interceptor and data plane for the others; the
        # families are made from it at each scrape (_request_families).
        self.stats = runner_ext.PortStats(list(_LATENCY_BUCKETS))
        r.register(_StatsCollector(self.stats.stats, _request_families))
        self.queue_depth = Gauge(
            "aotiserve_queue_depth", "Runs waiting for a runner", ["device"], registry=r
        )
        self.running = Gauge("aotiserve_running", "Runs executing now", ["device"], registry=r)
        self.model_loads = Counter(
            "aotiserve_model_loads_total",
            "Model loads by outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.constant_buffer_ops = Counter(
            "aotiserve_constant_buffer_ops_total",
            "Weight operations by outcome",
            ["model", "op", "outcome"],
            registry=r,
        )
        self.staged_bytes = Counter(
            "aotiserve_staged_bytes_total",
            "Weight bytes staged, by the path they came "
            "(upload: UpdateConstantBuffer; file: LoadWeights; gpu-direct: LoadWeightsFromCuda)",
            ["model", "path"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "aotiserve_weights_stage_seconds",
            "Time to stage weights (validate, write, hash, hand over), by path",
            ["model", "path"],
            buckets=_WEIGHTS_BUCKETS,
            registry=r,
        )
        self.swap_seconds = Histogram(
            "aotiserve_weights_swap_seconds",
            "Time of a swap or rollback RPC's flip",
            ["model", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # model -> created_unix_ms of the version serving (the age gauge is made per scrape).
        self._active_created: dict[str, int] = {}
        r.register(_StatsCollector(lambda: dict(self._active_created), _age_families))
        self.staging_bytes = Gauge(
            "aotiserve_staging_bytes", "Bytes held by uploads in progress", ["model"], registry=r
        )
        self.weights_version = Gauge(
            "aotiserve_weights_version_info",
            "1 for the weights version serving now",
            ["model", "version", "digest"],
            registry=r,
        )
        self._http = None

    def sample(self, name: str, **labels: str) -> float:
        """One sample's value as a scrape would show it (0.0 when absent)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def staged(self, model: str, path: str, nbytes: int, seconds: float) -> None:
        """One staging finished: its bytes and duration, by path."""
        self.staged_bytes.labels(model, path).inc(nbytes)
        self.stage_seconds.labels(model, path).observe(seconds)

    def set_active_version(
        self, model: str, version: str, digest: str, created_unix_ms: int | None = None
    ) -> None:
        """Keeps exactly one weights_version series per model at 1."""
        if created_unix_ms is not None:
            self._active_created[model] = created_unix_ms
        for labels in list(self.weights_version._metrics):  # noqa: SLF001 (no public API)
            if labels[0] == model:
                self.weights_version.remove(*labels)
        # "<algorithm>:<first 16 hex digits>": enough to tell versions apart on a dashboard.
        algorithm, _, hexpart = digest.rpartition(":")
        label = f"{algorithm}:{hexpart[:16]}" if algorithm else hexpart[:16]
        self.weights_version.labels(model, version, label).set(1)

    def forget_model(self, model: str) -> None:
        self._active_created.pop(model, None)
        for labels in list(self.weights_version._metrics):  # noqa: SLF001
            if labels[0] == model:
                self.weights_version.remove(*labels)

    def watch_cpu_block_cache(self, stats: Callable[[], dict | None]) -> None:
        """Exposes the CPU block cache (runner_ext) at each scrape; nothing while it is off."""
        self.registry.register(_StatsCollector(stats, _cpu_block_cache_families))

    def watch_core_spread(self, stats: Callable[[], dict | None]) -> None:
        """Exposes where long CPU runs were pinned (runner_ext) at each scrape; nothing if off."""
        self.registry.register(_StatsCollector(stats, _core_spread_families))

    def watch_gpus(self, devices: Iterable[str]) -> None:
        """Per CUDA device the daemon serves on: memory held by torch's allocator, and the
        device's utilisation and memory from NVML when nvidia-ml-py is installed."""
        cuda = sorted({d for d in devices if d.split(":")[0] == "cuda"})
        if cuda:
            self.registry.register(_GpuCollector([d if ":" in d else "cuda:0" for d in cuda]))

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP exposition on host:port (0 picks one); returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        actual = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, actual)
        return actual

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _StatsCollector:
    """Metric families made at each scrape from a stats dict of the extension's
    (``families(stats)``); none while ``stats()`` returns None (the feature is off)."""

    def __init__(
        self, stats: Callable[[], dict | None], families: Callable[[dict], Iterable]
    ) -> None:
        self._stats = stats
        self._families = families

    def collect(self):
        s = self._stats()
        if s is not None:
            yield from self._families(s)


_CODE_NAMES = {}


def _code_name(code: int) -> str:
    if not _CODE_NAMES:
        import grpc  # the daemon has it; kept out of import time for tools reading metrics

        _CODE_NAMES.update({c.value[0]: c.name for c in grpc.StatusCode})
    return _CODE_NAMES.get(code, str(code))


def _histogram(family: HistogramMetricFamily, labels: list[str], bounds, cumulative, total) -> None:
    buckets = [(repr(float(b)), cumulative[i]) for i, b in enumerate(bounds)]
    buckets.append(("+Inf", cumulative[-1]))
    family.add_metric(labels, buckets, total)


def _request_families(s: dict):
    bounds = s["buckets"]
    requests = CounterMetricFamily(
        "aotiserve_requests",
        "RPCs by model, method and status code",
        labels=["model", "method", "code"],
    )
    latency = HistogramMetricFamily(
        "aotiserve_request_seconds", "Whole RPC latency", labels=["model", "method"]
    )
    for model, method, codes, cumulative, total in s["methods"]:
        for code, n in sorted(codes.items()):
            requests.add_metric([model, method, _code_name(code)], n)
        _histogram(latency, [model, method], bounds, cumulative, total)
    yield requests
    yield latency
    queue = HistogramMetricFamily(
        "aotiserve_queue_seconds", "Time a run waited for a free runner", labels=["model", "device"]
    )
    compute = HistogramMetricFamily(
        "aotiserve_compute_seconds",
        "Time in the runner (incl. device copies)",
        labels=["model", "device"],
    )
    runs = CounterMetricFamily(
        "aotiserve_device_requests",
        "Runs executed, by model and device",
        labels=["model", "device"],
    )
    for model, device, q_cum, q_sum, c_cum, c_sum, n in s["devices"]:
        _histogram(queue, [model, device], bounds, q_cum, q_sum)
        _histogram(compute, [model, device], bounds, c_cum, c_sum)
        runs.add_metric([model, device], n)
    yield queue
    yield compute
    yield runs
    in_flight = GaugeMetricFamily(
        "aotiserve_in_flight_requests", "RPCs being handled", labels=["method"]
    )
    for method, n in sorted(s["in_flight"].items()):
        in_flight.add_metric([method], n)
    yield in_flight
    model_in_flight = GaugeMetricFamily(
        "aotiserve_model_in_flight_requests",
        "Inference requests of the model admitted to run: waiting for a runner or running",
        labels=["model"],
    )
    queued = GaugeMetricFamily(
        "aotiserve_model_queued_requests",
        "Runs of the model waiting for a free runner (a dynamic batch counts once)",
        labels=["model"],
    )
    for model, (n_in_flight, n_queued) in sorted(s["load"].items()):
        model_in_flight.add_metric([model], n_in_flight)
        queued.add_metric([model], n_queued)
    yield model_in_flight
    yield queued
    batch = HistogramMetricFamily(
        "aotiserve_batch_size",
        "Rows per run of dynamically batched models (each run once)",
        labels=["model"],
    )
    sizes: dict[str, dict[int, int]] = {}
    for model, size, runs, _compute_ns in s["batches"]:
        sizes.setdefault(model, {})[size] = runs
    for model, runs in sorted(sizes.items()):
        cumulative = [
            sum(n for size, n in runs.items() if size <= bound) for bound in _BATCH_BUCKETS
        ]
        cumulative.append(sum(runs.values()))
        _histogram(
            batch, [model], _BATCH_BUCKETS, cumulative, sum(size * n for size, n in runs.items())
        )
    yield batch
    hot = CounterMetricFamily(
        "aotiserve_hot_path_requests",
        "Requests the port's C++ hot path answered itself (the others were answered in Python)",
        labels=["method"],
    )
    for method, n in sorted(s["hot"].items()):
        hot.add_metric([method], n)
    yield hot


def _cpu_block_cache_families(s: dict):
    yield GaugeMetricFamily(
        "aotiserve_cpu_block_cache_bytes",
        "Freed large CPU blocks kept for reuse",
        value=s["cached_bytes"],
    )
    family = CounterMetricFamily(
        "aotiserve_cpu_block_cache_allocations",
        "Large CPU allocations, by whether a kept block served them",
        labels=["outcome"],
    )
    family.add_metric(["hit"], s["hits"])
    family.add_metric(["miss"], s["misses"])
    yield family


def _core_spread_families(s: dict):
    family = CounterMetricFamily(
        "aotiserve_spread_runs",
        "Long single-threaded CPU runs that started beside another, "
        "pinned to a core while they ran, by core",
        labels=["cpu"],
    )
    for cpu, runs in sorted(s["runs"].items()):
        family.add_metric([str(cpu)], runs)
    yield family
    yield CounterMetricFamily(
        "aotiserve_spread_runs_moved",
        "Pinned runs moved off the core their thread was on",
        value=s["moved"],
    )
    yield CounterMetricFamily(
        "aotiserve_spread_runs_shared",
        "Pinned runs that shared their core with another long run "
        "(more long runs at once than cores)",
        value=s["shared"],
    )


def _age_families(created: dict[str, int]):
    family = GaugeMetricFamily(
        "aotiserve_weights_active_age_seconds",
        "Seconds since the weights version serving now was created",
        labels=["model"],
    )
    now_ms = time.time() * 1000
    for model, ms in sorted(created.items()):
        family.add_metric([model], max(0.0, (now_ms - ms) / 1000))
    yield family


class _GpuCollector:
    """GPU families at each scrape. Memory of this process from torch's caching allocator
    (runs' intermediate buffers and outputs; a model's weights are, by default, its
    container's own allocation, seen only in NVML's used memory); utilisation and the
    device's memory from NVML (the optional ``nvidia-ml-py``), matched to each CUDA device
    by UUID, so CUDA_VISIBLE_DEVICES renumbering does not mislabel them."""

    def __init__(self, devices: list[str]) -> None:
        self._devices = devices
        self._nvml: dict[str, Any] | None = None  # device -> NVML handle; {} without NVML

    def _nvml_handles(self) -> dict[str, Any]:
        if self._nvml is not None:
            return self._nvml
        self._nvml = {}
        try:
            import pynvml  # nvidia-ml-py: optional
        except ImportError:
            log.info("GPU utilisation metrics off: nvidia-ml-py is not installed")
            return self._nvml
        import torch

        try:
            pynvml.nvmlInit()
            by_uuid = {}
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                by_uuid[uuid.removeprefix("GPU-")] = handle
            for device in self._devices:
                uuid = str(torch.cuda.get_device_properties(torch.device(device)).uuid)
                if uuid.removeprefix("GPU-") in by_uuid:
                    self._nvml[device] = by_uuid[uuid.removeprefix("GPU-")]
                else:
                    log.warning("NVML has no device with the UUID of %s (%s)", device, uuid)
        except pynvml.NVMLError as exc:
            log.warning("GPU utilisation metrics off: NVML: %s", exc)
        return self._nvml

    def collect(self):
        import torch

        if not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily(
            "aotiserve_gpu_memory_allocated_bytes",
            "GPU memory this daemon's tensors occupy (torch's allocator)",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "aotiserve_gpu_memory_reserved_bytes",
            "GPU memory torch's allocator holds for this daemon (occupied or cached)",
            labels=["device"],
        )
        for device in self._devices:
            index = torch.device(device).index or 0
            allocated.add_metric([device], torch.cuda.memory_allocated(index))
            reserved.add_metric([device], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved
        handles = self._nvml_handles()
        if not handles:
            return
        import pynvml

        util = GaugeMetricFamily(
            "aotiserve_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU ran kernels (NVML), all processes",
            labels=["device"],
        )
        used = GaugeMetricFamily(
            "aotiserve_gpu_memory_used_bytes",
            "GPU memory in use, all processes (NVML)",
            labels=["device"],
        )
        total = GaugeMetricFamily(
            "aotiserve_gpu_memory_total_bytes", "GPU memory in all (NVML)", labels=["device"]
        )
        for device, handle in handles.items():
            try:
                rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            except pynvml.NVMLError as exc:
                log.debug("NVML on %s: %s", device, exc)
                continue
            util.add_metric([device], rates.gpu / 100.0)
            used.add_metric([device], memory.used)
            total.add_metric([device], memory.total)
        yield util
        yield used
        yield total
