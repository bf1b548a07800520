"""The native data port: Run served by gRPC C++ beside the Python server.

Same results, codes and error texts as the main port's Run; every weight change made
through the main port is atomic for native Runs too (old or new weights, never a mix,
and the trailer names the version that served); unload, drain, the inference token and
the metrics reach it. Skipped where the extension was built without gRPC C++.
"""

from __future__ import annotations

import threading

import grpc
import pytest

import model_zoo
import wire
from aotiserve import runner_ext
from aotiserve.v1 import model_runner_pb2 as pb
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc
from server_harness import running_server
from test_server_weights import code_of, eager_with, new_weights, upload

pytestmark = pytest.mark.skipif(not runner_ext.native_run_available(),
                                reason="extension built without gRPC C++ (no native data port)")
CODE = grpc.StatusCode


class _Native:
    def __init__(self, s):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{s.app.native_port}")
        self.stub = pb_grpc.ModelRunnerStub(self.channel)

    def run(self, model, inputs, **kw):
        resp, call = self.stub.Run.with_call(wire.run_request(model, inputs), **kw)
        trailer = dict(call.trailing_metadata())["aotiserve-weights-version"]
        assert trailer == resp.weights_version
        return wire.outputs(resp), resp.weights_version


@pytest.fixture(scope="module")
def served():
    with running_server(["mlp", "two_io", "compute_dyn"], native_run_port=0,
                        batch_max_size=0) as s:
        native = _Native(s)
        yield s, native
        native.channel.close()


def test_native_run_equals_eager_and_the_main_port(served):
    s, native = served
    for name in ("mlp", "two_io"):
        for batch in (1, 5):
            inputs = model_zoo.MODELS[name].inputs(batch, seed=batch)
            out, version = native.run(name, inputs)
            assert wire.close(out, model_zoo.eager(name, inputs)), name
            main = wire.outputs(s.stub.Run(wire.run_request(name, inputs)))
            assert wire.close(out, main), name
            assert version == "initial"


def test_native_errors_match_the_main_port(served):
    s, native = served
    good = model_zoo.MODELS["mlp"].inputs(2)
    f64 = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[2, 64], data=b"\0" * 1024)
    cases = {
        "unknown model": (wire.run_request("nope", good), CODE.NOT_FOUND, "'nope'"),
        "input count": (pb.RunRequest(model="mlp"), CODE.INVALID_ARGUMENT, "takes 1 inputs"),
        "dtype": (pb.RunRequest(model="mlp", inputs=[f64]), CODE.INVALID_ARGUMENT,
                  "input 0 ('x'): dtype must be float32, got float64"),
        "rank": (pb.RunRequest(model="mlp", inputs=[pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[128], data=b"\0" * 512)]),
            CODE.INVALID_ARGUMENT, "input 0 ('x'): expected 2 dimensions"),
        "static dim": (pb.RunRequest(model="mlp", inputs=[pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 63], data=b"\0" * 504)]),
            CODE.INVALID_ARGUMENT, "input 0 ('x'): dimension 1 must be 64"),
        "truncated bytes": (pb.RunRequest(model="mlp", inputs=[pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 64], data=b"\0" * 511)]),
            CODE.INVALID_ARGUMENT, "input 0 ('x'): expected 512 bytes for float32[2, 64], got 511"),
        "absurd dims": (pb.RunRequest(model="mlp", inputs=[pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[1 << 20, 1 << 12], data=b"")]),
            CODE.RESOURCE_EXHAUSTED, "input 0 ('x'): shape [1048576, 4096] has more than"),
        "negative dim": (pb.RunRequest(model="mlp", inputs=[pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 64], data=b"")]),
            CODE.INVALID_ARGUMENT, "input 0 ('x'): negative dimension -1"),
        "batch above the model's bound": (pb.RunRequest(model="mlp", inputs=[pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[100000, 64], data=b"\0" * (100000 * 256))]),
            CODE.INVALID_ARGUMENT, "rejected the inputs"),
    }
    for what, (req, code, text) in cases.items():
        got, details = code_of(lambda: native.stub.Run(req))
        assert got == code and text in details, (what, got, details)
        main_code, _ = code_of(lambda: s.stub.Run(req))
        assert main_code == code, (what, main_code)
    code, details = code_of(lambda: native.stub.Run.future(b"\xff\xff").result())
    assert code == CODE.INVALID_ARGUMENT or code == CODE.INTERNAL, (code, details)
    out, _ = native.run("mlp", good)  # still serving, same answers
    assert wire.close(out, model_zoo.eager("mlp", good))


