"""Dynamic batching: the Batcher on its own, then through a real server."""

from __future__ import annotations

import threading

import grpc
import model_zoo
import pytest
import torch
import wire

from aotiserve.server.batching import Batcher
from aotiserve.v1 import model_runner_pb2 as pb


def _double(calls):
    def execute(get_inputs, ctx):
        inputs = get_inputs()
        calls.append((inputs[0].shape[0], ctx))
        if (inputs[0] < 0).any():
            raise ValueError("negative input")
        return [x * 2 for x in inputs], "v1"

    return execute


def _concurrently(n, fn):
    start = threading.Barrier(n)
    results: list = [None] * n

    def worker(i):
        start.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 (returned to the test)
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_requests_share_runs_and_each_gets_its_own_rows():
    batcher = Batcher(max_size=64, max_delay_s=0.2)
    calls: list = []
    execute = _double(calls)
    inputs = [torch.full((i % 3 + 1, 4), float(i)) for i in range(8)]
    results = _concurrently(8, lambda i: batcher.run([inputs[i]], i, execute, lambda: True))
    for i, (outputs, version) in enumerate(results):
        assert version == "v1" and torch.equal(outputs[0], inputs[i] * 2)
    assert len(calls) < 8 and batcher.batches >= 1  # fewer runs than requests
    assert sum(rows for rows, _ in calls) == sum(t.shape[0] for t in inputs)


def test_a_lone_request_runs_at_once_with_its_own_context():
    batcher = Batcher(max_size=64, max_delay_s=30.0)  # would hang the test if it waited
    calls: list = []
    outputs, _ = batcher.run([torch.ones(2, 4)], "mine", _double(calls), lambda: False)
    assert torch.equal(outputs[0], torch.full((2, 4), 2.0)) and calls == [(2, "mine")]


def test_a_failing_batch_is_rerun_one_by_one_so_only_the_bad_request_fails():
    batcher = Batcher(max_size=64, max_delay_s=0.2)
    calls: list = []
    inputs = [torch.full((1, 4), -1.0 if i == 3 else float(i)) for i in range(6)]
    results = _concurrently(6, lambda i: batcher.run([inputs[i]], i, _double(calls), lambda: True))
    assert isinstance(results[3], ValueError)
    for i, r in enumerate(results):
        if i != 3:
            assert torch.equal(r[0][0], inputs[i] * 2)
    # The bad request ran on its own, with its own context (whichever batch it was in).
    assert (1, 3) in calls


def test_batches_never_exceed_max_size_nor_mix_shapes():
    batcher = Batcher(max_size=4, max_delay_s=0.2)
    calls: list = []
    shapes = [(1, 4), (1, 4), (1, 8), (1, 8), (1, 4), (1, 4), (1, 4), (1, 8)]
    results = _concurrently(
        8, lambda i: batcher.run([torch.full(shapes[i], float(i))], i, _double(calls), lambda: True)
    )
    for i, (outputs, _) in enumerate(results):
        assert torch.equal(outputs[0], torch.full(shapes[i], 2.0 * i))
    assert all(rows <= 4 for rows, _ in calls)


def test_batcher_refuses_a_size_below_two():
    with pytest.raises(ValueError, match="at least 2 rows"):
        Batcher(max_size=1, max_delay_s=0.001)


@pytest.mark.parametrize("model", ["mlp", "two_io"])
def test_server_batches_concurrent_runs_and_answers_each_exactly(server_factory, model):
    s = server_factory(
        [model, "compute"], batch_max_size=32, batch_max_delay_us=20_000, metrics_port=0
    )
    assert s.app.registry.get(model).batcher is not None
    assert s.app.registry.get("compute").batcher is None  # static batch: off, with a warning
    per_client = 25
    # Inputs and eager answers made up front: the zoo seeds torch's global generator.
    cases = {
        (i, k): model_zoo.MODELS[model].inputs(1 + (i + k) % 3, seed=100 * i + k)
        for i in range(8)
        for k in range(per_client)
    }
    want = {key: model_zoo.eager(model, x) for key, x in cases.items()}
    requests = {key: wire.run_request(model, x) for key, x in cases.items()}

    def client(i):
        for k in range(per_client):
            out = wire.outputs(s.stub.Run(requests[(i, k)]))
            assert wire.close(out, want[(i, k)]), (i, k)
        return True

    assert _concurrently(8, client) == [True] * 8
    runs = s.app.metrics.sample("aotiserve_device_requests_total", model=model, device="cpu")
    assert runs < 8 * per_client  # batched, by the port's C++ hot path
    assert s.app.metrics.sample("aotiserve_hot_path_requests_total", method="Run") >= 8 * per_client
    # A bad request fails alone, with its own code.
    bad = pb.RunRequest(
        model=model, inputs=[pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 7], data=b"\0" * 28)]
    )
    with pytest.raises(grpc.RpcError) as err:
        s.stub.Run(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_batching_config_is_checked():
    from aotiserve.server.config import ServeConfig

    with pytest.raises(ValueError, match="batch_max_delay_us must be >= 0"):
        ServeConfig(batch_max_delay_us=-1)
