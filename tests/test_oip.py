"""The Open Inference Protocol (KServe v2 gRPC) endpoint, driven by tritonclient.

The daemon runs as a subprocess, started once for this module: tritonclient
registers the ``inference.*`` protobuf messages in the process-wide descriptor
pool, and so does our generated ``aotiserve.oip`` package, so the two can
never be imported into one process. This module must therefore never import
``aotiserve.oip`` (the server itself keeps its OIP messages in a private pool,
so an in-process server would be fine, but the generated stubs are not).

Eager references are computed here with the test model zoo (torch and
tritonclient coexist happily).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import triton_helpers  # noqa: F401  (first: skips this module where tritonclient cannot load)

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
import model_zoo  # noqa: E402  (tests/ is on sys.path via conftest)
from triton_helpers import (  # noqa: E402
    OIP,
    assert_matches_eager,
    client_fixtures,
    code_of,
    io_specs,
    triton_inputs,
)
from tritonclient.grpc import service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SERVED = ("mlp", "conv", "two_io", "blob_mlp")
# Packages torch made alone (no `aotiserve pack` metadata): described from their source.
PLAIN = ("plain_mlp", "plain_mlp_nolb", "plain_two_io", "plain_static")
START_TIMEOUT_S = 120


# ---------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def repository(tmp_path_factory, model_package) -> Path:
    """A model repository folder holding the zoo packages as <name>.pt2."""
    root = tmp_path_factory.mktemp("oip-repo")
    for name in SERVED + PLAIN:
        shutil.copyfile(model_package(name), root / f"{name}.pt2")
    return root


@pytest.fixture(scope="module")
def daemon(repository, tmp_path_factory):
    """Starts `python -m aotiserve.server` on a free port; yields "host:port"."""
    work = tmp_path_factory.mktemp("oip-daemon")
    ready_file = work / "ready.json"
    log_path = work / "daemon.log"
    cmd = [
        sys.executable,
        "-m",
        "aotiserve.server",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--ready-file",
        str(ready_file),
        "--model-repository",
        str(repository),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready_file.exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"daemon exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"daemon not ready after {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(0.05)
        # The file is written atomically once the server is serving.
        port = json.loads(ready_file.read_text())["port"]
        target = f"127.0.0.1:{port}"
        grpc.channel_ready_future(grpc.insecure_channel(target)).result(timeout=30)
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.environ.get("AOTISERVE_SHOW_DAEMON_LOG"):
            print(log_path.read_text())


client, stub = client_fixtures()


# ---------------------------------------------------------------- helpers


def typed_request(name: str, tensors, **kw) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest carrying every input as typed `contents`."""
    request = service_pb2.ModelInferRequest(model_name=name, **kw)
    field = {
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "INT64": "int64_contents",
        "INT32": "int_contents",
        "BOOL": "bool_contents",
    }
    for spec, t in zip(io_specs(name)[0], tensors):
        inp = request.inputs.add(
            name=spec["name"], datatype=OIP[spec["dtype"]], shape=list(t.shape)
        )
        getattr(inp.contents, field[OIP[spec["dtype"]]]).extend(t.flatten().tolist())
    return request


