"""The one port (gRPC C++): what only it can get wrong.

Outputs that alias their inputs outlive nothing they point at; results are bit for bit
those of an in-process run whatever the payload's alignment; the hot path answers what
it serves and hands the rest to Python; long-lived streams stay under their limit so
Run and health keep answering; the port counts its copies.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading

import grpc
import model_zoo
import numpy as np
import pytest
import torch
import wire
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_harness import running_server

from aotiserve import runner_ext
from aotiserve.v1 import model_runner_pb2 as pb
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc

CODE = grpc.StatusCode
RUN = "/aotiserve.v1.ModelRunner/Run"


def _hot(s, method="Run") -> float:
    return s.app.metrics.sample("aotiserve_hot_path_requests_total", method=method)


def test_an_output_aliasing_its_input_is_always_correct():
    """6 clients at once; each reply's first output is the request's own bytes."""
    with running_server(["alias"], runners_per_model=2) as s:

        def client(tid: int) -> int:
            good = 0
            for i in range(40):
                x = torch.randn(
                    16 + tid, 1024, generator=torch.Generator().manual_seed(tid * 100 + i)
                )
                out = wire.outputs(s.stub.Run(wire.run_request("alias", [x])))
                good += torch.equal(out[0], x.reshape(-1)) and torch.allclose(out[1], x * 3.0)
            return good

        with cf.ThreadPoolExecutor(6) as ex:
            assert list(ex.map(client, range(6))) == [40] * 6
        assert _hot(s) >= 240


def _padded_run_request(model: str, inputs, pad: int) -> bytes:
    """A RunRequest with an unknown field of ``pad`` bytes in front of the inputs: the
    tensors' payloads land at every alignment (protobuf skips unknown fields)."""
    body = wire.run_request(model, inputs).SerializeToString()
    filler = b"\x7a" + bytes([pad]) + b"\x00" * pad  # field 15, wire type 2
    return filler + body


@pytest.mark.parametrize("name", ["mlp", "compute_dyn"])
def test_results_are_bit_identical_to_in_process_on_unaligned_payloads(name):
    inputs = model_zoo.MODELS[name].inputs(3, seed=7)
    runner = runner_ext.load_model(model_zoo.compiled(name)).runner
    want = runner.run(list(inputs))
    with running_server([name]) as s:
        call = s.channel.unary_unary(RUN)
        for pad in range(0, 70, 3):
            raw = call(_padded_run_request(name, inputs, pad))
            out = wire.outputs(pb.RunResponse.FromString(raw))
            assert all(torch.equal(a, b) for a, b in zip(out, want)), pad


def test_the_hot_path_answers_runs_and_infers_and_python_the_rest():
    # With batching on, "mlp" (dynamic batch) is batched by the hot path; "compute" (static
    # shape, so never batched) is served there as it is.
    with running_server(["mlp", "compute"], batch_max_size=8) as s:
        x = model_zoo.MODELS["compute"].inputs(1)
        before = _hot(s)
        s.stub.Run(wire.run_request("compute", x))
        assert _hot(s) == before + 1
        y = model_zoo.MODELS["mlp"].inputs(2)
        out = wire.outputs(s.stub.Run(wire.run_request("mlp", y)))
        assert wire.close(out, model_zoo.eager("mlp", y))
        assert _hot(s) == before + 2
        # An unknown model is Python's to name.
        with pytest.raises(grpc.RpcError) as e:
            s.stub.Run(wire.run_request("nope", y))
        assert e.value.code() == CODE.NOT_FOUND and "nope" in e.value.details()


def test_large_outputs_leave_without_a_copy_and_the_port_counts_its_copies():
    with running_server(["passthrough"]) as s:

        def copied() -> float:
            return s.app.metrics.sample("aotiserve_port_copied_bytes_total")

        x = torch.randn(4096, 1024)  # 16 MiB in, 16 MiB out
        before = copied()
        out = wire.outputs(s.stub.Run(wire.run_request("passthrough", [x])))
        assert torch.equal(out[0], x)
        # The request arrives in several slices and is joined once; the output goes out
        # from the tensor's own memory.
        assert copied() - before <= x.numel() * 4 + 4096


