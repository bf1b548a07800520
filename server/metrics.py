"""Every Prometheus object of the daemon, with fixed label lists.

Each :class:`Metrics` owns its own registry, so several servers in one
process (tests) do not collide; :meth:`Metrics.serve` exposes it over HTTP.
"""

from __future__ import annotations

import logging

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "aotiserve_requests_total", "RPCs by model, method and status code",
            ["model", "method", "code"], registry=r)
        self.request_seconds = Histogram(
            "aotiserve_request_seconds", "Whole RPC latency",
            ["model", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(
            "aotiserve_queue_seconds", "Time a run waited for a free runner",
            ["model", "device"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram(
            "aotiserve_compute_seconds", "Time in the runner (incl. device copies)",
            ["model", "device"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "aotiserve_in_flight_requests", "RPCs being handled", ["method"], registry=r)
        self.queue_depth = Gauge(
            "aotiserve_queue_depth", "Runs waiting for a runner", ["device"], registry=r)
        self.running = Gauge(
            "aotiserve_running", "Runs executing now", ["device"], registry=r)
        self.device_requests = Counter(
            "aotiserve_device_requests_total", "Runs executed, by model and device",
            ["model", "device"], registry=r)
        self.model_loads = Counter(
            "aotiserve_model_loads_total", "Model loads by outcome",
            ["model", "outcome"], registry=r)
        self.constant_buffer_ops = Counter(
            "aotiserve_constant_buffer_ops_total", "Weight operations by outcome",
            ["model", "op", "outcome"], registry=r)
        self.staged_bytes = Counter(
            "aotiserve_staged_bytes_total", "Weight bytes received for staging",
            ["model"], registry=r)
        self.staging_bytes = Gauge(
            "aotiserve_staging_bytes", "Bytes held by uploads in progress",
            ["model"], registry=r)
        self.weights_version = Gauge(
            "aotiserve_weights_version_info", "1 for the weights version serving now",
            ["model", "version", "sha256"], registry=r)
        self._http = None

    def set_active_version(self, model: str, version: str, sha256: str) -> None:
        """Keeps exactly one weights_version series per model at 1."""
        for labels in list(self.weights_version._metrics):  # noqa: SLF001 (no public API)
            if labels[0] == model:
                self.weights_version.remove(*labels)
        self.weights_version.labels(model, version, sha256[:16]).set(1)

    def forget_model(self, model: str) -> None:
        for labels in list(self.weights_version._metrics):  # noqa: SLF001
            if labels[0] == model:
                self.weights_version.remove(*labels)

    def watch_cpu_block_cache(self, stats: Callable[[], dict | None]) -> None:
        """Exposes the CPU block cache (runner_ext) at each scrape; nothing while it is off."""
        self.registry.register(_StatsCollector(stats, _cpu_block_cache_families))

    def watch_core_spread(self, stats: Callable[[], dict | None]) -> None:
        """Exposes where long CPU runs were pinned (runner_ext) at each scrape; nothing while off."""
        self.registry.register(_StatsCollector(stats, _core_spread_families))

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

    def __init__(self, stats: Callable[[], dict | None], families: Callable[[dict], Iterable]) -> None:
        self._stats = stats
        self._families = families

    def collect(self):
        s = self._stats()
        if s is not None:
            yield from self._families(s)


def _cpu_block_cache_families(s: dict):
    yield GaugeMetricFamily("aotiserve_cpu_block_cache_bytes",
                            "Freed large CPU blocks kept for reuse", value=s["cached_bytes"])
    family = CounterMetricFamily("aotiserve_cpu_block_cache_allocations",
                                 "Large CPU allocations, by whether a kept block served them",
                                 labels=["outcome"])
    family.add_metric(["hit"], s["hits"])
    family.add_metric(["miss"], s["misses"])
    yield family


def _core_spread_families(s: dict):
    family = CounterMetricFamily("aotiserve_spread_runs",
                                 "Long single-threaded CPU runs that started beside another, "
                                 "pinned to a core while they ran, by core", labels=["cpu"])
    for cpu, runs in sorted(s["runs"].items()):
        family.add_metric([str(cpu)], runs)
    yield family
    yield CounterMetricFamily("aotiserve_spread_runs_moved",
                              "Pinned runs moved off the core their thread was on", value=s["moved"])
    yield CounterMetricFamily("aotiserve_spread_runs_shared",
                              "Pinned runs that shared their core with another long run "
                              "(more long runs at once than cores)", value=s["shared"])