def outputs_of(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decodes raw_output_contents (what tritonclient's InferResult does)."""
    np_dtype = {
        "FP32": np.float32,
        "FP64": np.float64,
        "INT64": np.int64,
        "INT32": np.int32,
        "BOOL": np.bool_,
    }
    assert len(response.raw_output_contents) == len(response.outputs)
    return {
        o.name: np.frombuffer(raw, dtype=np_dtype[o.datatype]).reshape(list(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents)
    }


# ---------------------------------------------------------------- the wire contract


def test_proto_matches_tritonclient():
    """Every message, field name, number and type of our proto equals tritonclient's."""

    def schema(which: str) -> dict:
        out = subprocess.check_output(
            [sys.executable, str(REPO / "tests" / "oip_wire_schema.py"), which], cwd=REPO
        )
        return json.loads(out)

    ours, theirs = schema("ours"), schema("tritonclient")
    assert ours["methods"] == theirs["methods"]
    assert set(ours["types"]) - set(theirs["config_types"]) == set(theirs["types"])
    for name, fields in theirs["types"].items():
        assert ours["types"][name] == fields, name
    # Model configuration: ours is a subset of Triton's, field for field.
    for name in set(ours["types"]) & set(theirs["config_types"]):
        for field, desc in ours["types"][name].items():
            assert theirs["config_types"][name].get(field) == desc, f"{name}.{field}"


# ---------------------------------------------------------------- health and metadata


def test_server_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()


def test_server_metadata(client):
    meta = client.get_server_metadata()
    assert meta.name == "aotiserve"
    assert meta.version
    assert "model_repository" in meta.extensions


@pytest.mark.parametrize("name", SERVED)
def test_model_ready(client, name):
    assert client.is_model_ready(name)


def test_unknown_model_is_not_ready(client):
    assert not client.is_model_ready("no_such_model")


@pytest.mark.parametrize("name", SERVED)
def test_model_metadata(client, name):
    meta = client.get_model_metadata(name)
    inputs, outputs = io_specs(name)
    assert meta.name == name
    assert meta.platform == "pytorch_aoti"
    assert len(meta.versions) == 1 and meta.versions[0]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (s["name"], OIP[s["dtype"]], s["shape"]) for s in inputs
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        (s["name"], OIP[s["dtype"]], s["shape"]) for s in outputs
    ]


def test_model_metadata_two_io_names(client):
    meta = client.get_model_metadata("two_io")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("x", "FP32", [-1, 16]),
        ("ids", "INT64", [-1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("h", "FP32", [-1, 4]),
        ("ids2", "INT64", [-1]),
    ]


PLAIN_METADATA = {
    "plain_mlp": ([("input__0", "FP32", [-1, 64])], [("output__0", "FP32", [-1, 10])]),
    "plain_two_io": (
        [("input__0", "FP32", [-1, 16]), ("input__1", "INT64", [-1])],
        [("output__0", "FP32", [-1, 4]), ("output__1", "INT64", [-1])],
    ),
    "plain_static": ([("input__0", "FP32", [2, 3, 8, 8])], [("output__0", "FP32", [2, 5])]),
}


@pytest.mark.parametrize("name", sorted(PLAIN_METADATA))
def test_plain_package_metadata(client, name):
    """tritonclient's view of a package torch made alone, described from its source."""
    meta = client.get_model_metadata(name)
    inputs, outputs = PLAIN_METADATA[name]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == inputs
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == outputs
    config = client.get_model_config(name).config
    assert [(i.name, list(i.dims)) for i in config.input] == [(n, s) for n, _, s in inputs]


def _plain_inputs(tensors, datatypes=("FP32", "INT64")) -> list:
    inputs = []
    for i, (t, datatype) in enumerate(zip(tensors, datatypes)):
        inp = tritonclient_grpc.InferInput(f"input__{i}", list(t.shape), datatype)
        inp.set_data_from_numpy(t.numpy())
        inputs.append(inp)
    return inputs


def test_plain_package_infer(client):
    tensors = model_zoo.MODELS["plain_two_io"].inputs(batch=3, seed=2)
    result = client.infer("plain_two_io", _plain_inputs(tensors))
    expected = model_zoo.eager("plain_two_io", tensors)
    for name, ref in zip(("output__0", "output__1"), expected):
        got = torch.from_numpy(np.array(result.as_numpy(name)))
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_plain_package_guards(client):
    """Batch 1 below torch's default lower bound is explained; without that check it
    serves; a wrong datatype names the input."""
    with pytest.raises(InferenceServerException) as e:
        client.infer("plain_mlp", _plain_inputs([torch.randn(1, 64)]))
    assert code_of(e) == "INVALID_ARGUMENT"
    assert "check_lowerbound" in str(e.value) and "packaging.pack" in str(e.value)
    one = [torch.randn(1, 64)]
    result = client.infer("plain_mlp_nolb", _plain_inputs(one))
    torch.testing.assert_close(
        torch.from_numpy(np.array(result.as_numpy("output__0"))),
        model_zoo.eager("plain_mlp_nolb", one)[0],
        rtol=1e-4,
        atol=1e-5,
    )
    tensors = [torch.randn(3, 16), torch.zeros(3)]
    with pytest.raises(InferenceServerException) as e:
        client.infer("plain_two_io", _plain_inputs(tensors, ("FP32", "FP32")))
    assert code_of(e) == "INVALID_ARGUMENT" and "'input__1'" in str(e.value)


def test_model_metadata_unknown_model(client):
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert code_of(e) == "NOT_FOUND"


def test_model_config(client):
    config = client.get_model_config("two_io").config
    assert config.name == "two_io"
    assert config.max_batch_size == 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [-1, 16]), ("ids", [-1])]
    assert [o.name for o in config.output] == ["h", "ids2"]
    from tritonclient.grpc import model_config_pb2

    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert config.input[1].data_type == model_config_pb2.TYPE_INT64


def test_repository_index(client):
    index = client.get_model_repository_index()
    by_name = {m.name: m for m in index.models}
    assert set(SERVED) <= set(by_name)
    for name in SERVED:
        assert by_name[name].state == "READY", by_name[name]
        assert by_name[name].version


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("name", SERVED)
def test_infer_raw(client, name):
    tensors = model_zoo.MODELS[name].inputs(batch=3, seed=1)
    result = client.infer(name, triton_inputs(name, tensors))
    out_names = [s["name"] for s in io_specs(name)[1]]
    assert_matches_eager(name, tensors, {n: result.as_numpy(n) for n in out_names})
    response = result.get_response()
    assert response.model_name == name
    assert response.model_version
    assert [o.name for o in response.outputs] == out_names


def test_infer_batch_sizes(client):
    for batch in (1, 7, 64):
        tensors = model_zoo.MODELS["mlp"].inputs(batch=batch, seed=batch)
        result = client.infer("mlp", triton_inputs("mlp", tensors))
        assert_matches_eager("mlp", tensors, {"output__0": result.as_numpy("output__0")})


def test_request_id_and_parameters_echoed(client):
    tensors = model_zoo.MODELS["mlp"].inputs(batch=2)
    result = client.infer(
        "mlp",
        triton_inputs("mlp", tensors),
        request_id="req-42",
        parameters={"tag": "abc", "n": 7, "flag": True},
    )
    response = result.get_response()
    assert response.id == "req-42"
    assert response.parameters["tag"].string_param == "abc"
    assert response.parameters["n"].int64_param == 7
    assert response.parameters["flag"].bool_param is True


def test_requested_outputs_filter_and_order(client):
    tensors = model_zoo.MODELS["two_io"].inputs(batch=5)
    result = client.infer(
        "two_io",
        triton_inputs("two_io", tensors),
        outputs=[tritonclient_grpc.InferRequestedOutput("ids2")],
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["ids2"]
    np.testing.assert_array_equal(
        result.as_numpy("ids2"), model_zoo.eager("two_io", tensors)[1].numpy()
    )
    assert result.as_numpy("h") is None

    result = client.infer(
        "two_io",
        triton_inputs("two_io", tensors),
        outputs=[
            tritonclient_grpc.InferRequestedOutput("ids2"),
            tritonclient_grpc.InferRequestedOutput("h"),
        ],
    )
    assert [o.name for o in result.get_response().outputs] == ["ids2", "h"]
    assert_matches_eager(
        "two_io", tensors, {"h": result.as_numpy("h"), "ids2": result.as_numpy("ids2")}
    )


def test_model_version(client):
    version = client.get_model_metadata("mlp").versions[0]
    tensors = model_zoo.MODELS["mlp"].inputs(batch=2)
    result = client.infer("mlp", triton_inputs("mlp", tensors), model_version=version)
    assert result.get_response().model_version == version
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", triton_inputs("mlp", tensors), model_version="no-such-version")
    assert code_of(e) == "NOT_FOUND"


def test_async_infer_8_in_flight(client):
    jobs = []
    for i in range(8):
        name = SERVED[i % len(SERVED)]
        tensors = model_zoo.MODELS[name].inputs(batch=i + 1, seed=i)
        done: Future = Future()
        client.async_infer(
            name,
            triton_inputs(name, tensors),
            lambda result, error, done=done: (
                done.set_exception(error) if error else done.set_result(result)
            ),
            request_id=str(i),
        )
        jobs.append((name, tensors, done))
    for i, (name, tensors, done) in enumerate(jobs):
        result = done.result(timeout=60)
        assert result.get_response().id == str(i)
        out_names = [s["name"] for s in io_specs(name)[1]]
        assert_matches_eager(name, tensors, {n: result.as_numpy(n) for n in out_names})


@pytest.mark.parametrize("name", SERVED)
def test_infer_typed_contents(stub, name):
    tensors = model_zoo.MODELS[name].inputs(batch=3, seed=2)
    response = stub.ModelInfer(typed_request(name, tensors, id="typed"))
    assert response.id == "typed"
    assert_matches_eager(name, tensors, outputs_of(response))


def test_typed_contents_8_in_flight(stub):
    calls = []
    for i in range(8):
        name = SERVED[i % len(SERVED)]
        tensors = model_zoo.MODELS[name].inputs(batch=i + 1, seed=10 + i)
        calls.append((name, tensors, stub.ModelInfer.future(typed_request(name, tensors))))
    for name, tensors, call in calls:
        assert_matches_eager(name, tensors, outputs_of(call.result(timeout=60)))


def test_typed_contents_narrow_integer_types(stub):
    """INT32 travels in int_contents; the model wants INT64: refused by dtype, not by decoding."""
    request = service_pb2.ModelInferRequest(model_name="two_io")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend(
        [0.0] * 16
    )
    request.inputs.add(name="ids", datatype="INT32", shape=[1]).contents.int_contents.extend([3])
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert code_of(e) == "INVALID_ARGUMENT"
    assert "ids" in e.value.details()


# ---------------------------------------------------------------- repository


def test_unload_and_load(client, stub):
    client.unload_model("blob_mlp")
    assert not client.is_model_ready("blob_mlp")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["blob_mlp"].state == "UNAVAILABLE" and index["blob_mlp"].reason
    ready_only = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
    assert {m.name for m in ready_only.models} == set(SERVED + PLAIN) - {"blob_mlp"}
    assert client.is_model_ready("mlp")  # the others keep serving
    tensors = model_zoo.MODELS["blob_mlp"].inputs(batch=2)
    with pytest.raises(InferenceServerException) as e:
        client.infer("blob_mlp", triton_inputs("blob_mlp", tensors))
    assert code_of(e) in ("NOT_FOUND", "UNAVAILABLE")

    client.load_model("blob_mlp")
    assert client.is_model_ready("blob_mlp")
    result = client.infer("blob_mlp", triton_inputs("blob_mlp", tensors))
    assert_matches_eager("blob_mlp", tensors, {"output__0": result.as_numpy("output__0")})


def test_load_unknown_model(client):
    with pytest.raises(InferenceServerException) as e:
        client.load_model("no_such_model")
    assert code_of(e) == "NOT_FOUND"


def test_load_with_config_override_is_refused(client):
    with pytest.raises(InferenceServerException) as e:
        client.load_model("mlp", config=json.dumps({"max_batch_size": 8}))
    assert code_of(e) in ("INVALID_ARGUMENT", "UNIMPLEMENTED")
    assert client.is_model_ready("mlp")


# ---------------------------------------------------------------- bad requests


def raw_request(model="mlp", batch=2, **overrides) -> service_pb2.ModelInferRequest:
    """A valid raw mlp request, then `overrides` applied to its first input."""
    request = service_pb2.ModelInferRequest(model_name=model)
    x = np.zeros((batch, 64), dtype=np.float32)
    inp = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    for key, value in overrides.items():
        if key == "raw":
            request.raw_input_contents[0] = value
        elif key == "shape":
            del inp.shape[:]
            inp.shape.extend(value)
        else:
            setattr(inp, key, value)
    return request


def _extra_input():
    r = raw_request()
    r.inputs.add(name="y", datatype="FP32", shape=[2, 64])
    r.raw_input_contents.append(np.zeros((2, 64), np.float32).tobytes())
    return r


def _duplicate_input():
    r = raw_request()
    r.inputs.add(name="x", datatype="FP32", shape=[2, 64])
    r.raw_input_contents.append(np.zeros((2, 64), np.float32).tobytes())
    return r


def _missing_input():
    r = service_pb2.ModelInferRequest(model_name="two_io")
    r.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    r.raw_input_contents.append(np.zeros((2, 16), np.float32).tobytes())
    return r


def _missing_raw():
    r = raw_request()
    del r.raw_input_contents[:]
    return r


def _raw_and_typed():
    r = raw_request()
    r.inputs[0].contents.fp32_contents.extend([0.0] * 128)
    return r


def _unknown_output():
    r = raw_request()
    r.outputs.add(name="nope")
    return r


def _typed_count_mismatch():
    r = service_pb2.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="x", datatype="FP32", shape=[2, 64]).contents.fp32_contents.extend(
        [0.0] * 127
    )
    return r


def _typed_wrong_field():
    r = service_pb2.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="x", datatype="FP32", shape=[2, 64]).contents.fp64_contents.extend(
        [0.0] * 128
    )
    return r


