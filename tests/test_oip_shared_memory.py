"""OIP system shared memory, driven by tritonclient's own ``utils.shared_memory`` flow:
inputs read from and outputs written to regions a client on the same host registers,
bad names/offsets/sizes refused with the right codes, regions of a killed client
released. (CUDA shared memory: test_cuda_shared_memory.py, on a GPU machine.)

Like test_oip.py, runs in a fresh interpreter when this session imported
``aotiserve.oip`` (test_oip_isolated.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import uuid

import grpc
import numpy as np
import pytest
import torch
import triton_helpers  # noqa: F401  (first: skips this module where tritonclient cannot load)

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
import model_zoo  # noqa: E402
from helpers import wait_for  # noqa: E402
from server_harness import start_daemon  # noqa: E402
from triton_helpers import (  # noqa: E402
    assert_matches_eager,
    client_fixtures,
    code_of,
    triton_inputs,
)
from tritonclient.grpc import service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon(["mlp", "two_io"])
    yield d.target
    d.proc.terminate()
    d.proc.wait(30)


client, stub = client_fixtures()


@pytest.fixture
def regions(client):
    """Makes system shared-memory regions (name -> handle), unregistered and destroyed after."""
    made: dict = {}

    def make(name: str, byte_size: int, register: bool = True, offset: int = 0):
        key = f"/aotiserve-test-{uuid.uuid4().hex[:12]}"
        made[name] = handle = shm.create_shared_memory_region(name, key, byte_size + offset)
        if register:
            client.register_system_shared_memory(name, key, byte_size, offset=offset)
        return handle, key

    yield make
    client.unregister_system_shared_memory()
    for handle in made.values():
        shm.destroy_shared_memory_region(handle)


def _mlp_inputs(batch: int = 4, seed: int = 1) -> list[torch.Tensor]:
    return model_zoo.MODELS["mlp"].inputs(batch=batch, seed=seed)


def test_inputs_and_outputs_in_system_shared_memory(client, regions):
    (x,) = _mlp_inputs()
    arr = x.numpy()
    in_handle, _ = regions("in0", arr.nbytes)
    out_bytes = arr.shape[0] * 10 * 4
    out_handle, _ = regions("out0", out_bytes)
    shm.set_shared_memory_region(in_handle, [arr])

    inp = tritonclient_grpc.InferInput("x", list(arr.shape), "FP32")
    inp.set_shared_memory("in0", arr.nbytes)
    out = tritonclient_grpc.InferRequestedOutput("output__0")
    out.set_shared_memory("out0", out_bytes)
    result = client.infer("mlp", [inp], outputs=[out])

    meta = result.get_output("output__0")
    assert list(meta.shape) == [arr.shape[0], 10] and meta.datatype == "FP32"
    assert meta.parameters["shared_memory_region"].string_param == "out0"
    assert meta.parameters["shared_memory_byte_size"].int64_param == out_bytes
    got = shm.get_contents_as_numpy(out_handle, np.float32, list(meta.shape))
    assert_matches_eager("mlp", [x], {"output__0": got})

    status = client.get_system_shared_memory_status(as_json=True)
    assert {r["name"] for r in status["regions"].values()} == {"in0", "out0"}


def test_one_input_in_shared_memory_beside_one_in_the_request(client, regions):
    """two_io: its first input in a region (at an offset), the second in the request's
    raw contents; one output in shared memory, the other in the response."""
    tensors = model_zoo.MODELS["two_io"].inputs(batch=3, seed=4)
    inputs = triton_inputs("two_io", tensors)
    first = tensors[0].numpy()
    handle, _ = regions("two_in", first.nbytes + 64)
    shm.set_shared_memory_region(handle, [first], offset=64)
    inputs[0] = tritonclient_grpc.InferInput(inputs[0].name(), list(first.shape), "FP32")
    inputs[0].set_shared_memory("two_in", first.nbytes, offset=64)
    expected = model_zoo.eager("two_io", tensors)
    h_bytes = expected[0].numel() * expected[0].element_size()
    out_handle, _ = regions("two_out", h_bytes)
    h = tritonclient_grpc.InferRequestedOutput("h")
    h.set_shared_memory("two_out", h_bytes)
    result = client.infer(
        "two_io", inputs, outputs=[h, tritonclient_grpc.InferRequestedOutput("ids2")]
    )
    got_h = shm.get_contents_as_numpy(out_handle, np.float32, list(result.get_output("h").shape))
    assert_matches_eager("two_io", tensors, {"h": got_h, "ids2": result.as_numpy("ids2")})


def test_unaligned_region_offset_is_read_correctly(client, regions):
    (x,) = _mlp_inputs(batch=2, seed=7)
    arr = x.numpy()
    handle, _ = regions("odd", arr.nbytes + 3)
    shm.set_shared_memory_region(handle, [arr], offset=3)
    inp = tritonclient_grpc.InferInput("x", list(arr.shape), "FP32")
    inp.set_shared_memory("odd", arr.nbytes, offset=3)
    result = client.infer("mlp", [inp])
    assert_matches_eager("mlp", [x], {"output__0": result.as_numpy("output__0")})


@pytest.mark.parametrize("path", ["hot path", "python"])
def test_a_region_shrunk_by_its_client_is_refused_and_the_daemon_lives(client, path):
    """A client that ftruncates its object while it is registered: a request that reads
    its input from it, or writes its output into it, is refused with INVALID_ARGUMENT
    naming the region (not SIGBUS, which would kill the daemon); the region stays refused
    until it is registered again. ``python``: request parameters send the call to the
    Python servicer instead of the C++ hot path."""
    (x,) = _mlp_inputs(batch=2, seed=3)
    arr = x.numpy()
    params = {"note": "python path"} if path == "python" else None
    keys = {n: f"/aotiserve-test-{uuid.uuid4().hex[:12]}" for n in ("shr_in", "shr_out")}
    fds = {n: os.open("/dev/shm" + k, os.O_CREAT | os.O_RDWR, 0o600) for n, k in keys.items()}
    try:
        for name, fd in fds.items():
            os.ftruncate(fd, 1 << 16)  # more than a page: the fault is past the first one too
            client.register_system_shared_memory(name, keys[name], 1 << 16)
        os.pwrite(fds["shr_in"], arr.tobytes(), 0)

        def from_region():
            inp = tritonclient_grpc.InferInput("x", list(arr.shape), "FP32")
            inp.set_shared_memory("shr_in", arr.nbytes)
            return client.infer("mlp", [inp], parameters=params)

        def into_region():
            inp = tritonclient_grpc.InferInput("x", list(arr.shape), "FP32")
            inp.set_data_from_numpy(arr)
            out = tritonclient_grpc.InferRequestedOutput("output__0")
            out.set_shared_memory("shr_out", arr.shape[0] * 10 * 4)
            return client.infer("mlp", [inp], outputs=[out], parameters=params)

        assert_matches_eager("mlp", [x], {"output__0": from_region().as_numpy("output__0")})
        into_region()
        for name, call in (("shr_in", from_region), ("shr_out", into_region)):
            os.ftruncate(fds[name], 0)
            for _ in range(2):  # the request that met the shrink, then one after it
                with pytest.raises(InferenceServerException) as e:
                    call()
                assert code_of(e) == "INVALID_ARGUMENT"
                assert f"region '{name}' shrank" in str(e.value), str(e.value)
            assert client.is_server_live()
        # Registered again over a full-size object, the region serves.
        client.unregister_system_shared_memory("shr_in")
        os.ftruncate(fds["shr_in"], 1 << 16)
        os.pwrite(fds["shr_in"], arr.tobytes(), 0)
        client.register_system_shared_memory("shr_in", keys["shr_in"], 1 << 16)
        assert_matches_eager("mlp", [x], {"output__0": from_region().as_numpy("output__0")})
    finally:
        for name, fd in fds.items():
            with contextlib.suppress(InferenceServerException):
                client.unregister_system_shared_memory(name)
            os.close(fd)
            os.unlink("/dev/shm" + keys[name])


def _infer_code(client, inp, outputs=None) -> str:
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [inp], outputs=outputs)
    return code_of(e)


def test_bad_regions_names_offsets_and_sizes(client, regions, stub):
    (x,) = _mlp_inputs(batch=2)
    arr = x.numpy()
    handle, key = regions("r", arr.nbytes)
    shm.set_shared_memory_region(handle, [arr])

    def shared_input(name="r", size=arr.nbytes, offset=0):
        inp = tritonclient_grpc.InferInput("x", list(arr.shape), "FP32")
        inp.set_shared_memory(name, size, offset=offset)
        return inp

    assert _infer_code(client, shared_input(name="nope")) == "INVALID_ARGUMENT"
    assert _infer_code(client, shared_input(offset=8)) == "INVALID_ARGUMENT"  # past its end
    assert _infer_code(client, shared_input(size=arr.nbytes - 4)) == "INVALID_ARGUMENT"
    small = tritonclient_grpc.InferRequestedOutput("output__0")
    small.set_shared_memory("r", 8)  # 2 x 10 floats do not fit 8 bytes
    assert _infer_code(client, shared_input(), [small]) == "INVALID_ARGUMENT"
    missing = tritonclient_grpc.InferRequestedOutput("output__0")
    missing.set_shared_memory("nope", 80)
    assert _infer_code(client, shared_input(), [missing]) == "INVALID_ARGUMENT"

    def register(**kw):
        with pytest.raises(grpc.RpcError) as e:
            stub.SystemSharedMemoryRegister(service_pb2.SystemSharedMemoryRegisterRequest(**kw))
        return code_of(e), e.value.details()

    assert register(name="r", key=key, byte_size=8)[0] == "ALREADY_EXISTS"
    for bad_key in ("/../etc/passwd", "no-slash", "/a/b", "/", ""):
        code, details = register(name="k", key=bad_key, byte_size=8)
        assert code == "INVALID_ARGUMENT" and "key" in details, (bad_key, details)
    code, details = register(name="k", key="/aotiserve-no-such-object", byte_size=8)
    assert code == "INVALID_ARGUMENT" and "cannot open" in details
    code, details = register(name="k", key=key, byte_size=arr.nbytes + 1)
    assert code == "INVALID_ARGUMENT" and "beyond the end" in details
    assert register(name="k", key=key, byte_size=0)[0] == "INVALID_ARGUMENT"
    assert register(name="", key=key, byte_size=8)[0] == "INVALID_ARGUMENT"
    with pytest.raises(grpc.RpcError) as e:
        stub.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest(name="nope"))
    assert code_of(e) == "NOT_FOUND"
    # Nothing was left registered by the refusals, and the daemon still serves.
    status = client.get_system_shared_memory_status(as_json=True)
    assert [r["name"] for r in status["regions"].values()] == ["r"]
    result = client.infer("mlp", [shared_input()])
    assert_matches_eager("mlp", [x], {"output__0": result.as_numpy("output__0")})


def test_unregister_one_and_all(client, regions):
    regions("a", 64)
    regions("b", 64)
    client.unregister_system_shared_memory("a")
    status = client.get_system_shared_memory_status(as_json=True)
    assert [r["name"] for r in status["regions"].values()] == ["b"]
    client.unregister_system_shared_memory("a")  # already gone: not an error (as in Triton)
    client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status(as_json=True).get("regions")


def test_a_killed_clients_regions_are_released(client, daemon, tmp_path):
    """A client registers a region on its own connection and is killed without
    unregistering: the daemon releases it (its connection closed)."""
    key = f"/aotiserve-test-{uuid.uuid4().hex[:12]}"
    ready = tmp_path / "registered"
    script = textwrap.dedent(
        f"""
        import time, pathlib
        import tritonclient.grpc as g
        import tritonclient.utils.shared_memory as shm
        shm.create_shared_memory_region("orphan", {key!r}, 4096)
        c = g.InferenceServerClient({daemon!r})
        c.register_system_shared_memory("orphan", {key!r}, 4096)
        pathlib.Path({str(ready)!r}).write_text("1")
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, "the client registered")
        assert proc.poll() is None, "the client exited early"

        def names():
            return {
                r["name"]
                for r in client.get_system_shared_memory_status(as_json=True)
                .get("regions", {})
                .values()
            }

        assert "orphan" in names()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        wait_for(lambda: "orphan" not in names(), "the killed client's region released")
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink("/dev/shm" + key)


def test_server_metadata_names_the_shared_memory_extensions(client):
    extensions = client.get_server_metadata().extensions
    assert "system_shared_memory" in extensions
    assert ("cuda_shared_memory" in extensions) == torch.cuda.is_available()


def test_cuda_shared_memory_without_cuda_is_refused(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.CudaSharedMemoryRegister(
            service_pb2.CudaSharedMemoryRegisterRequest(
                name="c", raw_handle=b"\0" * 64, device_id=0, byte_size=64
            )
        )
    if torch.cuda.is_available():
        assert code_of(e) == "INVALID_ARGUMENT"  # a handle of zeros opens nothing
    else:
        assert code_of(e) in ("UNIMPLEMENTED", "INVALID_ARGUMENT"), e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.CudaSharedMemoryStatus(service_pb2.CudaSharedMemoryStatusRequest(name="c"))
    assert code_of(e) == "NOT_FOUND"
