"""Committed weights survive SIGKILL; an upload cut off by a crash changes nothing."""

from __future__ import annotations

import signal
import threading

import grpc
import model_zoo
import pytest
import wire
from helpers import eager_with, new_weights
from server_harness import daemon_process

from aotiserve.v1 import model_runner_pb2 as pb
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc


def _stub(d):
    channel = grpc.insecure_channel(d.target)
    return channel, pb_grpc.ModelRunnerStub(channel)


def _active(stub) -> pb.WeightsVersion:
    return stub.ListModels(pb.ListModelsRequest()).models[0].active_version


@pytest.mark.slow
def test_restart_after_sigkill_serves_committed_version(tmp_path):
    weights_dir = tmp_path / "weights"
    args = ["--weights-dir", str(weights_dir)]
    inputs = model_zoo.MODELS["mlp"].inputs(4)
    v1_weights = new_weights("mlp")
    want = eager_with("mlp", v1_weights, inputs)

    with daemon_process(["mlp"], args) as d:
        repo = d.repo
        channel, stub = _stub(d)
        v1 = stub.UpdateConstantBuffer(
            wire.upload_requests("mlp", v1_weights, validate_full=True, description="v1")
        ).version
        stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
        # Start a second upload and kill the daemon while it is half sent.
        half = threading.Event()
        hold = threading.Event()
        future = stub.UpdateConstantBuffer.future(
            wire.pause_at_half(
                wire.upload_requests(
                    "mlp", new_weights("mlp", 3.0), validate_full=True, chunk_bytes=256
                ),
                half,
                hold,
                end=True,
            )
        )
        half.wait(30)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        hold.set()
        with pytest.raises(grpc.RpcError):
            future.result()
        channel.close()

    with daemon_process(["mlp"], args, repo=repo) as d2:
        channel, stub = _stub(d2)
        active = _active(stub)
        assert (active.id, active.digest, active.description) == (v1.id, v1.digest, "v1")
        resp, call = stub.Run.with_call(wire.run_request("mlp", inputs))
        assert wire.close(wire.outputs(resp), want)
        assert ("aotiserve-weights-version", v1.id) in tuple(call.trailing_metadata())
        channel.close()
    leftovers = [p.name for p in weights_dir.rglob("*.tmp")]
    assert not leftovers