def _typed_fp16():
    r = service_pb2.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="x", datatype="FP16", shape=[1, 1]).contents.fp32_contents.append(0.0)
    return r


def _bytes_tensor():
    r = service_pb2.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")
    return r


def _shared_memory_input():
    r = service_pb2.ModelInferRequest(model_name="mlp")
    inp = r.inputs.add(name="x", datatype="FP32", shape=[2, 64])
    inp.parameters["shared_memory_region"].string_param = "region0"
    inp.parameters["shared_memory_byte_size"].int64_param = 512
    return r


def _sequence():
    r = raw_request()
    r.parameters["sequence_id"].int64_param = 5
    r.parameters["sequence_start"].bool_param = True
    return r


def _classification():
    r = raw_request()
    r.outputs.add(name="output__0").parameters["classification"].int64_param = 3
    return r


BAD_REQUESTS = {
    "unknown model": (lambda: raw_request(model="no_such_model"), "NOT_FOUND"),
    "unknown datatype string": (lambda: raw_request(datatype="FLOAT32"), "INVALID_ARGUMENT"),
    "wrong datatype": (
        lambda: raw_request(datatype="FP64", raw=np.zeros((2, 64)).tobytes()),
        "INVALID_ARGUMENT",
    ),
    "bytes shorter than shape": (lambda: raw_request(raw=b"\0" * 100), "INVALID_ARGUMENT"),
    "bytes longer than shape": (
        lambda: raw_request(raw=b"\0" * (2 * 64 * 4 + 4)),
        "INVALID_ARGUMENT",
    ),
    "wrong shape": (lambda: raw_request(shape=[4, 32]), "INVALID_ARGUMENT"),
    "wrong rank": (lambda: raw_request(shape=[128]), "INVALID_ARGUMENT"),
    "negative dim": (lambda: raw_request(shape=[-2, -64]), "INVALID_ARGUMENT"),
    "unknown input name": (lambda: raw_request(name="nope"), "INVALID_ARGUMENT"),
    "extra input": (_extra_input, "INVALID_ARGUMENT"),
    "duplicate input": (_duplicate_input, "INVALID_ARGUMENT"),
    "missing input": (_missing_input, "INVALID_ARGUMENT"),
    "no data": (_missing_raw, "INVALID_ARGUMENT"),
    "raw and typed together": (_raw_and_typed, "INVALID_ARGUMENT"),
    "unknown requested output": (_unknown_output, "INVALID_ARGUMENT"),
    "typed count mismatch": (_typed_count_mismatch, "INVALID_ARGUMENT"),
    "typed wrong field": (_typed_wrong_field, "INVALID_ARGUMENT"),
    "typed FP16": (_typed_fp16, "INVALID_ARGUMENT"),
    "BYTES tensor": (_bytes_tensor, "UNIMPLEMENTED"),
    "unregistered shared-memory region": (_shared_memory_input, "INVALID_ARGUMENT"),
    "sequence batching": (_sequence, "INVALID_ARGUMENT"),
    "classification": (_classification, "UNIMPLEMENTED"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request(stub, client, case):
    make, expected = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(make())
    assert code_of(e) == expected, e.value.details()
    assert e.value.details()
    # ...and the daemon keeps serving, with unchanged results.
    tensors = model_zoo.MODELS["mlp"].inputs(batch=2, seed=3)
    result = client.infer("mlp", triton_inputs("mlp", tensors))
    assert_matches_eager("mlp", tensors, {"output__0": result.as_numpy("output__0")})


def test_bad_request_messages_name_the_input(stub):
    for make in (
        lambda: raw_request(raw=b"\0" * 100),
        lambda: raw_request(datatype="FLOAT32"),
        _missing_input,
    ):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(make())
        details = e.value.details()
        assert "'x'" in details or "'ids'" in details, details


def test_unserved_rpcs_are_unimplemented(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.TraceSetting(service_pb2.TraceSettingRequest(model_name="mlp"))
    assert code_of(e) == "UNIMPLEMENTED"


def test_stream_infer(client):
    """tritonclient's bidirectional stream: one response per request, errors in-band."""
    import queue

    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        sent = []
        for i in range(6):
            name = SERVED[i % len(SERVED)]
            tensors = model_zoo.MODELS[name].inputs(batch=i + 1, seed=20 + i)
            client.async_stream_infer(name, triton_inputs(name, tensors), request_id=f"s{i}")
            sent.append((name, tensors))
        client.async_stream_infer(
            "no_such_model", triton_inputs("mlp", sent[0][1]), request_id="bad"
        )
        for i, (name, tensors) in enumerate(sent):
            result, error = results.get(timeout=60)
            assert error is None, error
            assert result.get_response().id == f"s{i}"
            out_names = [s["name"] for s in io_specs(name)[1]]
            assert_matches_eager(name, tensors, {n: result.as_numpy(n) for n in out_names})
        result, error = results.get(timeout=60)
        assert result is None and "NOT_FOUND" in str(error)
    finally:
        client.stop_stream()


def test_daemon_still_serves_after_everything(client):
    assert client.is_server_live() and client.is_server_ready()
    for name in SERVED:
        assert client.is_model_ready(name)


# ---------------------------------------------------------------- weights versions


def test_model_version_follows_weight_swaps(daemon, client):
    """model_version is the active weights version: a swap changes it, a rollback restores it."""
    from aotiserve.client import Client

    spec = model_zoo.MODELS["mlp"]
    module = spec.module()
    new_weights = {k: v * 0.5 + 0.01 for k, v in module.state_dict().items()}
    module.load_state_dict(new_weights)
    tensors = spec.inputs(batch=3, seed=4)
    before = client.get_model_metadata("mlp").versions[0]

    with Client(daemon) as native:
        handle = native.model("mlp")
        handle.update_constant_buffer(new_weights, use_inactive=True, validate_full_updates=True)
        swapped = handle.swap_constant_buffer()
        try:
            assert swapped.id != before
            assert list(client.get_model_metadata("mlp").versions) == [swapped.id]
            assert client.is_model_ready("mlp", model_version=swapped.id)
            assert not client.is_model_ready("mlp", model_version=before)
            result = client.infer("mlp", triton_inputs("mlp", tensors))
            assert result.get_response().model_version == swapped.id
            with torch.no_grad():
                expected = module(*tensors)
            torch.testing.assert_close(
                torch.from_numpy(result.as_numpy("output__0").copy()),
                expected,
                rtol=1e-4,
                atol=1e-5,
            )
            with pytest.raises(InferenceServerException) as e:
                client.infer("mlp", triton_inputs("mlp", tensors), model_version=before)
            assert code_of(e) == "NOT_FOUND"
        finally:
            restored = handle.rollback_constant_buffer()
    assert restored.id == before
    result = client.infer("mlp", triton_inputs("mlp", tensors))
    assert result.get_response().model_version == before
    assert_matches_eager("mlp", tensors, {"output__0": result.as_numpy("output__0")})


# ---------------------------------------------------------------- in-process server


def test_in_process_server_beside_tritonclient(tmp_path, model_package):
    """The server keeps its inference.* messages in a private descriptor pool, so it can run
    in a process that has imported tritonclient (this one)."""
    from aotiserve.server.app import create_server
    from aotiserve.server.config import ServeConfig

    shutil.copyfile(model_package("two_io"), tmp_path / "two_io.pt2")
    server, port = create_server(
        ServeConfig(port=0, metrics_port=None, model_repository=str(tmp_path))
    )
    server.start(load="now")
    try:
        c = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert c.is_server_ready()
        tensors = model_zoo.MODELS["two_io"].inputs(batch=2, seed=5)
        result = c.infer("two_io", triton_inputs("two_io", tensors))
        assert_matches_eager("two_io", tensors, {n: result.as_numpy(n) for n in ("h", "ids2")})
        c.close()
    finally:
        server.stop(0).wait(30)
    assert "aotiserve.oip.inference_pb2" not in sys.modules


def test_repository_calls_need_the_admin_token(tmp_path, model_package):
    """With an admin token, load/unload are admin calls (the daemon's one interceptor)."""
    from aotiserve.server.app import create_server
    from aotiserve.server.config import ServeConfig

    shutil.copyfile(model_package("mlp"), tmp_path / "mlp.pt2")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server, port = create_server(
        ServeConfig(
            port=0, metrics_port=None, model_repository=str(tmp_path), admin_token_file=str(token)
        )
    )
    server.start(load="now")
    c = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        with pytest.raises(InferenceServerException) as e:
            c.unload_model("mlp")
        assert code_of(e) == "UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as e:
            c.unload_model("mlp", headers={"authorization": "Bearer wrong"})
        assert code_of(e) == "PERMISSION_DENIED"
        assert c.is_model_ready("mlp")  # reads need no token
        c.unload_model("mlp", headers={"authorization": "Bearer s3cret"})
        assert not c.is_model_ready("mlp")
        c.load_model("mlp", headers={"authorization": "Bearer s3cret"})
        assert c.is_model_ready("mlp")
    finally:
        c.close()
        server.stop(0).wait(30)


# ---------------------------------------------------------------- typed contents, every datatype


TYPED_CASES = {
    "BOOL": ("bool_contents", [True, False, True, True], torch.bool),
    "INT8": ("int_contents", [-128, 0, 5, 127], torch.int8),
    "INT16": ("int_contents", [-32768, 1, 2, 32767], torch.int16),
    "INT32": ("int_contents", [-(2**31), 1, 2, 2**31 - 1], torch.int32),
    "INT64": ("int64_contents", [-(2**63), 1, 2, 2**63 - 1], torch.int64),
    "UINT8": ("uint_contents", [0, 1, 200, 255], torch.uint8),
    "UINT16": ("uint_contents", [0, 1, 2, 65535], torch.uint16),
    "UINT32": ("uint_contents", [0, 1, 2, 2**32 - 1], torch.uint32),
    "UINT64": ("uint64_contents", [0, 1, 2, 2**64 - 1], torch.uint64),
    "FP32": ("fp32_contents", [0.5, -1.25, 3.0, 1e30], torch.float32),
    "FP64": ("fp64_contents", [0.1, -1e300, 3.0, 2.5], torch.float64),
}


@pytest.mark.parametrize("datatype", list(TYPED_CASES))
def test_decode_typed_contents_every_datatype(datatype):
    """The server's typed decoding, in process (its messages live in a private pool)."""
    from aotiserve.server import oip_codec as oip
    from aotiserve.server.tensor_codec import Limits

    field, values, dtype = TYPED_CASES[datatype]
    contents = oip.messages().InferTensorContents()
    getattr(contents, field).extend(values)
    tensor = oip.decode_typed(
        contents, datatype, oip.TORCH_BY_OIP[datatype], [2, 2], "input 'v'", Limits()
    )
    assert tensor.dtype == dtype and tensor.shape == (2, 2)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):  # beyond torch.tensor's reach
        assert [int(v) for v in tensor.flatten().tolist()] == values
    else:
        expected = torch.tensor(values, dtype=torch.float64 if dtype.is_floating_point else None)
        torch.testing.assert_close(tensor.flatten(), expected.to(dtype))


@pytest.mark.parametrize(
    "datatype,value", [("INT8", 128), ("INT8", -129), ("UINT8", 256), ("INT16", 40000)]
)
def test_decode_typed_contents_out_of_range(datatype, value):
    from aotiserve.server import oip_codec as oip
    from aotiserve.server.errors import InvalidArgument
    from aotiserve.server.tensor_codec import Limits

    field = TYPED_CASES[datatype][0]
    contents = oip.messages().InferTensorContents()
    getattr(contents, field).append(value)
    with pytest.raises(InvalidArgument, match="out of range"):
        oip.decode_typed(contents, datatype, oip.TORCH_BY_OIP[datatype], [1], "input 'v'", Limits())


def test_oip_stub_helper_beside_tritonclient(daemon):
    """tests/oip_stub.py: OIP stubs for in-process tests that leave tritonclient importable."""
    from oip_stub import GRPCInferenceServiceStub, ipb

    with grpc.insecure_channel(daemon) as channel:
        ours = GRPCInferenceServiceStub(channel)
        assert ours.ServerMetadata(ipb.ServerMetadataRequest()).name == "aotiserve"
        x = np.ones((2, 64), np.float32)
        request = ipb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="x", datatype="FP32", shape=[2, 64])
        response = ours.ModelInfer(request)
        assert [o.name for o in response.outputs] == ["output__0"]
    assert "aotiserve.oip.inference_pb2" not in sys.modules


def test_decode_typed_contents_in_two_fields_is_refused():
    """FP32 values with int_contents filled too: one of them would be silently ignored."""
    from aotiserve.server import oip_codec as oip
    from aotiserve.server.errors import InvalidArgument
    from aotiserve.server.tensor_codec import Limits

    contents = oip.messages().InferTensorContents()
    contents.fp32_contents.extend([1.0, 2.0])
    contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match="fp32_contents only, but the request filled int"):
        oip.decode_typed(contents, "FP32", torch.float32, [2], "input 'v'", Limits())
