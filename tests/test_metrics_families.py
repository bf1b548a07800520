"""Prometheus families of load and batching (and of GPUs, on a GPU machine): each checked
against a sequence of requests whose effect is known, on a real server.

- ``aotiserve_model_in_flight_requests`` / ``aotiserve_model_queued_requests``: on the C++
  hot path and on the Python path (dynamic batching), while the model's only runner is
  held busy;
- ``aotiserve_batch_size``: the rows of each batched run;
- ``aotiserve_gpu_*``: torch's allocator per device, NVML when nvidia-ml-py is installed;
- every family a daemon exposes is in docs/server.md's table.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import model_zoo
import pytest
import wire
from helpers import wait_for
from server_harness import running_server

REPO = Path(__file__).resolve().parent.parent


def load(s, model="mlp") -> tuple[float, float]:
    m = s.app.metrics
    return (
        m.sample("aotiserve_model_in_flight_requests", model=model),
        m.sample("aotiserve_model_queued_requests", model=model),
    )


def test_in_flight_and_queued_on_the_hot_path(server_factory):
    s = server_factory(["mlp"], runners_per_model=1)
    x = model_zoo.MODELS["mlp"].inputs(2)
    s.stub.Run(wire.run_request("mlp", x))
    assert load(s) == (0, 0)
    with s.app.port_server.holding_a_runner("mlp"):  # the only runner is busy
        futures = [s.stub.Run.future(wire.run_request("mlp", x)) for _ in range(3)]
        wait_for(lambda: s.app.port_server.pool_state("cpu")[1] == 3, what="3 queued runs")
        assert load(s) == (3, 3)
    for f in futures:
        wire.outputs(f.result(timeout=30))
    wait_for(lambda: load(s) == (0, 0), what="nothing in flight")


def test_in_flight_queued_and_batch_size_with_dynamic_batching(server_factory):
    """Two requests of 2 rows while the runner is held: both in flight, one run queued (the
    second joined the first's batch), then one run of 4 rows."""
    s = server_factory(["mlp"], runners_per_model=1, batch_max_size=8, batch_max_delay_us=1000)
    model = s.app.registry.get("mlp")
    assert s.app.port_server.why_not(model) is None  # batched by the port's hot path
    x = model_zoo.MODELS["mlp"].inputs(2)
    m = s.app.metrics
    with s.app.port_server.holding_a_runner("mlp"):  # hold the model's only runner
        first = s.stub.Run.future(wire.run_request("mlp", x))
        wait_for(lambda: load(s) == (1, 1), what="the first request queued")
        second = s.stub.Run.future(wire.run_request("mlp", x))
        wait_for(lambda: load(s)[0] == 2, what="the second request in flight")
        assert load(s) == (2, 1)  # it joined the queued batch: still one run queued
    want = model_zoo.eager("mlp", x)
    for f in (first, second):
        assert wire.close(wire.outputs(f.result(timeout=30)), want)
    wait_for(lambda: load(s) == (0, 0), what="nothing in flight")
    assert m.sample("aotiserve_batch_size_count", model="mlp") == 1
    assert m.sample("aotiserve_batch_size_sum", model="mlp") == 4
    assert m.sample("aotiserve_batch_size_bucket", model="mlp", le="2.0") == 0
    assert m.sample("aotiserve_batch_size_bucket", model="mlp", le="4.0") == 1
    assert m.sample("aotiserve_batch_size_bucket", model="mlp", le="+Inf") == 1
    # A request alone runs alone: a batch of its own rows.
    s.stub.Run(wire.run_request("mlp", model_zoo.MODELS["mlp"].inputs(3)))
    assert m.sample("aotiserve_batch_size_count", model="mlp") == 2
    assert m.sample("aotiserve_batch_size_sum", model="mlp") == 7


def test_no_batch_size_series_without_batching(server_factory):
    s = server_factory(["mlp"])
    s.stub.Run(wire.run_request("mlp", model_zoo.MODELS["mlp"].inputs(2)))
    names = {f.name for f in s.app.metrics.registry.collect() if f.samples}
    assert "aotiserve_batch_size" not in names
    assert not any(n.startswith("aotiserve_gpu_") for n in names)  # a CPU-only daemon


def _documented() -> set[str]:
    text = (REPO / "docs" / "server.md").read_text()
    table = text[text.index("| family |") :]
    table = table[: table.index("\n\n")]
    return {re.sub(r"_total$", "", n) for n in re.findall(r"^\| `(aotiserve_\w+)`", table, re.M)}


def test_every_family_is_documented(server_factory):
    s = server_factory(["mlp"], metrics_port=0)
    s.stub.Run(wire.run_request("mlp", model_zoo.MODELS["mlp"].inputs(2)))
    with urllib.request.urlopen(f"http://127.0.0.1:{s.app.metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    exposed = {f.name for f in s.app.metrics.registry.collect() if f.name.startswith("aotiserve_")}
    assert {
        re.sub(r"_total$", "", n)
        for n in re.findall(r"^(aotiserve_\w+)\{", text, re.M)
        if not n.endswith(("_bucket", "_sum", "_count", "_created"))
    } <= exposed
    documented = _documented()
    assert exposed - documented == set()
    gpu = {
        "aotiserve_gpu_memory_allocated_bytes",
        "aotiserve_gpu_memory_reserved_bytes",
        "aotiserve_gpu_utilization_ratio",
        "aotiserve_gpu_memory_used_bytes",
        "aotiserve_gpu_memory_total_bytes",
    }
    assert gpu <= documented


# ---------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_gpu_memory_and_nvml_families(tmp_path):
    import torch
    from torch.export import Dim

    from aotiserve.server.packaging import pack

    spec = model_zoo.MODELS["mlp"]
    inputs = tuple(t.cuda() for t in spec.inputs(4))
    pack(
        spec.module().cuda(),
        inputs,
        tmp_path / "mlp.pt2",
        dynamic_shapes=tuple({0: Dim("batch", min=1, max=64)} for _ in inputs),
    )
    with running_server(
        [],
        model_repository=str(tmp_path),
        devices=("cuda:0",),
        allowed_roots=(str(tmp_path),),
        metrics_port=0,
    ) as s:
        s.stub.Run(wire.run_request("mlp", spec.inputs(4)))
        m = s.app.metrics
        allocated = m.sample("aotiserve_gpu_memory_allocated_bytes", device="cuda:0")
        reserved = m.sample("aotiserve_gpu_memory_reserved_bytes", device="cuda:0")
        # torch's allocator gave the run its intermediate buffers and outputs, and keeps
        # them cached (the weights are, by default, the model container's own cudaMalloc,
        # outside it).
        assert reserved == torch.cuda.memory_reserved(0) > 0
        assert 0 <= allocated <= reserved
        try:
            import pynvml  # noqa: F401
        except ImportError:
            names = {f.name for f in m.registry.collect()}
            assert "aotiserve_gpu_utilization_ratio" not in names  # optional, and absent
            return
        total = m.sample("aotiserve_gpu_memory_total_bytes", device="cuda:0")
        used = m.sample("aotiserve_gpu_memory_used_bytes", device="cuda:0")
        util = m.sample("aotiserve_gpu_utilization_ratio", device="cuda:0")
        assert total >= used >= reserved > 0  # NVML sees all: torch's, the weights, the context
        assert 0.0 <= util <= 1.0