def test_streams_past_the_limit_are_refused_and_run_and_health_keep_answering():
    """64 idle health Watch, 64 reflection and 64 stream-infer streams, and 200 stalled
    uploads: every stream past the limit is refused at once; Run and Health/Check from a
    fresh connection answer meanwhile."""
    with running_server(["mlp"], max_streams=16, grpc_workers=32) as s:
        crowd = grpc.insecure_channel(s.target)
        stalled = threading.Event()
        streams = []

        def idle_requests():
            stalled.wait()
            return
            yield  # unreachable: a generator that sends nothing until released

        health = health_pb2_grpc.HealthStub(crowd)
        refl = reflection_pb2_grpc.ServerReflectionStub(crowd)
        infer = crowd.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        upload = pb_grpc.ModelRunnerStub(crowd).UpdateConstantBuffer
        for _ in range(64):
            streams.append(health.Watch(health_pb2.HealthCheckRequest(service="")))
            streams.append(refl.ServerReflectionInfo(idle_requests()))
            streams.append(infer(idle_requests()))
        futures = [upload.future(idle_requests()) for _ in range(200)]
        fresh = grpc.insecure_channel(s.target)
        stub = pb_grpc.ModelRunnerStub(fresh)
        check = health_pb2_grpc.HealthStub(fresh).Check
        x = model_zoo.MODELS["mlp"].inputs(2)
        for _ in range(20):
            out = wire.outputs(stub.Run(wire.run_request("mlp", x), timeout=10))
            assert wire.close(out, model_zoo.eager("mlp", x))
            assert (
                check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        # Control RPCs still find a bridge thread: streams hold at most max_streams.
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        refused = 0
        for f in futures:
            try:
                f.result(timeout=0)
            except grpc.FutureTimeoutError:
                continue
            except grpc.RpcError as e:
                refused += e.code() == CODE.RESOURCE_EXHAUSTED
        assert refused >= 200 - 16
        stalled.set()
        for st in streams:
            st.cancel()
        for f in futures:
            f.cancel()
        crowd.close()
        fresh.close()


def test_an_idle_stream_ends_after_the_idle_limit():
    with running_server(["mlp"], stream_idle_timeout_s=0.5) as s:
        release = threading.Event()

        def nothing():
            release.wait(30)
            return
            yield  # unreachable

        with pytest.raises(grpc.RpcError) as e:
            s.stub.UpdateConstantBuffer(nothing(), timeout=20)
        release.set()
        assert e.value.code() == CODE.DEADLINE_EXCEEDED
        assert "no message from the client" in e.value.details()


def test_a_runner_failure_is_internal_and_logged(caplog):
    """A failure inside the runner that is not about the caller's input (here the
    model's own runtime check, which no input can pass) is INTERNAL, with the details
    in the log only."""
    with running_server(["failing"]) as s, caplog.at_level("ERROR"):
        x = model_zoo.MODELS["failing"].inputs(4)
        with pytest.raises(grpc.RpcError) as e:
            s.stub.Run(wire.run_request("failing", x))
        assert e.value.code() == CODE.INTERNAL
        assert "server log" in e.value.details()
        s.app.port_server.flush_log()
        assert any(
            "'failing'" in r.getMessage() and "run failed" in r.getMessage() for r in caplog.records
        )
        # A caller can make it fail at will: 50 more failures add no line within the minute,
        # neither ours nor the runtime's own (AOTInductor prints each failed run to std::cerr,
        # which the port takes into its log).
        before = len(caplog.records)
        for _ in range(50):
            with pytest.raises(grpc.RpcError):
                s.stub.Run(wire.run_request("failing", x))
        s.app.port_server.flush_log()
        assert len(caplog.records) == before, [r.getMessage() for r in caplog.records[before:]]
        assert any("model runtime: " in r.getMessage() for r in caplog.records)


def oip_request(model: str, inputs: dict[str, torch.Tensor], parameters: dict[str, str]):
    from oip_messages import ipb

    req = ipb.ModelInferRequest(model_name=model)
    for name, t in inputs.items():
        datatype = {torch.float32: "FP32", torch.int64: "INT64"}[t.dtype]
        req.inputs.add(name=name, datatype=datatype, shape=list(t.shape))
        req.raw_input_contents.append(t.numpy().tobytes())
    for key, value in parameters.items():
        req.parameters[key].string_param = value
    return req


def test_inputs_that_disagree_on_a_tied_dimension_are_named_and_never_run():
    """two_io gives x's and ids' first dimension one size (its wrapper source says so).
    Inputs that disagree there pass each input's own checks; torch's guard on them names
    no input, and skips a zero-element input altogether (the kernels then read past the
    other input: SIGSEGV). The port and the Python path refuse them before the run, the
    model package's own ties named in the message."""
    x, ids = model_zoo.MODELS["two_io"].inputs(3)
    cases = [(x, ids[:2]), (x[:2], ids), (x[:2], ids[:0]), (x[:0], ids[:2]), (x[:1], ids[:0])]
    from oip_messages import OipStub

    with running_server(["two_io"]) as s:
        oip = OipStub(s.channel)
        for a, b in cases:
            calls = {
                "Run": lambda: s.stub.Run(wire.run_request("two_io", [a, b])),
                # request parameters: answered by the Python servicer, not the hot path
                "ModelInfer (Python)": lambda: oip.ModelInfer(
                    oip_request("two_io", {"x": a, "ids": b}, parameters={"p": "python path"})
                ),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as e:
                    call()
                details = e.value.details()
                assert e.value.code() == CODE.INVALID_ARGUMENT, (name, details)
                assert "one size" in details and "dimension 0" in details, (name, details)
                assert f"is {a.shape[0]}" in details and f"is {b.shape[0]}" in details, details
        # Still serving: nothing ran on the bad pairs.
        out = wire.outputs(s.stub.Run(wire.run_request("two_io", [x, ids])))
        assert wire.close(out, model_zoo.eager("two_io", [x, ids]))


def test_reflection_lists_every_service_on_the_one_port():
    with running_server(["mlp"]) as s:
        refl = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        resp = next(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {svc.name for svc in resp.list_services_response.service}
        assert {
            "aotiserve.v1.ModelRunner",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
        } <= names


def test_model_stream_infer_messages_are_answered_by_the_hot_path_in_order():
    """ModelStreamInfer: each plain message is answered in C++ (as ModelInfer is), one
    answer per message, in order; what the hot path does not serve (typed contents, an
    unknown model) is answered by Python in its place; errors travel in-band and the stream
    goes on; the weights version is each answer's model_version."""
    from oip_messages import OipStub, ipb

    with running_server(["mlp"]) as s:
        inputs = [model_zoo.MODELS["mlp"].inputs(b, seed=b)[0] for b in (1, 2, 3)]

        def raw(x, rid, model="mlp"):
            r = ipb.ModelInferRequest(model_name=model, id=rid)
            r.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
            r.raw_input_contents.append(x.numpy().tobytes())
            return r

        typed = ipb.ModelInferRequest(model_name="mlp", id="typed")
        t = typed.inputs.add(name="x", datatype="FP32", shape=list(inputs[1].shape))
        t.contents.fp32_contents.extend(inputs[1].flatten().tolist())
        requests = [
            raw(inputs[0], "a"),
            raw(inputs[1], "b", model="no_such_model"),
            typed,
            raw(inputs[2], "c"),
            ipb.ModelInferRequest(model_name="mlp", id="empty"),  # no inputs: refused
        ]
        before = _hot(s, "ModelInfer")
        answers = list(OipStub(s.channel).ModelStreamInfer(iter(requests), timeout=30))
        assert [a.infer_response.id for a in answers] == ["a", "b", "typed", "c", "empty"]
        assert _hot(s, "ModelInfer") - before >= 3  # a, c and the refused one in C++
        for a, x in ((answers[0], inputs[0]), (answers[2], inputs[1]), (answers[3], inputs[2])):
            assert not a.error_message, a.error_message
            r = a.infer_response
            assert r.model_name == "mlp" and r.model_version == "initial"
            got = np.frombuffer(r.raw_output_contents[0], np.float32).reshape(r.outputs[0].shape)
            assert wire.close([torch.from_numpy(got.copy())], model_zoo.eager("mlp", [x]))
        assert answers[1].error_message.startswith("NOT_FOUND: ")
        assert answers[1].infer_response.model_name == "no_such_model"
        assert answers[4].error_message.startswith("INVALID_ARGUMENT: ")
        assert "missing input" in answers[4].error_message


def test_an_idle_model_stream_infer_ends_after_the_idle_limit():
    from oip_messages import OipStub, ipb

    with running_server(["mlp"], stream_idle_timeout_s=0.5) as s:
        release = threading.Event()

        def one_then_nothing():
            (x,) = model_zoo.MODELS["mlp"].inputs(1)
            r = ipb.ModelInferRequest(model_name="mlp", id="only")
            r.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
            r.raw_input_contents.append(x.numpy().tobytes())
            yield r
            release.wait(30)

        answers = []
        with pytest.raises(grpc.RpcError) as e:
            for a in OipStub(s.channel).ModelStreamInfer(one_then_nothing(), timeout=20):
                answers.append(a)
        release.set()
        assert [a.infer_response.id for a in answers] == ["only"]
        assert e.value.code() == CODE.DEADLINE_EXCEEDED
        assert "no message from the client" in e.value.details()


def test_oip_model_infer_answered_by_the_hot_path_equals_run():
    from oip_messages import OipStub, ipb

    with running_server(["two_io"]) as s:
        x, ids = model_zoo.MODELS["two_io"].inputs(3, seed=2)
        request = ipb.ModelInferRequest(model_name="two_io", id="r1")
        request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        request.inputs.add(name="ids", datatype="INT64", shape=list(ids.shape))
        request.raw_input_contents.extend([x.numpy().tobytes(), ids.numpy().tobytes()])
        before = _hot(s, "ModelInfer")
        resp = OipStub(s.channel).ModelInfer(request)
        assert _hot(s, "ModelInfer") == before + 1
        assert resp.id == "r1" and resp.model_name == "two_io"
        assert [o.name for o in resp.outputs] == ["h", "ids2"]
        assert [o.datatype for o in resp.outputs] == ["FP32", "INT64"]
        h = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(resp.outputs[0].shape)
        ids2 = np.frombuffer(resp.raw_output_contents[1], np.int64).reshape(resp.outputs[1].shape)
        want = model_zoo.eager("two_io", (x, ids))
        assert wire.close([torch.from_numpy(h.copy()), torch.from_numpy(ids2.copy())], want)


def test_shared_memory_and_requested_outputs_are_served_by_the_hot_path(tmp_path):
    """OIP requests whose inputs and outputs lie in a registered system shared-memory
    region, and requests naming their outputs, are answered in C++ like any ModelInfer:
    inputs read in place (copied once where unaligned), outputs written into the region,
    raw_output_contents lined up with the outputs, errors naming the region."""
    import os
    import uuid

    from oip_messages import OipStub, ipb

    key = f"/aotiserve-port-{uuid.uuid4().hex[:12]}"
    with open(f"/dev/shm{key}", "wb") as f:
        f.truncate(1 << 16)
    try:
        with running_server(["mlp", "two_io"]) as s:
            oip = OipStub(s.channel)
            oip.SystemSharedMemoryRegister(
                ipb.SystemSharedMemoryRegisterRequest(name="r", key=key, byte_size=1 << 16)
            )
            region = np.memmap(f"/dev/shm{key}", dtype=np.uint8, mode="r+")
            (x,) = model_zoo.MODELS["mlp"].inputs(4, seed=9)
            want = model_zoo.eager("mlp", [x])[0]

            def infer(offset: int, out_offset: int):
                data = x.numpy().tobytes()
                region[offset : offset + len(data)] = np.frombuffer(data, np.uint8)
                r = ipb.ModelInferRequest(model_name="mlp", id=f"at{offset}")
                t = r.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
                t.parameters["shared_memory_region"].string_param = "r"
                t.parameters["shared_memory_byte_size"].int64_param = len(data)
                t.parameters["shared_memory_offset"].int64_param = offset
                o = r.outputs.add(name="output__0")
                o.parameters["shared_memory_region"].string_param = "r"
                o.parameters["shared_memory_byte_size"].int64_param = 4096
                o.parameters["shared_memory_offset"].int64_param = out_offset
                return oip.ModelInfer(r)

            before = _hot(s, "ModelInfer")
            for offset in (0, 3):  # aligned: read in place; unaligned: copied once
                resp = infer(offset, 32768)
                out = resp.outputs[0]
                assert out.parameters["shared_memory_region"].string_param == "r"
                nbytes = out.parameters["shared_memory_byte_size"].int64_param
                assert nbytes == want.numel() * 4 and not resp.raw_output_contents
                got = np.frombuffer(region[32768 : 32768 + nbytes].tobytes(), np.float32)
                assert torch.equal(torch.from_numpy(got.copy()).view(want.shape), want)
            assert _hot(s, "ModelInfer") == before + 2

            # Requested outputs: only those, in the order asked, still in C++.
            xt, ids = model_zoo.MODELS["two_io"].inputs(3, seed=4)
            r = ipb.ModelInferRequest(model_name="two_io")
            r.inputs.add(name="x", datatype="FP32", shape=list(xt.shape))
            r.inputs.add(name="ids", datatype="INT64", shape=list(ids.shape))
            r.raw_input_contents.extend([xt.numpy().tobytes(), ids.numpy().tobytes()])
            r.outputs.add(name="ids2")
            resp = oip.ModelInfer(r)
            assert [o.name for o in resp.outputs] == ["ids2"] and len(resp.raw_output_contents) == 1
            ids2 = np.frombuffer(resp.raw_output_contents[0], np.int64)
            assert torch.equal(
                torch.from_numpy(ids2.copy()), model_zoo.eager("two_io", (xt, ids))[1].flatten()
            )
            assert _hot(s, "ModelInfer") == before + 3

            bad = ipb.ModelInferRequest(model_name="mlp")
            t = bad.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
            t.parameters["shared_memory_region"].string_param = "nope"
            t.parameters["shared_memory_byte_size"].int64_param = x.numel() * 4
            with pytest.raises(grpc.RpcError) as e:
                oip.ModelInfer(bad)
            assert e.value.code() == CODE.INVALID_ARGUMENT and "'nope'" in e.value.details()
            # Unregistered: the hot path forgets it too.
            oip.SystemSharedMemoryUnregister(ipb.SystemSharedMemoryUnregisterRequest(name="r"))
            with pytest.raises(grpc.RpcError) as e:
                infer(0, 32768)
            assert e.value.code() == CODE.INVALID_ARGUMENT and "'r'" in e.value.details()
    finally:
        os.unlink(f"/dev/shm{key}")