def test_swaps_through_the_main_port_are_atomic_for_native_runs(served):
    """4 native clients run while weights are staged, swapped and rolled back through the
    main port: every result is the old or the new eager one, matching the version its
    trailer names; after the swap returns, only new ones."""
    s, native = served
    inputs = model_zoo.MODELS["mlp"].inputs(3, seed=7)
    old = model_zoo.eager("mlp", inputs)
    weights = new_weights("mlp")
    new = eager_with("mlp", weights, inputs)
    stop = threading.Event()
    seen: dict[str, int] = {}
    bad: list[str] = []
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            out, version = native.run("mlp", inputs)
            if version == "initial":
                ok = wire.close(out, old)
            else:
                ok = wire.close(out, new)
            with lock:
                seen[version] = seen.get(version, 0) + 1
                if not ok:
                    bad.append(version)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        staged = upload(s.stub, "mlp", weights, validate_full=True).version.id
        s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
        for i in range(20):  # flips back and forth: rollback, rollback...
            out, version = native.run("mlp", inputs)
            if i % 2 == 0:
                assert version == staged and wire.close(out, new)
            else:
                assert version == "initial" and wire.close(out, old)
            s.stub.RollbackConstantBuffer(pb.RollbackConstantBufferRequest(model="mlp"))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad, f"results that did not match their version: {bad[:5]}"
    assert sum(seen.values()) > 0
    # Leave the initial weights serving (20 flips ended on the new ones) and nothing held.
    s.stub.RollbackConstantBuffer(pb.RollbackConstantBufferRequest(model="mlp"))
    assert native.run("mlp", inputs)[1] == "initial"
    s.stub.FreeInactiveConstantBuffer(pb.FreeInactiveConstantBufferRequest(model="mlp"))


def test_a_model_with_dynamic_batching_stays_on_the_main_port():
    with running_server(["compute_dyn"], native_run_port=0, batch_max_size=8) as s:
        native = _Native(s)
        inputs = model_zoo.MODELS["compute_dyn"].inputs(2)
        code, details = code_of(lambda: native.run("compute_dyn", inputs))
        assert code == CODE.NOT_FOUND and "main port" in details
        assert wire.close(wire.outputs(s.stub.Run(wire.run_request("compute_dyn", inputs))),
                          model_zoo.eager("compute_dyn", inputs))
        native.channel.close()


def test_unload_load_drain_and_metrics_reach_the_native_port():
    with running_server(["mlp"], native_run_port=0) as s:
        native = _Native(s)
        inputs = model_zoo.MODELS["mlp"].inputs(1)
        native.run("mlp", inputs)
        s.stub.UnloadModel(pb.UnloadModelRequest(name="mlp"))
        code, _ = code_of(lambda: native.run("mlp", inputs))
        assert code == CODE.NOT_FOUND
        s.stub.LoadModel(pb.LoadModelRequest(name="mlp", path=str(s.repo / "mlp.pt2")))
        out, _ = native.run("mlp", inputs)
        assert wire.close(out, model_zoo.eager("mlp", inputs))
        samples = {tuple(sorted(smp.labels.items())): smp.value
                   for fam in s.app.native.collect() for smp in fam.samples}
        assert samples[(("code", "OK"),)] == 2 and samples[(("code", "NOT_FOUND"),)] == 1
        s.app.stop(5)
        code, details = code_of(lambda: native.run("mlp", inputs))
        assert code == CODE.UNAVAILABLE, (code, details)
        native.channel.close()


def test_inference_token_guards_the_native_port(tmp_path):
    token = tmp_path / "token"
    token.write_text("inf3rence\n")
    with running_server(["mlp"], native_run_port=0, inference_token_file=str(token)) as s:
        native = _Native(s)
        inputs = model_zoo.MODELS["mlp"].inputs(1)
        assert code_of(lambda: native.run("mlp", inputs))[0] == CODE.UNAUTHENTICATED
        assert code_of(lambda: native.run("mlp", inputs, metadata=(
            ("authorization", "Bearer wrong"),)))[0] == CODE.PERMISSION_DENIED
        out, _ = native.run("mlp", inputs, metadata=(("authorization", "Bearer inf3rence"),))
        assert wire.close(out, model_zoo.eager("mlp", inputs))
        native.channel.close()


def test_native_port_refuses_to_start_without_tls_where_the_main_port_has_it():
    from aotiserve.server.config import ServeConfig

    with pytest.raises(ValueError, match="no TLS"):
        ServeConfig(native_run_port=0, tls_cert="c.pem", tls_key="k.pem")


def test_large_outputs_leave_without_a_copy_and_the_port_counts_its_copies():
    """passthrough [256, 1024] float32: 1 MiB in, 1 MiB out. The port copies the request at
    most once (joined from gRPC's slices) and sends the output from the tensor itself; a
    small output is copied into the reply."""
    with running_server(["passthrough", "mlp"], native_run_port=0, batch_max_size=0) as s:
        native = _Native(s)

        def copied() -> float:
            return next(smp.value for fam in s.app.native.collect() for smp in fam.samples
                        if smp.name == "aotiserve_native_copied_bytes_total")

        inputs = model_zoo.MODELS["passthrough"].inputs(256, seed=2)
        request = wire.run_request("passthrough", inputs)
        before = copied()
        out, _ = native.run("passthrough", inputs)
        assert wire.close(out, model_zoo.eager("passthrough", inputs))
        assert copied() - before in (0, len(request.SerializeToString()))
        inputs = model_zoo.MODELS["mlp"].inputs(1)
        before = copied()
        out, _ = native.run("mlp", inputs)
        assert wire.close(out, model_zoo.eager("mlp", inputs))
        assert copied() - before == out[0].numel() * out[0].element_size()  # request: one slice
        native.channel.close()
